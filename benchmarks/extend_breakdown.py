"""Where `extend_attention`'s time goes, launch by launch (CUDA): one chunk of a single sequence over a
compressed 16K prefix (k4v4, random codes, bf16 query and fresh K/V), each kernel's device time under
`torch.profiler` (mean over calls; the rotations of the query, the fresh keys and values and, where the
kernel does not un-rotate its output itself, the output; fills; the attention kernel), beside the call's
time in a CUDA graph. The kernels are what `extend_attention` picks (on Hopper `extend_hopper.py`'s).

    python benchmarks/extend_breakdown.py [--out benchmarks/results/extend-breakdown-h200.json]
        [--chunks 16,512,2048] [--shapes llama-3.1-8b,...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extend_launch import add_sweep_arguments, parse_sweep, save_sweep  # noqa: E402
from kernels import HEAD_64, LLAMA_8B, extend_case, graph_time_ms  # noqa: E402

from turboquant.kernels import extend  # noqa: E402 (kernels.py puts the repository on sys.path)

PREFIX = 16384
CHUNKS = (16, 512, 2048)
SHAPES = (LLAMA_8B, HEAD_64)
PROFILED_CALLS = 20


def kernel_times_us(call, calls: int = PROFILED_CALLS) -> dict[str, float]:
    """Each kernel's device time per call (µs, summed over its launches in a call), by kernel name."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name if len(event.name) <= 60 else event.name[:57] + "..."
            totals[name] = totals.get(name, 0.0) + event.device_time / calls
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def cell(shape: dict, chunk: int) -> dict:
    codec, table, seq_lens, cache, query, keys, values, starts = extend_case(shape, PREFIX, chunk)

    def call():
        return extend.extend_attention(query, keys, values, starts, seq_lens, cache, codec, table,
                                       shape["head_dim"]**-0.5, chunk)
    kernels = kernel_times_us(call)
    return {"shape": shape["name"], "prefix": PREFIX, "chunk": chunk, "graph_ms": graph_time_ms(call),
            "kernels_us": kernels, "kernels_total_us": sum(kernels.values())}


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}, {result['date']}, build `{result['build']}`. `{result['command']}`: "
             f"each kernel's device time per `extend_attention` call (µs, `torch.profiler`, mean of "
             f"{PROFILED_CALLS} calls) and the call's time in a CUDA graph (ms).", "",
             "| shape | chunk | call ms (graph) | kernels µs (sum) | kernel: µs |", "|---|---:|---:|---:|---|"]
    for row in result["rows"]:
        kernels = "; ".join(f"`{name}` {us:.1f}" for name, us in row["kernels_us"].items())
        lines.append(f"| {row['shape']} | {row['chunk']} | {row['graph_ms']:.4f} | {row['kernels_total_us']:.1f} | "
                     f"{kernels} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_arguments(parser, "benchmarks/results/extend-breakdown-h200.json", CHUNKS, SHAPES)
    args = parser.parse_args()
    chunks, shapes, result = parse_sweep(parser, args, SHAPES, "benchmarks/extend_breakdown.py")
    for shape in shapes:
        for chunk in chunks:
            result["rows"].append(cell(shape, chunk))
            print(json.dumps(result["rows"][-1]), flush=True)
    save_sweep(result, args.out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
