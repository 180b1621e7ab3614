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
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import HEAD_64, LLAMA_8B, block_table_for, graph_time_ms, random_compressed_cache  # noqa: E402

from turboquant.core import TurboQuantConfig  # noqa: E402 (kernels.py puts the repository on sys.path)
from turboquant.kernels import extend  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402

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
    head_dim, num_q_heads, num_kv_heads = shape["head_dim"], shape["num_q_heads"], shape["num_kv_heads"]
    codec = KernelCodec.from_config(TurboQuantConfig.from_preset("k4v4"), head_dim, num_kv_heads, 16, device="cuda")
    table, seq_lens, num_blocks = block_table_for(1, PREFIX + chunk)
    cache = random_compressed_cache(codec, num_blocks)
    query = torch.randn(chunk, num_q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(chunk, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    starts = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")

    def call():
        return extend.extend_attention(query, keys, values, starts, seq_lens, cache, codec, table, head_dim**-0.5,
                                       chunk)
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
    parser.add_argument("--out", default="benchmarks/results/extend-breakdown-h200.json")
    parser.add_argument("--build", help="the build measured (default: git's HEAD here)")
    parser.add_argument("--chunks", default=",".join(map(str, CHUNKS)), help="chunk lengths, comma-separated")
    parser.add_argument("--shapes", default=",".join(s["name"] for s in SHAPES),
                        help="shape names, comma-separated (default: all)")
    args = parser.parse_args()
    chunks = [int(chunk) for chunk in args.chunks.split(",")]
    shapes = [shape for shape in SHAPES if shape["name"] in args.shapes.split(",")]
    if not shapes or any(chunk < 1 for chunk in chunks):
        parser.error(f"--shapes must name some of {[s['name'] for s in SHAPES]} and --chunks be positive")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    build = args.build or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True).stdout.strip()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "build": build,
              "command": " ".join(["python", "benchmarks/extend_breakdown.py"] + sys.argv[1:]), "rows": []}
    for shape in shapes:
        for chunk in chunks:
            result["rows"].append(cell(shape, chunk))
            print(json.dumps(result["rows"][-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
