"""Rotation on the CPU: `Rotation.apply` (one matmul by the stored R) against the fast Walsh–Hadamard
transform it replaced (O(d log d) adds in log2(d) reshape/stack steps, as `core/rotation.py` had it),
for the shapes the HF cache rotates: a decode step's few rows up to a long prefill's.

    python benchmarks/rotation_cpu.py [--out benchmarks/results/rotation-cpu.json] [--threads 2]

Median of repeated calls each; both give the same values within float rounding (the max difference is
reported).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from turboquant.core import make_rotation  # noqa: E402

SHAPES = [(1, 3, 1, 64), (1, 8, 1, 128), (1, 3, 212, 64), (1, 8, 4096, 128), (4, 32, 2048, 128)]


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """The unnormalized fast transform of the last dimension (Sylvester order), the replaced code path."""
    dim, lead, half = x.shape[-1], x.shape[:-1], 1
    while half < dim:
        pairs = x.reshape(*lead, dim // (2 * half), 2, half)
        x = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
        half *= 2
    return x.reshape(*lead, dim)


def median_us(fn, budget_s: float = 1.0) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the rows as JSON here (and a markdown table beside it)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s, as CI)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for shape in SHAPES:
        dim = shape[-1]
        rotation = make_rotation(dim, seed=0, kind="hadamard")
        signs = rotation.matrix()[0].sign()  # R = H · diag(s) / √d, and row 0 of H is all ones
        x = torch.randn(*shape)
        fast = lambda: walsh_hadamard(x * signs) * dim**-0.5  # noqa: E731
        matmul = lambda: rotation.apply(x)  # noqa: E731
        row = {"shape": list(shape), "walsh_hadamard_us": median_us(fast), "matmul_us": median_us(matmul),
               "max_difference": (fast() - matmul()).abs().max().item()}
        row["speedup"] = row["walsh_hadamard_us"] / row["matmul_us"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        result = {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
                  "threads": args.threads, "torch": torch.__version__, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        lines = [f"# Rotation on the CPU ({result['date']}, {args.threads} threads, torch {torch.__version__})", "",
                 "`python benchmarks/rotation_cpu.py`: median µs per call.", "",
                 "| x shape | fast Walsh–Hadamard µs | matmul µs | speedup | max difference |",
                 "|---|---:|---:|---:|---:|"]
        lines += [f"| {' × '.join(map(str, r['shape']))} | {r['walsh_hadamard_us']:.0f} | {r['matmul_us']:.0f} | "
                  f"{r['speedup']:.1f}x | {r['max_difference']:.1e} |" for r in rows]
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
