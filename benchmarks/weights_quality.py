"""Perplexity of TurboQuant-compressed weights on the shipped evaluation text (CPU, fp32 compute).

Every nn.Linear but the output head is replaced by a `TQLinear` (embeddings and lm_head unchanged); PPL
over the first `--tokens` tokens in non-overlapping 1024-token windows, against the unquantized model.
Rows "rtnB:G" are the round-to-nearest baseline at the same bits: asymmetric min/max per group of G with
an fp16 scale and zero (B + 32/G bits per weight), applied in place. Rows "ktB:G" are TurboQuant with the
kurtosis rule (`turboquant.weights.HEAVY_TAIL`: heavy-tailed tensors at 4 bits or kept in 16 bits).

    python benchmarks/weights_quality.py --out benchmarks/results/weights-smollm2
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math

import torch

from turboquant.hf.models import DEFAULT_MODEL, eval_text, load_model
from turboquant.weights import HEAVY_TAIL, TQLinear, quantize_model

WINDOW = 1024


def perplexity(model, ids: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[1] - 1, WINDOW):
            window = ids[:, start:start + WINDOW]
            if window.shape[1] < 2:
                break
            logits = model(window).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    return math.exp(total / count)


def round_to_nearest(model, bits: int, group_size: int):
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                groups = module.weight.float().view(module.out_features, -1, group_size)
                low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
                step = (high - low).clamp_min(1e-8) / (2 ** bits - 1)
                levels = ((groups - low) / step).round().clamp(0, 2 ** bits - 1)
                module.weight.copy_((levels * step + low).view_as(module.weight))
    return model


def average_bits(model) -> float:
    """Bits per weight over the Linear layers but the head: codes + one fp16 norm per group, 16 if kept."""
    total = count = 0
    for name, module in model.named_modules():
        if isinstance(module, TQLinear):
            numel = module.in_features * module.out_features
            total, count = total + numel * (module.bits + 16 / module.group_size), count + numel
        elif isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            total, count = total + 16 * module.weight.numel(), count + module.weight.numel()
    return total / count


def report(result: dict, lines: list[str], out: str | None) -> None:
    """Print the markdown table; with `out`, also write OUT.json (every cell) and OUT.md."""
    print("\n".join(lines))
    if out:
        with open(out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rows", default="4:64,3:64,4:192,3:192,rtn4:64,rtn3:64",
                        help="comma list of bits:group_size (TurboQuant), ktBITS:group_size (with the kurtosis "
                             "rule) or rtnBITS:group_size (baseline)")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    ids = tokenizer(eval_text(), return_tensors="pt").input_ids[:, :args.tokens]
    baseline = perplexity(model, ids)
    rows = []
    for row in args.rows.split(","):
        method = {"rtn": "rtn", "kt": "turboquant+kurtosis"}.get(row.rstrip("0123456789:"), "turboquant")
        bits, group_size = map(int, row.lstrip("rtnk").split(":"))
        if method == "rtn":
            quantized, linear_bits = round_to_nearest(copy.deepcopy(model), bits, group_size), bits + 32 / group_size
        else:  # indices + one fp16 norm per group
            heavy_tail = HEAVY_TAIL if method == "turboquant+kurtosis" else None
            quantized = quantize_model(copy.deepcopy(model), bits, group_size, heavy_tail=heavy_tail)
            linear_bits = average_bits(quantized)
        ppl = perplexity(quantized, ids)
        rows.append({"method": method, "bits": bits, "group_size": group_size, "perplexity": round(ppl, 4),
                     "change_pct": round(100 * (ppl / baseline - 1), 2), "bits_per_weight": round(linear_bits, 3)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"device": "cpu", "date": datetime.date.today().isoformat(), "model": args.model,
              "tokens": int(ids.shape[1]), "baseline_perplexity": round(baseline, 4), "rows": rows}
    lines = [f"# Weight compression quality ({args.model}, CPU, {result['date']})", "",
             f"PPL over {result['tokens']} tokens of the evaluation text; baseline {baseline:.3f}. "
             "Every Linear but lm_head compressed; embeddings unchanged.", "",
             "| method | bits | group | bits/weight | PPL | change |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['bits']} | {r['group_size']} | {r['bits_per_weight']} | {r['perplexity']} | "
              f"{r['change_pct']:+.2f}% |" for r in rows]
    report(result, lines, args.out)


if __name__ == "__main__":
    main()
