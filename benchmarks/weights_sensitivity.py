"""Where TurboQuant weight compression loses perplexity: compress one kind of Linear layer, or one band of
layers, at a time (TQ4, groups of 64, everything else unchanged) and report the PPL change of each.

    python benchmarks/weights_sensitivity.py [--model smollm2] [--tokens 4096]
        [--out benchmarks/results/weights-sensitivity-smollm2]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json

import torch

from turboquant.hf.models import DEFAULT_MODEL, eval_text, load_model
from turboquant.weights import quantize_model
from weights_quality import perplexity, report

BITS, GROUP = 4, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    ids = tokenizer(eval_text(), return_tensors="pt").input_ids[:, : args.tokens]
    baseline = perplexity(model, ids)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    kinds = sorted({n.rsplit(".", 1)[1] for n in names})
    layers = model.config.num_hidden_layers
    bands = [(0, 1), (1, 3), (3, layers // 2), (layers // 2, layers - 3), (layers - 3, layers - 1),
             (layers - 1, layers)]

    def layer_of(name: str) -> int:
        return int(name.split(".layers.")[1].split(".")[0])

    selections = [(f"kind {k}", lambda n, k=k: n.endswith("." + k)) for k in kinds]
    selections += [(f"layers {lo}-{hi - 1}", lambda n, lo=lo, hi=hi: lo <= layer_of(n) < hi) for lo, hi in bands]
    rows = []
    for label, chosen in selections:
        keep = tuple(n for n in names if not chosen(n)) + ("lm_head",)
        ppl = perplexity(quantize_model(copy.deepcopy(model), BITS, GROUP, keep=keep, progress=False), ids)
        rows.append({"compressed": label, "layers": sum(map(chosen, names)), "perplexity": round(ppl, 4),
                     "change_pct": round(100 * (ppl / baseline - 1), 2)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"device": "cpu", "date": datetime.date.today().isoformat(), "model": args.model, "bits": BITS,
              "group_size": GROUP, "tokens": int(ids.shape[1]), "baseline_perplexity": round(baseline, 4), "rows": rows}
    lines = [f"# Weight compression sensitivity ({args.model}, TQ{BITS} g{GROUP}, CPU, {result['date']})", "",
             f"PPL over {result['tokens']} evaluation-text tokens, baseline {baseline:.3f}; only the named Linear "
             "layers compressed in each row.", "", "| compressed | Linear layers | PPL change |", "|---|---|---|"]
    lines += [f"| {r['compressed']} | {r['layers']} | {r['change_pct']:+.2f}% |" for r in rows]
    report(result, lines, args.out)


if __name__ == "__main__":
    main()
