"""Portability matrix, vLLM part (GPU host): every architecture of `portability.py`, as the same small
random config written to a model directory, served by vLLM with dummy weights — bf16 (vLLM's default
backend) beside ours (`--attention-backend CUSTOM`, the plugin's default preset). A cell is "serves"
(a 300-token prompt, then the same prompt again from the prefix cache, each → 16 greedy tokens) or
"refused" with the first line of the error the engine stopped with; our refusals must name turboquant.
Greedy tokens equal to bf16's are reported, not gated: dummy weights give near-flat distributions.
Vision-language models run their language tower only (`language_model_only`).

    python benchmarks/vllm_portability.py --out benchmarks/results/vllm-portability-h100 [--only llama-3.1,gemma-2]

Needs the offline vLLM bundle and this package's entry point (as `vllm_throughput.py`); transformers must
know each config's model type, so an architecture newer than the host's transformers is a "not built" row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile

from portability import ARCHITECTURES, VOCAB  # benchmarks/portability.py
from vllm_engines import engine_kwargs, report, run_engine

PROMPT, NEW_TOKENS, MAX_MODEL_LEN = 300, 16, 2048
DEFAULT_ENGINES = ["bf16-auto", "ours-k4v4"]


def write_model(name: str, directory: str) -> str:
    """The architecture's config (with the class vLLM resolves it by) as `directory`/config.json."""
    import transformers as tf

    config = ARCHITECTURES[name][1]()
    for auto in (tf.AutoModelForCausalLM, tf.AutoModelForImageTextToText):
        model_class = auto._model_mapping.get(type(config), None)
        if model_class is not None:
            config.architectures = [model_class.__name__]
            break
    config.save_pretrained(directory)
    return directory


def worker(engine: str, model: str) -> None:
    from vllm import LLM, SamplingParams

    with open(os.path.join(model, "config.json")) as f:  # written by write_model
        multimodal = "vision_config" in json.load(f)
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True, seed=0,
              max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=0.2, enable_prefix_caching=True,
              **({"language_model_only": True} if multimodal else {}), **engine_kwargs(engine))
    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randrange(1, VOCAB) for _ in range(PROMPT)]}
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    first, cached = (list(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids) for _ in range(2))
    print("RESULT " + json.dumps({"tokens": first, "tokens_from_prefix_cache": cached}), flush=True)


def cell(row: dict) -> str:
    if row.get("rc") == 0:
        return "serves"
    causes = row.get("error_causes") or row.get("error_tail") or ["?"]
    return f"refused: {causes[-1].strip()[:200]}"


def markdown(result: dict) -> str:
    lines = [f"# Portability, vLLM path ({result['device']}, {result['date']})", "",
             f"Small random configs (`benchmarks/portability.py`), dummy weights, eager; a {PROMPT}-token prompt "
             f"twice (the second from the prefix cache) → {NEW_TOKENS} greedy tokens each. Ours: the plugin's "
             "defaults.", "",
             "| architecture | layout | bf16 | ours | greedy tokens = bf16's |", "|---|---|---|---|---|"]
    for name, rows in result["architectures"].items():
        if "not_built" in rows:
            lines.append(f"| {name} | {ARCHITECTURES[name][0]} | not built: {rows['not_built']} | | |")
            continue
        bf16, ours = rows.get("bf16-auto", {}), rows.get("ours-k4v4", {})
        same = "—"
        if bf16.get("tokens") and ours.get("tokens"):
            same = f"{sum(a == b for a, b in zip(bf16['tokens'], ours['tokens']))}/{NEW_TOKENS}"
        lines.append(f"| {name} | {ARCHITECTURES[name][0]} | {cell(bf16) if bf16 else '—'} | "
                     f"{cell(ours) if ours else '—'} | {same} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma list from {list(ARCHITECTURES)}")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES))
    parser.add_argument("--merge", help="a previous OUT.json whose cells are kept unless re-measured here")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per engine start and run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model)
    names = args.only.split(",") if args.only else list(ARCHITECTURES)
    unknown = sorted(set(names) - set(ARCHITECTURES))
    if unknown:
        parser.error(f"unknown architecture(s) {unknown}; choose from {list(ARCHITECTURES)}")
    previous = json.load(open(args.merge))["architectures"] if args.merge and os.path.exists(args.merge) else {}
    architectures = dict(previous)
    for name in names:
        with tempfile.TemporaryDirectory() as directory:
            try:
                write_model(name, directory)
            except Exception as error:  # noqa: BLE001 - the matrix records what this transformers cannot build
                architectures[name] = {"not_built": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
                continue
            rows = dict(previous.get(name, {}))
            rows.pop("not_built", None)
            for engine in args.engines.split(","):
                rows[engine] = run_engine(__file__, engine, ["--model", directory], args.timeout)
                print(json.dumps({"architecture": name, **rows[engine]})[:600], flush=True)
            architectures[name] = rows
    report([], markdown, args.out, architectures=architectures)


if __name__ == "__main__":
    main()
