"""Portability matrix, vLLM part (GPU host): every architecture of `portability.py`, as the same small
random config written to a model directory, served by vLLM with dummy weights — bf16 (vLLM's default
backend) beside ours (`--attention-backend CUSTOM`, the plugin's default preset). A cell is "serves"
(a 300-token prompt, then the same prompt again from the prefix cache, each → 16 greedy tokens) or
"refused" with the first line of the error the engine stopped with; our refusals must name turboquant.
Greedy tokens equal to bf16's are reported, not gated: dummy weights give near-flat distributions.

Vision-language models run their language tower only (`language_model_only`: the slim bundle has no
processor for these random configs) and take a second, long prompt: 11,236 image-placeholder token ids
(a 106 × 106 patch grid, one Molmo2 clip's worth) then 20 text tokens → 16 greedy tokens. The cache
holds those tokens exactly as it would hold the vision tower's features; its memory report is checked:
each engine gets a fixed KV budget, and vLLM's reported KV tokens must equal that budget over the
expected page bytes (layers × KV heads × bytes per token·head, rounded down to whole blocks).

    python benchmarks/vllm_portability.py --out benchmarks/results/vllm-portability-h200 [--only llama-3.1,gemma-2]
        [--resume benchmarks/results/vllm-portability-h200.json]  # continue a run that stopped early

Needs the offline vLLM bundle and this package's entry point (as `vllm_throughput.py`); transformers must
know each config's model type, so an architecture newer than the host's transformers is a "not built" row.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import re
import tempfile

from portability import ARCHITECTURES, VOCAB  # benchmarks/portability.py
from vllm_engines import ENGINES, engine_kwargs, report, run_engine

PROMPT, NEW_TOKENS, MAX_MODEL_LEN = 300, 16, 2048
IMAGE_TOKENS, IMAGE_TOKEN_ID, TEXT_AFTER_IMAGE = 106 * 106, VOCAB - 1, 20
VLM_MAX_MODEL_LEN = 12288
# A fixed KV budget per engine: several engines share the GPU at once (--parallel), and vLLM's memory
# profiling would count a neighbour's allocations as its own.
KV_BYTES, GPU_FRACTION, BLOCK_SIZE = 1 << 30, 0.08, 16
DEFAULT_ENGINES = ["bf16-auto", "ours-k4v4"]


def write_model(name: str, directory: str) -> dict:
    """The architecture's config (with the class vLLM resolves it by) as `directory`/config.json; a
    vision-language config gets an in-vocabulary image token and room for the long prompt."""
    import transformers as tf

    config = ARCHITECTURES[name][1]()
    multimodal = hasattr(config, "vision_config")  # the whole model's class (Mllama also maps to its text tower)
    autos = (tf.AutoModelForCausalLM, tf.AutoModelForImageTextToText)
    for auto in reversed(autos) if multimodal else autos:
        model_class = auto._model_mapping.get(type(config), None)
        if model_class is not None:
            config.architectures = [model_class.__name__]
            break
    if multimodal:
        config.image_token_id = config.image_token_index = IMAGE_TOKEN_ID
        config.get_text_config().max_position_embeddings = VLM_MAX_MODEL_LEN
    config.save_pretrained(directory)
    return config.to_dict()


def expected_token_bytes(config: dict, engine: str) -> int | None:
    """KV bytes per token over all layers of a uniform full-attention model, or None."""
    text = config.get("text_config", config)
    if text.get("sliding_window") or "kv_lora_rank" in text:
        return None
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    layers, kv_heads = text["num_hidden_layers"], text.get("num_key_value_heads") or text["num_attention_heads"]
    if ENGINES[engine].get("attention_backend") != "CUSTOM":
        return layers * kv_heads * 2 * head_dim * 2  # bf16 K and V
    from turboquant.vllm.settings import VllmSettings

    settings = VllmSettings.from_additional_config(ENGINES[engine]["additional_config"])
    return sum(kv_heads * settings.layer_config(i, layers, head_dim).bytes_per_token_per_head(head_dim)
               for i in range(layers))


def worker(engine: str, model: str) -> None:
    from vllm import LLM, SamplingParams

    with open(os.path.join(model, "config.json")) as f:  # written by write_model
        multimodal = "vision_config" in json.load(f)
    options = dict(max_model_len=MAX_MODEL_LEN, enable_prefix_caching=True, **engine_kwargs(engine))
    if multimodal:  # the memory check needs a known block size (MLA backends keep their own)
        options.update(language_model_only=True, max_model_len=VLM_MAX_MODEL_LEN, block_size=BLOCK_SIZE)
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True, seed=0,
              gpu_memory_utilization=GPU_FRACTION, kv_cache_memory_bytes=KV_BYTES, **options)
    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randrange(1, IMAGE_TOKEN_ID) for _ in range(PROMPT)]}
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    first, cached = (list(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids) for _ in range(2))
    result = {"tokens": first, "tokens_from_prefix_cache": cached}
    if multimodal:
        image_prompt = {"prompt_token_ids": [IMAGE_TOKEN_ID] * IMAGE_TOKENS
                        + [rng.randrange(1, IMAGE_TOKEN_ID) for _ in range(TEXT_AFTER_IMAGE)]}
        output = llm.generate([image_prompt], params, use_tqdm=False)[0]
        result.update(image_prompt_tokens=len(output.prompt_token_ids),
                      image_prompt_output=list(output.outputs[0].token_ids))
    print("RESULT " + json.dumps(result), flush=True)


def check_memory(row: dict, token_bytes: int | None) -> None:
    """Record vLLM's KV tokens against the budget's expected tokens (whole blocks of `token_bytes`)."""
    if token_bytes is None or "kv_tokens" not in row:
        return
    row["expected_token_bytes"] = token_bytes
    row["expected_kv_tokens"] = KV_BYTES // (token_bytes * BLOCK_SIZE) * BLOCK_SIZE
    # vLLM prints int(blocks / blocks-per-request × max_model_len): a float product, exact to a token
    row["memory_report_matches"] = abs(row["kv_tokens"] - row["expected_kv_tokens"]) <= 1


# Lines that only wrap the error that stopped the engine (which an earlier line names)
WRAPPERS = re.compile(r"Engine core initialization failed|ValidationError|CalledProcessError|Error raised in "
                      r"subprocess|^\s*raise ")
LOG_PREFIX = re.compile(r"^(\(EngineCore[^)]*\)\s*)?(ERROR [\d-]+ [\d:]+ \[[^\]]*\]\s*)?")


def cell(row: dict) -> str:
    if row.get("rc") == 0:
        return "serves"
    causes = [LOG_PREFIX.sub("", line).strip() for line in row.get("error_causes") or row.get("error_tail") or ["?"]]
    causes = [line for line in causes if not WRAPPERS.search(line)] or causes
    return f"refused: {causes[-1][:200]}"


def markdown(result: dict) -> str:
    lines = [f"# Portability, vLLM path ({result['device']}, {result['date']})", "",
             f"Small random configs (`benchmarks/portability.py`), dummy weights, eager; a {PROMPT}-token prompt "
             f"twice (the second from the prefix cache) → {NEW_TOKENS} greedy tokens each. Ours: the plugin's "
             "defaults.", "",
             "| architecture | layout | bf16 | ours | greedy tokens = bf16's |", "|---|---|---|---|---|"]
    long_prompt = []
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
        for engine, row in rows.items():
            if "image_prompt_tokens" in row or "expected_kv_tokens" in row:
                long_prompt.append(
                    f"| {name} | {engine} | {row.get('image_prompt_tokens', '—')} | "
                    f"{len(row.get('image_prompt_output', []))} | {row.get('expected_token_bytes', '—')} | "
                    f"{row.get('kv_tokens', 0):,} | {row.get('expected_kv_tokens', 0):,} | "
                    f"{'yes' if row.get('memory_report_matches') else 'NO'} |")
    if long_prompt:
        lines += ["", f"Vision-language rows, long prompt: {IMAGE_TOKENS:,} image-placeholder tokens + "
                  f"{TEXT_AFTER_IMAGE} text tokens → {NEW_TOKENS} greedy tokens; KV budget {KV_BYTES / 2**30:g} GiB "
                  f"per engine, block size {BLOCK_SIZE}.", "",
                  "| architecture | engine | prompt tokens | generated | expected B/token | vLLM KV tokens | "
                  "expected KV tokens | memory report matches |", "|---|---|---|---|---|---|---|---|", *long_prompt]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma list from {list(ARCHITECTURES)}")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES))
    parser.add_argument("--resume", help="a previous OUT.json: its cells are kept and not run again")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--parallel", type=int, default=1,
                        help=f"engines run at once on the one GPU (each may take {GPU_FRACTION * 100:g} percent of it)")
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
    engines = args.engines.split(",")
    for engine in engines:
        engine_kwargs(engine)  # an unknown name stops here, before any engine starts
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    previous = json.load(open(args.resume))["architectures"] if args.resume and os.path.exists(args.resume) else {}
    architectures = dict(previous)
    with tempfile.TemporaryDirectory() as root, concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        cells = {}
        for index, name in enumerate(names):
            directory = os.path.join(root, str(index))
            try:
                config = write_model(name, directory)
            except Exception as error:  # noqa: BLE001 - the matrix records what this transformers cannot build
                architectures[name] = {"not_built": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
                continue
            architectures[name] = {k: v for k, v in previous.get(name, {}).items() if k != "not_built"}
            for engine in [e for e in engines if architectures[name].get(e, {}).get("rc", "timeout") == "timeout"]:
                future = pool.submit(run_engine, __file__, engine, ["--model", directory], args.timeout)
                checked = "vision_config" in config  # the rows whose block size is pinned
                cells[future] = (name, engine, expected_token_bytes(config, engine) if checked else None)
        for future in concurrent.futures.as_completed(cells):
            name, engine, token_bytes = cells[future]
            row = architectures[name][engine] = future.result()
            check_memory(row, token_bytes)
            print(json.dumps({"architecture": name, **row})[:600], flush=True)
            if args.out:  # after every cell, so that a run stopped early keeps what it measured
                report([], markdown, args.out, echo=False, architectures=architectures)
    report([], markdown, args.out, architectures=architectures)


if __name__ == "__main__":
    main()
