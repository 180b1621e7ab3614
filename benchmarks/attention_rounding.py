"""How far fp16 operands move attention's output, measured where the kernel tests draw their inputs.

The attention kernels multiply fp16 operands with fp32 accumulation: the scaled query, the keys and the
values (in the rotated frame) and the probabilities. The tests compare them against an fp32 reference under
a fixed tolerance. Here those four roundings are emulated in fp64 on random inputs drawn as the tests draw
them (queries and values N(0, 1); cached keys with a per-channel spread and offset as
`tests/kernels/paged.filled_cache` draws them, a chunk's fresh keys N(0, key_scale²); causal). One run is one
test call: every head of every chunk. Per shape and key scale, the table gives the distribution over runs of
the worst |error| / (atol + rtol · |reference|) at atol = rtol = 1e-3, so a tolerance of t·1e-3 fails the runs
whose worst exceeds t.

A score's rounding error grows with |q|·|k|, and an output's with how much the values of keys of similar
weight cancel; keys of twice the norm double the first. These four roundings, applied by hand with the
codec's own rotation to the inputs of the one call where CI failed (test_extend_matches_reference, d=128
k3v4, seed 1678669759), gave the Triton extend kernel's output there: -0.0394808635 against its
-0.0394808650, the fp32 reference being -0.0438736.

    python benchmarks/attention_rounding.py [--runs 2000] [--out benchmarks/results/attention-rounding-cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

# (test, head_dim, q heads, kv heads, [(prefix, chunk)], the chunk's fresh keys' scale): test_extend's and
# test_extend_hopper's calls (and d=128 at unit keys), and calls that read every key from the cache (None)
SHAPES = [
    ("test_extend", 64, 8, 2, [(90, 21), (0, 70), (33, 1)], 2.0),
    ("test_extend", 128, 16, 2, [(90, 21), (0, 70), (33, 1)], 2.0),
    ("test_extend", 256, 8, 2, [(90, 21), (0, 70), (33, 1)], 2.0),
    ("test_extend", 128, 16, 2, [(90, 21), (0, 70), (33, 1)], 1.0),
    ("test_extend_hopper", 128, 32, 8, [(700, 37), (5, 3), (0, 100), (130, 1)], 2.0),
    ("test_extend_hopper", 256, 16, 8, [(700, 37), (5, 3), (0, 100), (130, 1)], 2.0),
    ("test_cached_attention", 128, 16, 2, [(90, 21), (0, 70), (33, 1)], None),
    ("test_cached_attention", 80, 6, 1, [(90, 21), (0, 70), (33, 1)], None),
    ("test_decode", 128, 32, 4, [(149, 1), (0, 1), (63, 1), (96, 1)], None),
    ("test_decode", 256, 8, 2, [(149, 1), (0, 1), (63, 1), (96, 1)], None),
]
TOLERANCES = (4, 8)  # in units of 1e-3: the tests' 4e-3, and twice it


def fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float64)


def attention(query, keys, values, rotation, prefix: int, rounded: bool) -> torch.Tensor:
    """query [group, chunk, d] against keys/values [prefix + chunk, d], causal, in fp64; `rounded`: the
    kernels' fp16 operands (rotated query · scale · log2 e, rotated keys and values, probabilities)."""
    round_ = fp16 if rounded else (lambda x: x)
    d = query.shape[-1]
    scores = round_(query @ rotation.T * (d**-0.5 * 1.4426950408889634)) @ round_(keys @ rotation.T).T
    chunk, total = query.shape[1], keys.shape[0]
    visible = torch.arange(total)[None, :] <= prefix + torch.arange(chunk)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.exp2(scores - scores.amax(-1, keepdim=True))
    weighted = round_(probs.float().double()) @ round_(values @ rotation.T)
    return weighted / probs.sum(-1, keepdim=True) @ rotation


def worst_ratio(head_dim, q_heads, kv_heads, chunks, fresh_key_scale, generator) -> float:
    """One test call's worst |error| / (1e-3 + 1e-3 · |reference|). Cached keys are drawn as `filled_cache`
    draws them (one spread per channel); a chunk's keys too where `fresh_key_scale` is None."""
    rotation, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64))
    spread = torch.rand(head_dim, generator=generator, dtype=torch.float64) * 3
    worst = 0.0
    for prefix, chunk in chunks:
        for _ in range(kv_heads):
            keys = torch.randn(prefix + chunk, head_dim, generator=generator, dtype=torch.float64)
            cached = prefix if fresh_key_scale is not None else prefix + chunk
            keys[:cached] = keys[:cached] * spread + 0.5
            keys[cached:] *= fresh_key_scale or 1.0
            values = torch.randn(prefix + chunk, head_dim, generator=generator, dtype=torch.float64)
            query = torch.randn(q_heads // kv_heads, chunk, head_dim, generator=generator, dtype=torch.float64)
            exact = attention(query, keys, values, rotation, prefix, False)
            error = attention(query, keys, values, rotation, prefix, True) - exact
            worst = max(worst, (error.abs() / (1e-3 + 1e-3 * exact.abs())).max().item())
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000, help="test calls per shape (default: %(default)s)")
    parser.add_argument("--out", help="also write the rows as JSON here (and a markdown table beside it)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be positive")
    rows = []
    for index, (test, head_dim, q_heads, kv_heads, chunks, fresh_key_scale) in enumerate(SHAPES):
        generator = torch.Generator().manual_seed(index)
        ratios = torch.tensor([worst_ratio(head_dim, q_heads, kv_heads, chunks, fresh_key_scale, generator)
                               for _ in range(args.runs)])
        row = {"test": test, "head_dim": head_dim, "q_heads": q_heads, "kv_heads": kv_heads,
               "chunks": chunks, "fresh_key_scale": fresh_key_scale, "runs": args.runs,
               "median": ratios.median().item(), "p99": ratios.quantile(0.99).item(), "max": ratios.max().item(),
               **{f"fail_at_{t}e-3": (ratios > t).double().mean().item() for t in TOLERANCES}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        meta = {"date": datetime.date.today().isoformat(), "device": platform.processor() or platform.machine(),
                "torch": torch.__version__, "unit": "worst |error| / (1e-3 + 1e-3 |reference|) per run"}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        lines = [f"# fp16 operands' error at the kernel tests' inputs ({meta['date']}, CPU emulation in fp64, "
                 f"`python benchmarks/attention_rounding.py --runs {args.runs}`)", "",
                 "Worst |error| / (1e-3 + 1e-3·|reference|) of one test call; a tolerance of t·1e-3 fails the "
                 "runs above t.", "",
                 "| test | d | q/kv heads | chunk's keys | median | p99 | max | "
                 + " | ".join(f"runs > {t}" for t in TOLERANCES) + " |",
                 "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(TOLERANCES)]
        for row in rows:
            scale = row["fresh_key_scale"]
            keys = "cached" if scale is None else f"fresh, {scale:g} · N(0, 1)"
            lines.append(f"| {row['test']} | {row['head_dim']} | {row['q_heads']}/{row['kv_heads']} | {keys} | "
                         f"{row['median']:.2f} | {row['p99']:.2f} | {row['max']:.2f} | "
                         + " | ".join(f"{row[f'fail_at_{t}e-3']:.2%}" for t in TOLERANCES) + " |")
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
