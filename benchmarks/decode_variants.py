"""The Triton decode split kernel's code variants side by side in one run (CUDA): its orientation
(`TOKEN_ROWS`: tokens as the rows of both products, so a 64-token tile is a Hopper warpgroup MMA, against
the query heads as rows), its byte-permute lookups' table words (held in registers, loaded once per
program, against constants of the PTX) and a register cap (Triton's `maxnreg`: more programs per SM,
for a few spilled bytes; `benchmarks/split_sass.py` shows what each cap spills). Whole
`paged_decode_attention` calls with the Triton split kernel forced (`fragments=False`), CUDA-graph times;
each variant's output against the default's.

    python benchmarks/decode_variants.py [--out benchmarks/results/decode-variants-h200.json]
        [--cells k4v4:128:32x1024,...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import block_table_for, graph_time_ms, random_compressed_cache  # noqa: E402
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.kernels import decode  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402

CELLS = ("k4v4:128:1x1024,k4v4:128:1x16384,k4v4:128:8x1024,k4v4:128:8x4096,k4v4:128:32x1024,k4v4:128:32x4096,"
         "k4v4:128:64x1024,k3v3:128:8x4096,k3v3:128:32x4096,k4v3:128:32x1024,k4v4:256:32x4096,k3v3:256:8x4096,"
         "k4v4:64:32x4096,k8v4:128:8x4096,k2v2:128:8x4096")
# (name, TOKEN_ROWS, table words as inputs, register cap); None: the default's choice
VARIANTS = (("default", None, None, None), ("head_rows", False, None, None), ("constant_tables", None, False, None),
            ("head_rows_constant_tables", False, False, None), ("max_96_registers", None, None, 96),
            ("token_rows_max_128_registers", True, None, 128))
NUM_Q_HEADS, NUM_KV_HEADS = 32, 8


def variant(token_rows: bool | None, table_inputs: bool | None, max_registers: int | None):
    """Patch decode's launch choices for one variant (None: the default); returns the undo."""
    launch, lookups = decode.decode_launch, decode.lookup_constants

    def patched_launch(*args):
        chosen = launch(*args)
        if token_rows is not None:
            chosen = chosen | {"TOKEN_ROWS": token_rows}
        return chosen if max_registers is None else chosen | {"maxnreg": max_registers}

    def patched_lookups(codec, *args, **kwargs):
        if table_inputs is not None and "table_inputs" in kwargs:
            kwargs["table_inputs"] = table_inputs
        return lookups(codec, *args, **kwargs)
    decode.decode_launch, decode.lookup_constants = patched_launch, patched_lookups

    def undo():
        decode.decode_launch, decode.lookup_constants = launch, lookups
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
    args = parser.parse_args()
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
        for name, token_rows, table_inputs, max_registers in VARIANTS:
            undo = variant(token_rows, table_inputs, max_registers)
            try:
                def call():
                    return decode.paged_decode_attention(query, cache, codec, table, seq_lens, head_dim**-0.5,
                                                         fragments=False)
                out = call().float()
                reference = out if reference is None else reference
                row[f"{name}_ms"] = round(graph_time_ms(call), 5)
                row[f"{name}_max_error"] = float((out - reference).abs().max())
            finally:
                undo()
        print(json.dumps(row), flush=True)
        rows.append(row)
    build = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "build": build,
              "variants": [name for name, *_ in VARIANTS], "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    names = [name for name, *_ in VARIANTS]
    lines = [f"Device: {result['device']}, {result['date']}, build `{build}`. `paged_decode_attention` with the Triton "
             "split kernel forced, ms per call (CUDA graph), 32 query heads and 8 kv heads, page 16. default: "
             "`decode_launch`'s choice, table words in registers; head_rows: the query heads as rows; "
             "constant_tables: the tables as constants of the PTX; max_N_registers: Triton's maxnreg at N. Ratio: "
             "the variant's time over the default's.",
             "", "| preset | head_dim | batch | context | " + " | ".join(f"{n} ms" for n in names) + " | "
             + " | ".join(f"{n} / default" for n in names[1:]) + " |",
             "|---|---:|---:|---:|" + "---:|" * (2 * len(names) - 1)]
    for row in rows:
        times = [row[f"{n}_ms"] for n in names]
        lines.append(f"| {row['preset']} | {row['head_dim']} | {row['batch']} | {row['context']} | "
                     + " | ".join(f"{t:.4f}" for t in times) + " | "
                     + " | ".join(f"{t / times[0]:.3f}" for t in times[1:]) + " |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
