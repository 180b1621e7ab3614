"""Split-count sweep of the decode split kernels (CUDA): Llama-3.1-8B attention (32 q heads, 8 kv heads,
d=128), k4v4, page size 16, one CUDA-graph time per (batch, context, split count) for the fragment kernel
(`paged_decode_attention(..., fragments=True)`), or with `--kernel triton` the Triton split kernel,
beside the Triton split kernel at its default. It chose `decode_fragments.default_num_splits` and
`decode.FRAGMENT_MIN_WORK`; `--kernel triton` checks `decode.default_num_splits` where calls are short.

    python benchmarks/decode_splits.py [--out benchmarks/results/decode-splits-h200.json]
        [--cells 8x16384,16x6144] [--splits 8,12,16,24,32] [--kernel fragments|triton]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import block_table_for, graph_time_ms, parse_cells, random_compressed_cache  # noqa: E402
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402
from turboquant.kernels.decode import paged_decode_attention  # noqa: E402

CELLS = "1x1024,1x4096,1x16384,8x1024,8x4096,8x16384,16x6144,32x1024,32x4096,64x1024,64x4096"
SPLITS = "1,2,4,8,16,32,64,128"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/decode-splits-h200.json")
    parser.add_argument("--cells", default=CELLS, help="comma-separated BATCHxCONTEXT cells (default: %(default)s)")
    parser.add_argument("--splits", default=SPLITS, help="comma-separated split counts (default: %(default)s)")
    parser.add_argument("--kernel", choices=("fragments", "triton"), default="fragments",
                        help="the split kernel swept (default: %(default)s)")
    args = parser.parse_args()
    try:
        cells = parse_cells(args.cells, 2)
        split_counts = [int(n) for n in args.splits.split(",")]
    except ValueError:
        parser.error("--cells takes BATCHxCONTEXT items of two positive numbers and --splits integers, "
                     "comma-separated")
    if min(split_counts) < 1:
        parser.error("--splits takes positive counts")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    codec = KernelCodec.from_config(TurboQuantConfig.from_preset("k4v4"), 128, 8, 16, device="cuda")
    rows = []
    for batch, context in cells:
        table, seq_lens, num_blocks = block_table_for(batch, context)
        cache = random_compressed_cache(codec, num_blocks)
        query = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
        row = {"batch": batch, "context": context, "triton_ms": graph_time_ms(
            lambda: paged_decode_attention(query, cache, codec, table, seq_lens, 128**-0.5, fragments=False))}
        for splits in split_counts:
            if context // splits >= 32:
                row[f"{args.kernel}_{splits}_ms"] = graph_time_ms(lambda: paged_decode_attention(
                    query, cache, codec, table, seq_lens, 128**-0.5, num_splits=splits,
                    fragments=args.kernel == "fragments"))
        swept = {splits: row[f"{args.kernel}_{splits}_ms"] for splits in split_counts
                 if f"{args.kernel}_{splits}_ms" in row}  # not "triton_ms", the default's time
        row["best_splits"] = min(swept, key=swept.get)
        row["best_ms"] = swept[row["best_splits"]]
        print(json.dumps(row), flush=True)
        rows.append(row)
        del cache
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "kernel": args.kernel, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Device: {result['device']}, {result['date']}. Llama-3.1-8B attention, k4v4, page 16; ms per call "
             f"(CUDA graph). {'Fragment' if args.kernel == 'fragments' else 'Triton split'} kernel at each split "
             "count; Triton split kernel at its default.", "",
             "| batch | context | Triton ms | " + " | ".join(f"s={s}" for s in split_counts)
             + " | best |", "|---:|---:|---:|" + "---:|" * (len(split_counts) + 1)]
    for row in rows:
        timings = " | ".join(f"{row[f'{args.kernel}_{s}_ms']:.4f}" if f"{args.kernel}_{s}_ms" in row else ""
                             for s in split_counts)
        lines.append(f"| {row['batch']} | {row['context']} | {row['triton_ms']:.4f} | {timings} "
                     f"| {row['best_splits']} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
