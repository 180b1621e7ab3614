"""Fidelity inside vLLM, teacher-forced through the KV cache, against the bf16 backend.

For each of N prompts (consecutive 640-token pieces of the shipped evaluation text): send the 512-token
prefix P (it fills the prefix cache), then P + 128 continuation tokens with `prompt_logprobs=20` and
`skip_reading_prefix_cache=False`, so the continuation positions attend to P *read from the KV cache*.
Agreement = 1 − mean total-variation distance between an engine's and bf16's next-token distributions
over the union of their top-20 tokens (a token outside an engine's top 20 has probability 0 there).
Also greedy: 20 prompts × 64 tokens, identical outputs and mean first divergence vs bf16.

    python benchmarks/vllm_fidelity.py --model /tmp/models/smollm2 --out benchmarks/results/vllm-fidelity-h100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vllm_engines import ENGINES, engine_kwargs, report, run_engine  # noqa: E402

PREFIX_TOKENS, CONTINUATION_TOKENS, TOP = 512, 128, 20
GREEDY_PROMPTS, GREEDY_PROMPT_TOKENS, GREEDY_TOKENS = 20, 128, 64
DEFAULT_ENGINES = ["bf16", "fp8", "upstream-turboquant_4bit_nc", "upstream-turboquant_3bit_nc",
                   "ours-k4v4", "ours-k4v4-b1", "ours-k3v3", "ours-k3v3-b1"]


def text_tokens(tokenizer) -> list[int]:
    from turboquant.hf.models import eval_text
    return tokenizer(eval_text(), add_special_tokens=False).input_ids


def worker(name: str, model: str, num_prompts: int) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, enable_prefix_caching=True, gpu_memory_utilization=0.4, max_model_len=2048, seed=0,
              enforce_eager=True, **engine_kwargs(name))
    tokens = text_tokens(llm.get_tokenizer())
    piece = PREFIX_TOKENS + CONTINUATION_TOKENS
    if len(tokens) < num_prompts * piece:
        raise SystemExit(f"the evaluation text has {len(tokens)} tokens, {num_prompts * piece} needed")
    distributions = []
    for i in range(num_prompts):
        full = tokens[i * piece:(i + 1) * piece]
        llm.generate({"prompt_token_ids": full[:PREFIX_TOKENS]}, SamplingParams(max_tokens=1), use_tqdm=False)
        params = SamplingParams(max_tokens=1, prompt_logprobs=TOP, skip_reading_prefix_cache=False)
        out = llm.generate({"prompt_token_ids": full}, params, use_tqdm=False)[0]
        positions, returned = {}, out.prompt_logprobs or []
        offset = len(full) - len(returned)  # with a prefix-cache hit, vLLM may leave the cached positions out
        for index, logprobs in enumerate(returned):
            position = offset + index
            if logprobs is not None and position >= PREFIX_TOKENS:
                positions[position] = {str(t): lp.logprob for t, lp in logprobs.items()}
        distributions.append(positions)
    greedy = []
    stride = len(tokens) // GREEDY_PROMPTS
    prompts = [{"prompt_token_ids": tokens[i * stride:i * stride + GREEDY_PROMPT_TOKENS]} for i in range(GREEDY_PROMPTS)]
    for out in llm.generate(prompts, SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True),
                            use_tqdm=False):
        greedy.append(list(out.outputs[0].token_ids))
    print("RESULT " + json.dumps({"distributions": distributions, "greedy": greedy}), flush=True)


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(math.exp(p.get(t, -math.inf)) - math.exp(q.get(t, -math.inf))) for t in set(p) | set(q))


def compare(reference: dict, row: dict) -> dict:
    distances, prompt_positions = [], []
    for ref_positions, positions in zip(reference["distributions"], row["distributions"]):
        shared = sorted(set(ref_positions) & set(positions))
        prompt_positions.append(len(shared))
        distances += [total_variation(ref_positions[p], positions[p]) for p in shared]
    divergence = []
    for ref_tokens, tokens in zip(reference["greedy"], row["greedy"]):
        first = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), len(ref_tokens))
        divergence.append(first)
    return {
        "agreement_pct": round(100 * (1 - sum(distances) / len(distances)), 2) if distances else None,
        "positions_compared": len(distances),
        "min_positions_per_prompt": min(prompt_positions) if prompt_positions else 0,
        "greedy_identical": sum(d == GREEDY_TOKENS for d in divergence),
        "greedy_mean_first_divergence": round(sum(divergence) / len(divergence), 1) if divergence else None,
    }


def markdown(result: dict) -> str:
    lines = [f"# vLLM fidelity through the KV cache ({result['device']}, {result['date']})", "",
             f"Model `{result['model']}`; {result['num_prompts']} prompts × {CONTINUATION_TOKENS} teacher-forced "
             f"positions after a cached {PREFIX_TOKENS}-token prefix; greedy: {GREEDY_PROMPTS} prompts × "
             f"{GREEDY_TOKENS} tokens. Reference: bf16 (FLASH_ATTN). Engines run eager (enforce_eager), "
             "gpu_memory_utilization 0.4.", "",
             "| engine | agreement vs bf16 | positions | greedy identical | mean first divergence | KV tokens |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if row.get("rc") != 0:
            lines.append(f"| {row['engine']} | failed (rc {row.get('rc')}) | | | | |")
            continue
        lines.append(f"| {row['engine']} | {row['agreement_pct']}% | {row['positions_compared']} | "
                     f"{row['greedy_identical']}/{GREEDY_PROMPTS} | {row['greedy_mean_first_divergence']} | "
                     f"{row.get('kv_tokens', 0):,} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/models/smollm2", help="HF model directory (real weights)")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"comma list from {sorted(ENGINES)}")
    parser.add_argument("--prompts", type=int, default=12, help="teacher-forced prompts (default 12)")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per engine")
    parser.add_argument("--raw-dir", help="keep each engine's raw output here and reuse it on the next run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.prompts)
    names = ["bf16"] + [name for name in args.engines.split(",") if name != "bf16"]  # the reference first, once
    raw = {}
    for name in names:
        saved = os.path.join(args.raw_dir, f"{name}-{args.prompts}.json") if args.raw_dir else None
        if saved and os.path.exists(saved):
            raw[name] = json.load(open(saved))
            continue
        raw[name] = run_engine(__file__, name, ["--model", args.model, "--prompts", str(args.prompts)], args.timeout)
        print(name, "rc", raw[name]["rc"], *raw[name].get("error_tail", [])[-3:], flush=True)
        if saved and raw[name]["rc"] == 0:
            os.makedirs(args.raw_dir, exist_ok=True)
            json.dump(raw[name], open(saved, "w"))
    reference, rows = raw["bf16"], []
    for name in names:
        row = {k: v for k, v in raw[name].items() if k not in ("distributions", "greedy")}
        if row["rc"] == 0 and reference["rc"] == 0:
            row.update(compare(reference, raw[name]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    report(rows, markdown, args.out, model=args.model, num_prompts=args.prompts)


if __name__ == "__main__":
    main()
