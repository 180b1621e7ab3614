"""A decode split kernel of this checkout against the one of a git revision, side by side (CUDA): the
same caches and queries, each call in one CUDA graph, the two timed in turn three times (median), and
whether their outputs are equal bit for bit (a change that should not move any sum, such as the loads'
masks, must be). `--kernel fragments` (k4v4): `decode_fragments.launch_split` plus the reduction;
`--kernel triton`: `decode.paged_decode_attention(..., fragments=False)` as a whole (the query's rotation,
the Triton split kernel, the reduction). The revision's module is loaded as a module of this checkout's
`turboquant.kernels`, so it must still import from it. Default split counts; cells are HEAD_DIM x
Q_HEADS x KV_HEADS x BATCH x CONTEXT, page 16.

    python benchmarks/decode_ab.py --base cdd8877 [--kernel fragments|triton] [--preset k4v4]
        [--cells 128x32x8x8x16390,...] [--out benchmarks/results/decode-ab-h200.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kernels import (block_table_for, graph_time_ms, kernel_module, parse_cells,  # noqa: E402
                     random_compressed_cache)
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.kernels import decode, decode_fragments  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402
from turboquant.kernels.rotate import rotate  # noqa: E402

# odd tile counts per split and a partial last tile (16390), every head_dim, batch 1 to 64
CELLS = ("128x32x8x8x16390,128x32x8x8x32768,128x32x8x32x16384,128x32x8x64x32768,128x32x8x1x131072,"
         "128x32x8x32x4112,64x32x8x32x16384,256x16x8x32x16384")
REPEATS = 3


def revision_module(revision: str, name: str, directory: Path):
    """`turboquant/kernels/{name}.py` as of `revision`, importable beside this checkout's."""
    source = subprocess.run(["git", "show", f"{revision}:turboquant/kernels/{name}.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    return kernel_module(source, f"{name}_base", directory)


def cell(kernels: dict, kernel: str, preset: str, head_dim: int, num_q_heads: int, num_kv_heads: int, batch: int,
         context: int) -> dict:
    codec = KernelCodec.from_config(TurboQuantConfig.from_preset(preset), head_dim, num_kv_heads, 16, device="cuda")
    table, seq_lens, num_blocks = block_table_for(batch, context)
    cache = random_compressed_cache(codec, num_blocks)
    query = torch.randn(batch, num_q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(query)
    plan = decode.split_plan(codec, batch, num_q_heads // num_kv_heads, context, cache.device,
                             fragments=kernel == "fragments")
    partial_out = torch.empty(batch, num_q_heads, plan.num_splits, head_dim, device="cuda")
    partial_lse = torch.empty(batch, num_q_heads, plan.num_splits, device="cuda")
    rotated = rotate(query, codec)
    calls, outputs, times = {}, {}, {name: [] for name in kernels}
    for name, module in kernels.items():
        if kernel == "fragments":
            def call(module=module):
                module.launch_split(rotated, cache, codec, table, seq_lens, None, partial_out, partial_lse,
                                    head_dim**-0.5, None, None)
                decode.merge_splits(partial_out, partial_lse, out, None, codec)
        else:
            def call(module=module):
                module.paged_decode_attention(query, cache, codec, table, seq_lens, head_dim**-0.5, fragments=False,
                                              out=out)
        call()
        outputs[name], calls[name] = out.clone(), call
    for _ in range(REPEATS):
        for name in kernels:
            times[name].append(graph_time_ms(calls[name]))
    row = {"head_dim": head_dim, "q_heads": num_q_heads, "kv_heads": num_kv_heads, "batch": batch,
           "context": context, "splits": plan.num_splits}
    for name in kernels:
        row[f"{name}_ms"] = round(statistics.median(times[name]), 5)
    row["ratio"] = round(row["this_ms"] / row["base_ms"], 3)
    row["equal"] = bool(torch.equal(outputs["this"], outputs["base"]))
    row["max_difference"] = float((outputs["this"].float() - outputs["base"].float()).abs().max())
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision whose kernel is the baseline")
    parser.add_argument("--kernel", choices=("fragments", "triton"), default="fragments",
                        help="the split kernel compared (default: %(default)s)")
    parser.add_argument("--preset", default="k4v4", help="the codec preset (default: %(default)s; the fragment "
                                                         "kernel reads k4v4 only)")
    parser.add_argument("--cells", default=CELLS, help="comma-separated HEAD_DIMxQ_HEADSxKV_HEADSxBATCHxCONTEXT "
                                                       "items (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/decode-ab-h200.json")
    args = parser.parse_args()
    try:
        cells = parse_cells(args.cells, 5)
    except ValueError:
        parser.error("--cells takes HEAD_DIMxQ_HEADSxKV_HEADSxBATCHxCONTEXT items of positive numbers")
    if args.kernel == "fragments" and args.preset != "k4v4":
        parser.error("the fragment kernel reads k4v4 codes only")
    if not torch.cuda.is_available() or (args.kernel == "fragments" and decode_fragments.gluon is None):
        parser.error("needs a CUDA device (and, for the fragment kernel, a Triton with Gluon)")
    build = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as directory:
        name = "decode_fragments" if args.kernel == "fragments" else "decode"
        kernels = {"base": revision_module(args.base, name, Path(directory)),
                   "this": decode_fragments if args.kernel == "fragments" else decode}
        rows = []
        for item in cells:
            rows.append(cell(kernels, args.kernel, args.preset, *item))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "base": args.base,
              "build": build, "kernel": args.kernel, "preset": args.preset, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    timed = ("the split kernel and the reduction" if args.kernel == "fragments"
             else "`paged_decode_attention(..., fragments=False)`")
    lines = [f"Device: {result['device']}, {result['date']}. The {args.kernel} split kernel of build `{build}` (this) "
             f"against `{args.base}`'s (base), {args.preset}, page 16, default split counts; ms per call ({timed}, "
             f"CUDA graph), median of {REPEATS} interleaved timings; 'equal': outputs bit for bit, else their largest "
             "difference.", "",
             "| head_dim | q / kv heads | batch | context | splits | base ms | this ms | this / base | equal |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        same = "yes" if row["equal"] else f"{row['max_difference']:.1e}"
        lines.append(f"| {row['head_dim']} | {row['q_heads']} / {row['kv_heads']} | {row['batch']} | {row['context']} "
                     f"| {row['splits']} | {row['base_ms']:.4f} | {row['this_ms']:.4f} | {row['ratio']:.3f} "
                     f"| {same} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
