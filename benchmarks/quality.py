"""Quality of TurboQuantCache on a real model: next-token agreement, perplexity, greedy divergence, passkey.

    python benchmarks/quality.py [--model smollm2] [--device cuda] [--rows all|NAME,NAME] [--out FILE]

Every row is teacher-forced on the shipped evaluation text through the decode path: prefill 256
tokens, then 1,024 single-token steps reading the cache. Agreement = 1 − mean total-variation
distance to the DynamicCache run's next-token distributions. Writes JSON (device, versions, date,
every cell) and prints a markdown table; `--table FILE.json` re-prints the table of a saved run.
Row `fp8-e4m3` is vLLM's fp8 KV cache (keys and values rounded to e4m3 as stored), for reference.
Rows `qjl-*` store keys with the prod code ((b−1)-bit MSE + 1-bit QJL sketch): the scores a kernel that
scores with the sketch would compute (`RECONSTRUCTED_ROWS`), beside `mse-*` rows built the same way.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from turboquant.core import TurboQuantConfig
from turboquant.hf.cache import TurboQuantCache, cache_kwargs, head_dim_of
from turboquant.hf.evaluate import compare_logits, decode_logits, greedy_divergence
from turboquant.hf.models import eval_text, load_model

PLAIN = dict(center_keys=False, center_values=False, norm_correction=False, sink_tokens=0, residual_window=0,
             boundary_layers=0)
PRESETS = ("k4v4", "k4v3", "k3v4", "k3v3", "k2v2")


def rows() -> dict[str, dict]:
    """name -> TurboQuantConfig kwargs. 'plain-*' is textbook TurboQuant (no centering, no norm
    correction, no full-precision tokens); '-w128-b1' rows are what a user gets from the preset."""
    table = {"plain-k4v4": dict(preset="k4v4", **PLAIN), "plain-k3v3": dict(preset="k3v3", **PLAIN)}
    for preset in PRESETS:
        for window in (128, 0):
            for norm_correction in (True, False):
                name = f"{preset}-w{window}" + ("" if norm_correction else "-nonc")
                extra = {} if window else dict(residual_window=0, sink_tokens=0)
                table[name] = dict(preset=preset, norm_correction=norm_correction, boundary_layers=0, **extra)
    for preset in ("k4v4", "k3v3"):  # first and last layer at 8 bits
        table[f"{preset}-w128-b1"] = dict(preset=preset, boundary_layers=1, boundary_bits=8)
    # what the vLLM backend stores (no sinks, no full-precision window; 8-bit first and last layers, its
    # `boundary_layers: 1` option), and the same with the latest 1, 16 or 128 tokens, or the first 4, kept
    # in full precision
    for window, sinks in ((0, 0), (1, 0), (16, 0), (32, 0), (64, 0), (128, 0), (0, 4), (16, 4), (32, 4)):
        for preset in ("k4v4", "k3v3"):
            table[f"{preset}-w{window}-s{sinks}-b1"] = dict(preset=preset, residual_window=window, sink_tokens=sinks,
                                                            boundary_layers=1, boundary_bits=8)
    # the vLLM backend's defaults exactly ('-w0' without centering), and with the latest W and first S
    # tokens kept full precision, as a vLLM window would keep them (it would not center)
    for window, sinks in ((0, 0), (16, 4), (32, 4)):
        for preset in ("k4v4", "k3v3"):
            name = f"{preset}-w{window}" + (f"-s{sinks}" if sinks else "") + "-c0"
            table[name] = dict(preset=preset, residual_window=window, sink_tokens=sinks, boundary_layers=0,
                               center_keys=False, center_values=False)
    table["k3v3-w128-out8"] = dict(preset="k3v3", key_outlier_channels=8, boundary_layers=0)
    table["k4v4-w128-out8"] = dict(preset="k4v4", key_outlier_channels=8, boundary_layers=0)
    return {**table, **RECONSTRUCTED_ROWS}


# vLLM's fp8 KV cache as it runs without calibrated scales (e4m3, scale 1): every key and value rounded
# to fp8 once, as it is stored. A baseline row beside ours, not a TurboQuantConfig.
FP8_ROW = "fp8-e4m3"


class Fp8Cache(DynamicCache):
    """A DynamicCache that rounds each new key and value to float8_e4m3fn (saturating) and back."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(_fp8(key_states), _fp8(value_states), layer_idx, *args, **kwargs)


def _fp8(x: torch.Tensor) -> torch.Tensor:
    limit = torch.finfo(torch.float8_e4m3fn).max
    return x.clamp(-limit, limit).to(torch.float8_e4m3fn).to(x.dtype)


# Rows that keep each key and value as its codec reconstruction in a DynamicCache, without centering,
# full-precision tokens or boundary layers (what the vLLM backend stores). With the prod key code (a
# (b−1)-bit MSE code + a 1-bit QJL sketch of the residual) the scores are what a kernel that scores with
# the sketch computes: a score is linear in the key, so ⟨q, x̂_mse + √(π/2)/d·‖r‖·Sᵀ·sign(S·r)⟩ is the
# sketch-corrected estimate itself. The 'mse-' rows check the simulation against TurboQuantCache's '-w0-c0'.
RECONSTRUCTED_ROWS = {f"{kind}-{preset}": dict(preset=preset, key_quantizer="prod" if kind == "qjl" else "mse",
                                               center_keys=False, center_values=False, sink_tokens=0,
                                               residual_window=0, boundary_layers=0)
                      for kind in ("mse", "qjl") for preset in ("k4v4", "k3v3")}


class ReconstructedCache(DynamicCache):
    """A DynamicCache that stores the codec's reconstruction of each new key and value; like
    TurboQuantCache, a call attends to its own tokens as they came."""

    def __init__(self, model_config, config: TurboQuantConfig, head_dim: int):
        super().__init__(config=model_config)
        self.codec, self.head_dim, self.quantizers = config, head_dim, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in self.quantizers:
            self.quantizers[layer_idx] = [self.codec.make_quantizer(role, self.head_dim, layer_idx)
                                          for role in ("key", "value")]
        stored = (_reconstructed(quantizer, x)
                  for quantizer, x in zip(self.quantizers[layer_idx], (key_states, value_states)))
        keys, values = super().update(*stored, layer_idx, *args, **kwargs)
        fresh = key_states.shape[2]
        return (torch.cat((keys[:, :, :-fresh], key_states), dim=2),
                torch.cat((values[:, :, :-fresh], value_states), dim=2))


def _reconstructed(quantizer, x: torch.Tensor) -> torch.Tensor:
    return quantizer.dequantize(quantizer.quantize(x)).to(x.dtype)


def make_cache(model, name: str, config: TurboQuantConfig | None):
    """A fresh cache for row `name`: ours with `config`, a reconstructed row's, or the fp8 baseline (None)."""
    if config is None:
        return Fp8Cache(config=model.config)
    if name in RECONSTRUCTED_ROWS:
        return ReconstructedCache(model.config, config, head_dim_of(model.config))
    return TurboQuantCache(model.config, config)


def make_config(spec: dict) -> TurboQuantConfig:
    spec = dict(spec)
    return TurboQuantConfig.from_preset(spec.pop("preset"), **spec)


PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def passkey_prompt(tokenizer, context: int, depth: float, key: int) -> torch.Tensor:
    """A ~`context`-token haystack with 'The pass key is KEY.' at relative `depth`, then the question."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is"
    filler_tokens = len(tokenizer(PASSKEY_FILLER).input_ids)
    budget = context - len(tokenizer(needle + question).input_ids) - 8
    repeats = max(1, budget // filler_tokens)
    before = int(repeats * depth)
    text = PASSKEY_FILLER * before + needle + PASSKEY_FILLER * (repeats - before) + question
    return tokenizer(text, return_tensors="pt").input_ids


@torch.no_grad()
def passkey_accuracy(model, tokenizer, make_cache, contexts=(1024, 2048, 4096, 8000), depths=5) -> dict:
    rng = random.Random(0)
    result = {}
    for context in contexts:
        hits = 0
        for d in range(depths):
            key = rng.randrange(10000, 99999)
            ids = passkey_prompt(tokenizer, context, d / max(depths - 1, 1), key).to(model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, make_cache()),
                                 max_new_tokens=8, do_sample=False)
            hits += str(key) in tokenizer.decode(out[0, ids.shape[1]:])
        result[str(context)] = hits / depths
    return result


GREEDY_PROMPTS = [
    "Write a short story about a lighthouse keeper.", "Explain how a refrigerator works.",
    "What are the main causes of the French Revolution?", "Give me three tips for learning a new language.",
    "Describe the water cycle to a ten-year-old.", "Why do cats purr?", "Summarize the plot of Hamlet.",
    "How do vaccines train the immune system?", "Write a haiku about autumn and explain it.",
    "What is the difference between weather and climate?",
]


def greedy_rows(model, tokenizer, make_cache, new_tokens=128) -> dict:
    firsts, identical = [], 0
    for text in GREEDY_PROMPTS:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(chat, return_tensors="pt").input_ids.to(model.device)
        first, same = greedy_divergence(model, ids, new_tokens, make_cache)
        firsts.append(first)
        identical += same
    return {"mean_first_divergence": sum(firsts) / len(firsts), "identical": identical, "prompts": len(firsts),
            "new_tokens": new_tokens, "first_divergence": firsts}


def markdown(result: dict) -> str:
    lines = [f"Quality on {result['model']} ({result['device']}, {result['date']}): prefill {result['prefill']}, "
             f"{result['decode_tokens']} teacher-forced decode steps; baseline PPL {result['baseline_perplexity']:.3f}.", "",
             "| row | bytes/token/head | agreement | top-1 | PPL change | greedy first divergence (identical/10) | passkey 1K/2K/4K/8K |",
             "|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        greedy = row.get("greedy")
        greedy_cell = f"{greedy['mean_first_divergence']:.1f} ({greedy['identical']})" if greedy else ""
        passkey = row.get("passkey")
        passkey_cell = "/".join(f"{v:.0%}" for v in passkey.values()) if passkey else ""
        lines.append(f"| {name} | {row['bytes_per_token_per_head']} | {row['agreement']:.2%} | {row['top1_match']:.2%} | "
                     f"{row['perplexity_change']:+.2%} | {greedy_cell} | {passkey_cell} |")
    if "baseline_passkey" in result:
        lines.append(f"| DynamicCache | {result['bf16_bytes_per_token_per_head']} | 100% | 100% | 0 | | "
                     + "/".join(f"{v:.0%}" for v in result["baseline_passkey"].values()) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", default="all", help="comma-separated row names, or 'all'")
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=1024)
    parser.add_argument("--extras", default="k4v4-w128-b1,k3v3-w128-b1",
                        help="rows that also get greedy and passkey runs")
    parser.add_argument("--no-passkey", action="store_true", help="extras rows get the greedy runs only")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality-<model>.json)")
    parser.add_argument("--table", default=None, help="print the markdown table of a saved JSON and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return 0

    table = rows()
    names = list(table) if args.rows == "all" else args.rows.split(",")
    unknown = [n for n in names if n not in table and n != FP8_ROW]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(table)}, {FP8_ROW}")
    model, tokenizer = load_model(args.model, device=args.device)
    ids = tokenizer(eval_text(), return_tensors="pt").input_ids[:, : args.prefill + args.decode_tokens].to(args.device)
    targets = ids[0, args.prefill:]
    start = time.time()
    baseline = decode_logits(model, ids, args.prefill, progress="DynamicCache")
    head_dim = head_dim_of(model.config)
    result = {
        "model": args.model, "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "python": sys.version.split()[0],
        "prefill": args.prefill, "decode_tokens": int(targets.numel()), "head_dim": head_dim,
        "bf16_bytes_per_token_per_head": 4 * head_dim,
        "baseline_perplexity": compare_logits(baseline, baseline, targets).baseline_perplexity, "rows": {},
    }
    extras = set(args.extras.split(",")) if args.extras else set()
    if extras & set(names) and not args.no_passkey:
        result["baseline_passkey"] = passkey_accuracy(model, tokenizer, lambda: None)
    out = Path(args.out or f"benchmarks/results/quality-{args.model.replace('/', '_')}.json")
    for name in names:
        config = None if name == FP8_ROW else make_config(table[name])
        fresh_cache = functools.partial(make_cache, model, name, config)
        logits = decode_logits(model, ids, args.prefill, fresh_cache(), progress=name)
        agreement = compare_logits(baseline, logits, targets)
        row = {"config": "fp8 e4m3, scale 1" if config is None else table[name],
               "bytes_per_token_per_head": 2 * head_dim if config is None
               else config.bytes_per_token_per_head(head_dim),
               "agreement": agreement.agreement, "top1_match": agreement.top1_match,
               "perplexity": agreement.perplexity, "perplexity_change": agreement.perplexity_change}
        if name in extras:
            row["greedy"] = greedy_rows(model, tokenizer, fresh_cache)
            if not args.no_passkey:
                row["passkey"] = passkey_accuracy(model, tokenizer, fresh_cache)
        result["rows"][name] = row
        print(f"{name}: agreement {row['agreement']:.4f}, PPL {row['perplexity_change']:+.2%} "
              f"({time.time() - start:.0f}s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
