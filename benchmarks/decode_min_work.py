"""Which split kernel a decode call picks by default, side by side under other rules (CUDA): whole
`paged_decode_attention` calls (Llama-3.1-8B attention: 32 q heads, 8 kv heads, d=128, k4v4, page 16),
CUDA-graph times, in block tables as wide as the context and as wide as vLLM's (`--table-tokens`). A rule
is `decode.FRAGMENT_MIN_WORK` (the fewest keys × (sequence · kv head) pairs a sequence needs for the
fragment kernel) and `decode.FRAGMENT_FEW_PAIRS` (below that many pairs, twice the work); each cell also
reports each rule's plan (the fragment kernel's span limit, the Triton and partial split counts).

    python benchmarks/decode_min_work.py [--out benchmarks/results/decode-min-work-h200.json]
        [--cells 1x32768,8x4096] [--table-tokens 33024]
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
from kernels import BLOCK_SIZE, block_table_for, graph_time_ms, parse_cells, random_compressed_cache  # noqa: E402
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.kernels import decode  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402

CELLS = ("1x1024,1x4096,1x16384,1x32768,2x16384,4x8192,8x1024,8x2048,8x4096,8x6144,16x2048,16x4096,32x1024,"
         "32x2048,64x1024")
# name → (FRAGMENT_MIN_WORK, FRAGMENT_FEW_PAIRS); None: the module's own
RULES = {"default": (None, None), "2^19 at any pairs": (1 << 19, 0), "2^18 at any pairs": (1 << 18, 0)}
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128


def under_rule(min_work: int | None, few_pairs: int | None, fn):
    saved = decode.FRAGMENT_MIN_WORK, decode.FRAGMENT_FEW_PAIRS
    decode.FRAGMENT_MIN_WORK = saved[0] if min_work is None else min_work
    decode.FRAGMENT_FEW_PAIRS = saved[1] if few_pairs is None else few_pairs
    try:
        return fn()
    finally:
        decode.FRAGMENT_MIN_WORK, decode.FRAGMENT_FEW_PAIRS = saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/decode-min-work-h200.json")
    parser.add_argument("--cells", default=CELLS, help="comma-separated BATCHxCONTEXT cells (default: %(default)s)")
    parser.add_argument("--table-tokens", default="0,33024",
                        help="comma-separated block-table widths in tokens; 0: as wide as the context "
                             "(default: %(default)s)")
    args = parser.parse_args()
    try:
        cells = parse_cells(args.cells, 2)
        widths = [int(n) for n in args.table_tokens.split(",")]
    except ValueError:
        parser.error("--cells takes BATCHxCONTEXT items of two positive numbers and --table-tokens integers, "
                     "comma-separated")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    codec = KernelCodec.from_config(TurboQuantConfig(key_bits=4, value_bits=4), HEAD_DIM, NUM_KV_HEADS, BLOCK_SIZE,
                                    device="cuda")
    rows = []
    for width in widths:
        for batch, context in cells:
            table, seq_lens, num_blocks = block_table_for(batch, context, width)
            cache = random_compressed_cache(codec, num_blocks)
            query = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            row = {"table_tokens": table.shape[1] * BLOCK_SIZE, "batch": batch, "context": context}

            def call():
                return decode.paged_decode_attention(query, cache, codec, table, seq_lens, HEAD_DIM**-0.5)
            for name, (min_work, few_pairs) in RULES.items():
                plan = under_rule(min_work, few_pairs, lambda: decode.split_plan(
                    codec, batch, NUM_Q_HEADS // NUM_KV_HEADS, table.shape[1] * BLOCK_SIZE, query.device))
                row[f"{name} plan"] = [plan.min_span, plan.triton_splits, plan.num_splits]
                row[f"{name} ms"] = round(under_rule(min_work, few_pairs, lambda: graph_time_ms(call)), 5)
            print(json.dumps(row), flush=True)
            rows.append(row)
    build = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "build": build,
              "rules": {name: {"FRAGMENT_MIN_WORK": w, "FRAGMENT_FEW_PAIRS": p} for name, (w, p) in RULES.items()},
              "defaults": {"FRAGMENT_MIN_WORK": decode.FRAGMENT_MIN_WORK,
                           "FRAGMENT_FEW_PAIRS": decode.FRAGMENT_FEW_PAIRS},
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    names = list(RULES)
    lines = [f"Device: {result['device']}, {result['date']}, build `{build}`. `paged_decode_attention` with its "
             f"default split-kernel choice, ms per call (CUDA graph); Llama-3.1-8B attention, k4v4, page 16. "
             f"'default' is the build's rule (FRAGMENT_MIN_WORK {decode.FRAGMENT_MIN_WORK}, twice that below "
             f"{decode.FRAGMENT_FEW_PAIRS} pairs). Plan: [fragment kernel's span limit (None: not launched), "
             "Triton splits, partial splits]. Ratio: the rule's time over the default's.",
             "", "| table tokens | batch | context | " + " | ".join(f"{n} ms | {n} plan" for n in names) + " | "
             + " | ".join(f"{n} / default" for n in names[1:]) + " |",
             "|---:|---:|---:|" + "---:|---|" * len(names) + "---:|" * (len(names) - 1)]
    for row in rows:
        lines.append(f"| {row['table_tokens']} | {row['batch']} | {row['context']} | "
                     + " | ".join(f"{row[f'{n} ms']:.4f} | {row[f'{n} plan']}" for n in names) + " | "
                     + " | ".join(f"{row[f'{n} ms'] / row['default ms']:.3f}" for n in names[1:]) + " |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
