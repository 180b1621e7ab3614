"""Greedy generation speed on the CPU with the embedded model, as `make demo` runs it: DynamicCache against
TurboQuantCache in its default (incremental) mode, side by side in one run, each timed `--repeats` times
(median). Output tokens per second over the whole `generate` (prefill included).

    python benchmarks/hf_cpu_generate.py [--preset k4v4] [--new-tokens 96] [--repeats 5] [--out FILE]

The prompt is the demo's: a passage of the evaluation text longer than the full-precision window, so
every decode step compresses a token in each layer.
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
import transformers
from transformers import DynamicCache

from turboquant.cli import demo_prompt
from turboquant.core import TurboQuantConfig
from turboquant.hf.cache import TurboQuantCache, cache_kwargs
from turboquant.hf.models import load_model


def demo_inputs(tokenizer) -> dict:
    """`turboquant demo`'s prompt, chat-formatted as `turboquant generate` sends it."""
    messages = [{"role": "user", "content": demo_prompt()}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="k4v4")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hf-cpu-generate.json"))
    args = parser.parse_args()
    if args.repeats < 1 or args.new_tokens < 1:
        parser.error("--repeats and --new-tokens must be positive")
    model, tokenizer = load_model("smollm2")
    inputs = demo_inputs(tokenizer)
    config = TurboQuantConfig.from_preset(args.preset)
    caches = {"DynamicCache": lambda: DynamicCache(config=model.config),
              f"TurboQuantCache {args.preset}": lambda: TurboQuantCache(model.config, config)}
    runs = {name: [] for name in caches}
    for _ in range(args.repeats):  # alternated, so a slower stretch of the machine hits both
        for name, make_cache in caches.items():
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**inputs, **cache_kwargs(model, make_cache()), max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False)
            runs[name].append((out.shape[1] - inputs.input_ids.shape[1]) / (time.perf_counter() - start))
    rows = {name: {"tok_s": round(statistics.median(tok_s), 2), "tok_s_runs": [round(t, 2) for t in tok_s]}
            for name, tok_s in runs.items()}
    result = {"device": platform.processor() or "cpu", "threads": torch.get_num_threads(),
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "transformers": transformers.__version__, "prompt_tokens": inputs.input_ids.shape[1],
              "new_tokens": args.new_tokens, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    base = rows["DynamicCache"]["tok_s"]
    lines = [f"CPU generate, SmolLM2-135M (fp32), {result['prompt_tokens']}-token demo prompt, {args.new_tokens} new "
             f"tokens, median of {args.repeats} ({result['date']}, {result['threads']} threads, torch "
             f"{result['torch']})", "", "| cache | tok/s | × DynamicCache | runs |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {row['tok_s']} | {row['tok_s'] / base:.2f}x | {', '.join(map(str, row['tok_s_runs']))} |"
              for name, row in rows.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
