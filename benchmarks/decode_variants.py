"""The Triton decode path's code variants side by side in one run (CUDA): the split kernel's orientation
(`TOKEN_ROWS`: tokens as the rows of both products, so a 64-token tile is a Hopper warpgroup MMA, against
the query heads as rows), its byte-permute lookups' table words (held in registers, loaded once per
program, against constants of the PTX), a register cap (Triton's `maxnreg`: more programs per SM, for a
few spilled bytes; `benchmarks/split_sass.py` shows what each cap spills), its tile, pipeline depth and
warps, the split count, and the reduction's programs per row block (`VARIANTS`). Whole
`paged_decode_attention` calls with the Triton split kernel forced (`fragments=False`), CUDA-graph times;
each variant's output against the first's; a variant that exceeds the device's resources (a tile past
shared memory) is reported n/a.

    python benchmarks/decode_variants.py [--out benchmarks/results/decode-variants-h200.json]
        [--cells k4v4:128:32x1024,...] [--variants default,two_stages,...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import block_table_for, graph_time_ms, random_compressed_cache  # noqa: E402
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.kernels import decode, exact_ring  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402

CELLS = ("k4v4:128:1x1024,k4v4:128:1x16384,k4v4:128:8x1024,k4v4:128:8x4096,k4v4:128:32x1024,k4v4:128:32x4096,"
         "k4v4:128:64x1024,k3v3:128:8x4096,k3v3:128:32x4096,k4v3:128:32x1024,k4v4:256:32x4096,k3v3:256:8x4096,"
         "k4v4:64:32x4096,k8v4:128:8x4096,k2v2:128:8x4096")
# name → what it changes from the default: `launch`, keys over `decode_launch`'s choice (TOKEN_ROWS,
# TILE, num_stages, num_warps, maxnreg: Triton's register cap); `table_inputs`, the lookups' form;
# `column_programs`, programs per row block of the reduction's un-rotation; `splits`, a factor on the
# default split count; `window`, keys over the exact window kernel's `exact_ring.window_launch` (PARTS,
# num_warps, maxnreg), `window_tile`, its latest tokens' rows per tile at head_dim <= 128
# (`exact_ring.WINDOW_TILE`), and `window_priority`, the window stream's CUDA priority (lower: sooner; -1
# by default), all timed by `ring_cost.py --variant`, the only caller with a ring; `chain_max_batch`, the
# largest batch whose launches are chained by programmatic dependent launch (`decode.CHAIN_MAX_BATCH`);
# `rotate_in_split_max_batch`, the largest whose split kernel rotates the query (`decode.ROTATE_IN_SPLIT_MAX_BATCH`)
VARIANTS = {
    "default": {}, "head_rows": dict(launch=dict(TOKEN_ROWS=False)), "constant_tables": dict(table_inputs=False),
    "head_rows_constant_tables": dict(launch=dict(TOKEN_ROWS=False), table_inputs=False),
    "max_96_registers": dict(launch=dict(maxnreg=96)), "max_80_registers": dict(launch=dict(maxnreg=80)),
    "token_rows_max_128_registers": dict(launch=dict(TOKEN_ROWS=True, maxnreg=128)),
    "token_rows": dict(launch=dict(TOKEN_ROWS=True)),
    "two_stages": dict(launch=dict(num_stages=2)), "three_stages": dict(launch=dict(num_stages=3)),
    "tile_128": dict(launch=dict(TILE=128)), "tile_128_eight_warps": dict(launch=dict(TILE=128, num_warps=8)),
    "tile_32": dict(launch=dict(TILE=32)),
    "reduce_one_column_program": dict(column_programs=1), "reduce_two_column_programs": dict(column_programs=2),
    "reduce_four_column_programs": dict(column_programs=4),
    "twice_the_splits": dict(splits=2), "half_the_splits": dict(splits=0.5),
    "window_in_one_part": dict(window=dict(PARTS=1)), "window_max_128_registers": dict(window=dict(maxnreg=128)),
    "window_two_warps": dict(window=dict(num_warps=2)), "window_tile_16": dict(window_tile=16),
    "window_stream_normal_priority": dict(window_priority=0),
    "chained_launches": dict(chain_max_batch=1 << 30),
    "query_rotated_in_split": dict(rotate_in_split_max_batch=1 << 30),
    "query_rotated_apart": dict(rotate_in_split_max_batch=0),
}
DEFAULT_VARIANTS = ("default,head_rows,constant_tables,head_rows_constant_tables,max_96_registers,max_80_registers,"
                    "token_rows_max_128_registers")
NUM_Q_HEADS, NUM_KV_HEADS = 32, 8


def variant(launch: dict | None = None, table_inputs: bool | None = None, column_programs: int | None = None,
            window: dict | None = None, window_priority: int | None = None, window_tile: int | None = None,
            chain_max_batch: int | None = None, rotate_in_split_max_batch: int | None = None):
    """Patch decode's launch choices for one variant; returns the undo."""
    saved = decode.decode_launch, decode.lookup_constants, decode.reduce_constants
    chain_default, rotate_default = decode.CHAIN_MAX_BATCH, decode.ROTATE_IN_SPLIT_MAX_BATCH
    decode.CHAIN_MAX_BATCH = chain_default if chain_max_batch is None else chain_max_batch
    decode.ROTATE_IN_SPLIT_MAX_BATCH = (rotate_default if rotate_in_split_max_batch is None
                                        else rotate_in_split_max_batch)
    window_launch, window_priority_default, window_rows = (exact_ring.window_launch, decode.WINDOW_STREAM_PRIORITY,
                                                           exact_ring.WINDOW_TILE)
    decode_launch, lookup_constants, reduce_constants = saved

    def patched_launch(*args):
        return decode_launch(*args) | (launch or {})

    def patched_lookups(codec, *args, **kwargs):
        if table_inputs is not None and "table_inputs" in kwargs:
            kwargs["table_inputs"] = table_inputs
        return lookup_constants(codec, *args, **kwargs)

    def patched_reduce(num_splits, head_dim_pad, unrotate, *args):
        return reduce_constants(num_splits, head_dim_pad, unrotate, *((column_programs,) if column_programs else args))
    decode.decode_launch, decode.lookup_constants, decode.reduce_constants = (patched_launch, patched_lookups,
                                                                             patched_reduce)
    exact_ring.window_launch = lambda head_dim: window_launch(head_dim) | (window or {})
    exact_ring.WINDOW_TILE = window_tile or window_rows
    decode.WINDOW_STREAM_PRIORITY = window_priority_default if window_priority is None else window_priority

    def undo():
        decode.decode_launch, decode.lookup_constants, decode.reduce_constants = saved
        decode.CHAIN_MAX_BATCH, decode.ROTATE_IN_SPLIT_MAX_BATCH = chain_default, rotate_default
        exact_ring.window_launch, decode.WINDOW_STREAM_PRIORITY, exact_ring.WINDOW_TILE = (
            window_launch, window_priority_default, window_rows)
    return undo


def parse_cells(text: str) -> list[tuple[str, int, int, int]]:
    cells = []
    for item in text.split(","):
        preset, head_dim, shape = item.split(":")
        batch, context = (int(n) for n in shape.split("x"))
        cells.append((preset, int(head_dim), batch, context))
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/decode-variants-h200.json")
    parser.add_argument("--cells", default=CELLS, help="PRESET:HEAD_DIM:BATCHxCONTEXT items (default: %(default)s)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma list from {sorted(VARIANTS)}; the first is the others' baseline")
    args = parser.parse_args()
    names = args.variants.split(",")
    if any(name not in VARIANTS for name in names):
        parser.error(f"--variants takes names from {sorted(VARIANTS)}")
    try:
        cells = parse_cells(args.cells)
    except ValueError:
        parser.error("--cells takes PRESET:HEAD_DIM:BATCHxCONTEXT items, comma-separated")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    rows = []
    for preset, head_dim, batch, context in cells:
        codec = KernelCodec.from_config(TurboQuantConfig.from_preset(preset), head_dim, NUM_KV_HEADS, 16,
                                        device="cuda")
        table, seq_lens, num_blocks = block_table_for(batch, context)
        cache = random_compressed_cache(codec, num_blocks)
        query = torch.randn(batch, NUM_Q_HEADS, head_dim, device="cuda", dtype=torch.bfloat16)
        row = {"preset": preset, "head_dim": head_dim, "batch": batch, "context": context}
        reference = None
        default_splits = decode.split_plan(codec, batch, NUM_Q_HEADS // NUM_KV_HEADS, table.shape[1] * 16,
                                           query.device, False, None).num_splits
        for name in names:
            changes = dict(VARIANTS[name])
            num_splits = max(1, int(default_splits * changes.pop("splits", 1)))
            undo = variant(**changes)
            try:
                def call():
                    return decode.paged_decode_attention(query, cache, codec, table, seq_lens, head_dim**-0.5,
                                                         fragments=False, num_splits=num_splits)
                out = call().float()
                reference = out if reference is None else reference
                row[f"{name}_ms"] = round(graph_time_ms(call), 5)
                row[f"{name}_max_error"] = float((out - reference).abs().max())
            except triton.runtime.errors.OutOfResources as error:  # e.g. a tile past shared memory
                row[f"{name}_ms"], row[f"{name}_error"] = None, str(error)
            finally:
                undo()
        print(json.dumps(row), flush=True)
        rows.append(row)
    build = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "build": build,
              "variants": {name: VARIANTS[name] for name in names}, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Device: {result['device']}, {result['date']}, build `{build}`. `paged_decode_attention` with the Triton "
             "split kernel forced, ms per call (CUDA graph), 32 query heads and 8 kv heads, page 16. What each "
             "variant changes from `decode_launch`'s choice (the default): "
             + "; ".join(f"{n}: {VARIANTS[n] or 'nothing'}" for n in names)
             + f". Ratio: the variant's time over {names[0]}'s.",
             "", "| preset | head_dim | batch | context | " + " | ".join(f"{n} ms" for n in names) + " | "
             + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |",
             "|---|---:|---:|---:|" + "---:|" * (2 * len(names) - 1)]
    for row in rows:
        times = [row[f"{n}_ms"] for n in names]
        lines.append(f"| {row['preset']} | {row['head_dim']} | {row['batch']} | {row['context']} | "
                     + " | ".join("n/a" if t is None else f"{t:.4f}" for t in times) + " | "
                     + " | ".join("n/a" if None in (t, times[0]) else f"{t / times[0]:.3f}" for t in times[1:])
                     + " |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
