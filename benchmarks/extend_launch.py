"""Launch-config sweep for the fused extend kernel (`turboquant/kernels/extend.py`, CUDA): one chunk of
a single sequence over a compressed 16K prefix (k4v4, random codes), per head_dim and chunk length,
`extend_attention` as it picks its programs ('auto': `extend.program_plan`, shape and splits of the
prefix; on Hopper the Gluon kernel of `extend_hopper.py` where it serves, then extend.py's Triton
kernel at the same plan), and extend.py's kernel unsplit with each fixed (query rows per program, key
tile, warps, pipeline stages). Times per call in CUDA graphs, in one run.

    python benchmarks/extend_launch.py [--out benchmarks/results/extend-launch-h200.json]
    python benchmarks/extend_launch.py --chunks 16,64 --kernels-only --out ...  # the two kernels, short chunks
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import HEAD_64, HEAD_256, LLAMA_8B, extend_case, graph_time_ms  # noqa: E402

from turboquant.kernels import extend, extend_hopper  # noqa: E402 (kernels.py puts the repository on sys.path)

PREFIX = 16384
CHUNKS = (16, 64, 512, 2048)
SHAPES = (LLAMA_8B, HEAD_64, HEAD_256)
CONFIGS = {  # (ROWS, TILE, num_warps, num_stages)
    64: [(64, 128, 4, 1), (64, 128, 4, 2), (128, 128, 8, 2), (128, 128, 4, 1), (256, 128, 8, 2)],
    128: [(64, 128, 4, 1), (64, 128, 4, 2), (128, 128, 8, 1), (128, 128, 8, 2), (128, 64, 8, 2), (256, 64, 8, 1)],
    256: [(32, 32, 4, 1), (64, 32, 4, 1), (64, 64, 8, 1), (64, 64, 8, 2), (128, 32, 8, 1), (128, 64, 8, 2)],
}


def cell_rows(shape: dict, chunk: int, kernels_only: bool = False) -> list[dict]:
    head_dim, num_q_heads, num_kv_heads = shape["head_dim"], shape["num_q_heads"], shape["num_kv_heads"]
    codec, table, seq_lens, cache, query, keys, values, starts = extend_case(shape, PREFIX, chunk)

    def call(num_splits=None):
        return extend.extend_attention(query, keys, values, starts, seq_lens, cache, codec, table, head_dim**-0.5,
                                       chunk, num_splits=num_splits)
    launch, query_tokens, splits = extend.program_plan(
        codec.layout, num_q_heads, 1, chunk, table.shape[1] * codec.layout.block_size, False,
        torch.cuda.get_device_properties(0).multi_processor_count, extend.narrow_programs(codec.layout, cache.device,
                                                                                          False))
    reference = call().float()
    auto_ms = graph_time_ms(call)
    group_pad = triton.next_power_of_2(num_q_heads // num_kv_heads)  # the kernel's GQA group, padded
    hopper = extend_hopper.serves(codec.layout, cache.device, False, query_tokens * group_pad)
    triton_auto = dict(shape=shape["name"], chunk=chunk, rows=f"auto ({query_tokens * group_pad})", tile=launch["TILE"],
                       warps=launch["num_warps"], stages=launch["num_stages"], splits=splits)
    rows = [dict(triton_auto, ms=auto_ms, relative_to_auto=1.0, relative_difference=0.0)]
    if hopper:  # the Gluon kernel: a warpgroup per 64 query rows and two producer warpgroups, its own tiles and ring
        rows[0].update(tile="Gluon", warps=extend_hopper.program_warps(query_tokens * group_pad), stages="-")
    with mock.patch.object(extend_hopper, "enabled", False):  # extend.py's Triton kernel from here on
        if hopper:
            out = call().float()
            ms = graph_time_ms(call)
            rows.append(dict(triton_auto, ms=ms, relative_to_auto=ms / auto_ms,
                             relative_difference=float((out - reference).norm() / reference.norm())))
        if not kernels_only:
            rows += fixed_launch_rows(shape, chunk, call, reference, auto_ms)
    return rows


def fixed_launch_rows(shape: dict, chunk: int, call, reference: torch.Tensor, auto_ms: float) -> list[dict]:
    """extend.py's kernel unsplit at each fixed (query rows, key tile, warps, stages) of the sweep."""
    rows = []
    picked = extend.extend_launch
    for rows_, tile, warps, stages in CONFIGS[shape["head_dim"]]:
        extend.extend_launch = lambda *args, c=(rows_, tile, warps, stages): dict(
            ROWS=c[0], TILE=c[1], num_warps=c[2], num_stages=c[3])
        try:
            out = call(1).float()
            ms = graph_time_ms(lambda: call(1))
        finally:
            extend.extend_launch = picked
        rows.append(dict(shape=shape["name"], chunk=chunk, rows=rows_, tile=tile, warps=warps, stages=stages, splits=1,
                         ms=ms, relative_to_auto=ms / auto_ms,
                         relative_difference=float((out - reference).norm() / reference.norm())))
    return rows


def markdown(result: dict) -> str:
    command = result.get("command", "python benchmarks/extend_launch.py")
    lines = [f"Device: {result['device']}, {result['date']}, build `{result['build']}`. "
             f"`{command}`: one chunk over a compressed {PREFIX}-token prefix (k4v4), "
             "ms per call (CUDA graph). 'auto' is `extend_attention`'s pick (`extend.program_plan`: program shape and "
             "splits of the prefix; tile 'Gluon': `extend_hopper.py`'s kernel, then extend.py's at the same plan); "
             "the fixed shapes run extend.py's kernel unsplit; 'x auto' is their time over auto's.", "",
             "| shape | chunk | rows | tile | warps | stages | splits | ms | x auto |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['shape']} | {row['chunk']} | {row['rows']} | {row['tile']} | {row['warps']} | "
                     f"{row['stages']} | {row['splits']} | {row['ms']:.4f} | {row['relative_to_auto']:.2f} |")
    return "\n".join(lines) + "\n"


def add_sweep_arguments(parser: argparse.ArgumentParser, out: str, chunks, shapes) -> None:
    """--out, --build, --chunks, --shapes: the command line of a sweep over chunks of one sequence per shape."""
    parser.add_argument("--out", default=out)
    parser.add_argument("--build", help="the build measured (default: git's HEAD here)")
    parser.add_argument("--chunks", default=",".join(map(str, chunks)), help="chunk lengths, comma-separated")
    parser.add_argument("--shapes", default=",".join(s["name"] for s in shapes),
                        help="shape names, comma-separated (default: all)")


def parse_sweep(parser: argparse.ArgumentParser, args, shapes, script: str) -> tuple[list[int], list[dict], dict]:
    """(chunks, shapes, the result's header with no rows yet) from `add_sweep_arguments`' options; exits with
    the parser's error on bad ones or without a CUDA device."""
    chunks = [int(chunk) for chunk in args.chunks.split(",")]
    picked = [shape for shape in shapes if shape["name"] in args.shapes.split(",")]
    if not picked or any(chunk < 1 for chunk in chunks):
        parser.error(f"--shapes must name some of {[s['name'] for s in shapes]} and --chunks be positive")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    build = args.build or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True).stdout.strip()
    return chunks, picked, {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                            "build": build, "command": " ".join(["python", script] + sys.argv[1:]), "rows": []}


def save_sweep(result: dict, out: str, markdown) -> None:
    """The result as JSON at `out`, its `markdown` table beside it (.md) and on stdout."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    Path(out).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_arguments(parser, "benchmarks/results/extend-launch-h200.json", CHUNKS, SHAPES)
    parser.add_argument("--kernels-only", action="store_true",
                        help="only 'auto' and, on Hopper, extend.py's kernel at the same plan (no fixed shapes)")
    args = parser.parse_args()
    chunks, shapes, result = parse_sweep(parser, args, SHAPES, "benchmarks/extend_launch.py")
    for shape in shapes:
        for chunk in chunks:
            rows = cell_rows(shape, chunk, args.kernels_only)
            result["rows"] += rows
            print(json.dumps(rows[0]), flush=True)
    save_sweep(result, args.out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
