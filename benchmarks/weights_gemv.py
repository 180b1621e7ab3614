"""Weight GEMV (CUDA): `tq_linear_gemv` over TQ3/TQ4 codes side by side with bf16 cuBLAS
(`torch.nn.functional.linear`) on Llama-3.1-8B's Linear shapes, batch 1 and a few small batches.

    python benchmarks/weights_gemv.py [--out benchmarks/results/weights-h100]

Times as in `benchmarks/kernels.py` (one CUDA-graph replay of back-to-back calls, median of 5; the input
rotation, one small matmul, is included in ours). Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import graph_time_ms  # noqa: E402

from turboquant.weights import TQLinear  # noqa: E402
from turboquant.weights import gemv  # noqa: E402
from turboquant.weights.gemv import tq_linear_gemv  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in_features, out_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batches", default="1,4,16,32")
    parser.add_argument("--rows-per-program", type=int, default=gemv.ROWS_PER_PROGRAM,
                        help="output rows per program (a launch sweep; default: the kernel's)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    gemv.ROWS_PER_PROGRAM = args.rows_per_program
    rows = []
    for in_features, out_features in SHAPES:
        linear = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)  # quantized on the CPU
        weight = linear.weight.detach().cuda()
        for bits in (3, 4):
            layer = TQLinear.from_linear(linear, bits, args.group_size).to("cuda")
            for batch in map(int, args.batches.split(",")):
                x = torch.randn(batch, in_features, device="cuda", dtype=torch.bfloat16)
                want = nn.functional.linear(x.float(), layer.dequantize())  # the reference (`layer(x)` runs the kernel)
                error = ((tq_linear_gemv(x, layer).float() - want).norm() / want.norm()).item()
                ours = graph_time_ms(lambda: tq_linear_gemv(x, layer))
                cublas = graph_time_ms(lambda: nn.functional.linear(x, weight))
                rows.append(dict(shape=f"{in_features}x{out_features}", bits=bits, batch=batch, ours_ms=round(ours, 4),
                                 bf16_cublas_ms=round(cublas, 4), speedup=round(cublas / ours, 3),
                                 relative_error_vs_reference=error))
                print(json.dumps(rows[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
              "group_size": args.group_size, "rows_per_program": args.rows_per_program, "rows": rows}
    lines = [f"# Weight GEMV ({result['device']}, {result['date']}), group size {args.group_size}, "
             f"{args.rows_per_program} rows per program", "",
             "| shape (in x out) | bits | batch | ours ms | bf16 cuBLAS ms | speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['bits']} | {r['batch']} | {r['ours_ms']} | {r['bf16_cublas_ms']} | {r['speedup']}x |"
              for r in rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
