"""Hugging Face generation on the GPU with TurboQuantCache's fused mode (attention reads the compressed
cache; no full-precision copy of it exists) against DynamicCache and transformers' QuantizedCache.

    python benchmarks/hf_generate.py [--model smollm2] [--sections fidelity,speed] [--shape 8b|tiny]
                                     [--contexts 8192,32768] [--batches 1,8] [--new-tokens 256] [--out FILE]

fidelity (real weights, fp32): greedy 64 tokens after 10 prompts of 512 evaluation-text tokens, GPU fused
  vs the CPU reference path of the same preset (and the GPU reference path, to tell device rounding from
  kernels); next-token agreement with DynamicCache (1 − mean TV, teacher-forced: prefill 256, then 512
  decode steps) on the CPU reference path and on the GPU fused path. The CPU half runs first, on a CPU
  machine (`--sections fidelity-cpu`, ~10 minutes on 2 cores), and is read back by the GPU half.
speed (a Llama-3.1-8B-shaped bf16 model with random weights): prefill in 8K-token chunks, 8 untimed
  decode steps, then 256 greedy decode steps timed as a whole (32 for QuantizedCache); time per output token, peak torch.cuda.max_memory_allocated, and the
  bytes the cache holds at the end. All cells side by side in one run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

import turboquant.hf  # noqa: F401  registers attn_implementation="turboquant"
from turboquant.core import TurboQuantConfig
from turboquant.hf.cache import TurboQuantCache, cache_kwargs, kv_cache_nbytes
from turboquant.hf.evaluate import compare_logits, decode_logits
from turboquant.hf.models import eval_text, load_model

PRESETS = ("k4v4", "k3v3")
PREFILL_CHUNK = 8192
QUANTO_STEPS = 32  # QuantizedCache re-dequantizes its whole cache every step: fewer steps measure it well enough
SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
               max_position_embeddings=131072),
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=4096),
}


def use_attention(model, name: str) -> None:
    model.config._attn_implementation = name


@torch.no_grad()
def greedy(model, ids: torch.Tensor, cache, new_tokens: int) -> torch.Tensor:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return out[0, ids.shape[1]:].cpu()


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    differ = (a != b).nonzero()
    return int(differ[0]) if len(differ) else len(a)


def prompts(ids: torch.Tensor, count: int = 10, length: int = 512) -> list[torch.Tensor]:
    """`count` disjoint `length`-token slices of the evaluation text."""
    return [ids[:, i * (length + 64) : i * (length + 64) + length] for i in range(count)]


def agreement_run(model, text: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """(DynamicCache logits, `cache` logits) teacher-forced over `text`: prefill 256, then a decode step per token."""
    return decode_logits(model, text, 256).cpu(), decode_logits(model, text, 256, cache).cpu()


def fidelity_cpu(model_name: str, new_tokens: int = 64) -> dict:
    """The CPU reference path: greedy tokens and agreement with DynamicCache, per preset (fp32)."""
    model, tokenizer = load_model(model_name, torch.float32, "cpu")
    use_attention(model, "sdpa")
    ids = tokenizer(eval_text(), return_tensors="pt").input_ids
    text = ids[:, : 256 + 512]
    result = dict(device=platform.processor() or platform.machine(), date=datetime.date.today().isoformat(),
                  torch=torch.__version__, transformers=transformers.__version__)
    for preset in PRESETS:
        config = TurboQuantConfig.from_preset(preset)
        tokens = [greedy(model, prompt, TurboQuantCache(model.config, config), new_tokens).tolist()
                  for prompt in prompts(ids)]
        agreement = compare_logits(*agreement_run(model, text, TurboQuantCache(model.config, config)), text[0, 256:])
        result[preset] = dict(greedy=tokens, agreement=round(agreement.agreement, 5))
        print(preset, "CPU agreement", result[preset]["agreement"], flush=True)
    return result


def fidelity(model_name: str, cpu: dict, new_tokens: int = 64) -> dict:
    """The GPU fused path against the CPU reference run `cpu` (from `fidelity_cpu`, same model and text)."""
    model, tokenizer = load_model(model_name, torch.float32, "cuda")
    ids = tokenizer(eval_text(), return_tensors="pt").input_ids
    text = ids[:, : 256 + 512].cuda()
    result = {}
    for preset in PRESETS:
        config = TurboQuantConfig.from_preset(preset)
        rows = []
        for prompt, reference in zip(prompts(ids), cpu[preset]["greedy"]):
            reference = torch.tensor(reference)
            use_attention(model, "turboquant")
            fused = greedy(model, prompt.cuda(), TurboQuantCache(model.config, config, mode="fused"), new_tokens)
            use_attention(model, "sdpa")
            gpu_reference = greedy(model, prompt.cuda(), TurboQuantCache(model.config, config), new_tokens)
            rows.append(dict(fused_equals_cpu=bool(torch.equal(fused, reference)),
                             fused_first_difference=first_difference(fused, reference),
                             gpu_reference_equals_cpu=bool(torch.equal(gpu_reference, reference)),
                             gpu_reference_first_difference=first_difference(gpu_reference, reference)))
            print(preset, rows[-1], flush=True)
        use_attention(model, "turboquant")
        agreement = compare_logits(*agreement_run(model, text, TurboQuantCache(model.config, config, mode="fused")),
                                   text[0, 256:].cpu())
        result[preset] = dict(
            greedy=rows, greedy_identical=sum(r["fused_equals_cpu"] for r in rows),
            gpu_reference_identical=sum(r["gpu_reference_equals_cpu"] for r in rows),
            agreement_cpu_reference=cpu[preset]["agreement"], agreement_gpu_fused=round(agreement.agreement, 5),
            agreement_gap_points=round(100 * abs(cpu[preset]["agreement"] - agreement.agreement), 3))
        print(preset, {k: v for k, v in result[preset].items() if k != "greedy"}, flush=True)
    return result


def random_model(shape: str):
    config = transformers.LlamaConfig(**SHAPES[shape])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def make_cache(kind: str, model):
    if kind == "dynamic":
        return transformers.DynamicCache(config=model.config)
    if kind == "quanto-int4":
        return transformers.QuantizedCache(backend="quanto", config=model.config, nbits=4)
    return TurboQuantCache(model.config, kind.removeprefix("turboquant-"), mode="fused")


def held_bytes(cache) -> int | None:
    if isinstance(cache, TurboQuantCache) or type(cache) is transformers.DynamicCache:
        return kv_cache_nbytes(cache)
    return None  # QuantizedCache: its packed tensors are the backend's; see the peak instead


@torch.no_grad()
def time_generation(model, kind: str, batch: int, context: int, new_tokens: int, warmup_steps: int = 8) -> dict:
    use_attention(model, "turboquant" if kind.startswith("turboquant") else "sdpa")
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator().manual_seed(context + batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator).cuda()
    cache = make_cache(kind, model)
    cache_argument = cache_kwargs(model, cache)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for chunk in prompt.split(PREFILL_CHUNK, dim=1):
        logits = model(chunk, **cache_argument, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    for _ in range(warmup_steps):  # untimed: kernels specialized on this cell's shapes compile here
        token = model(token, **cache_argument, use_cache=True).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = model(token, **cache_argument, use_cache=True).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    decode_s = time.perf_counter() - start
    held = held_bytes(cache)
    row = dict(cache=kind, batch=batch, context=context, new_tokens=new_tokens, prefill_s=round(prefill_s, 3),
               ms_per_token=round(1000 * decode_s / new_tokens, 3),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
               peak_over_start_gib=round((torch.cuda.max_memory_allocated() - before) / 2**30, 3),
               cache_held_gib=None if held is None else round(held / 2**30, 3))
    del cache, cache_argument, prompt, logits
    return row


def fits(batch: int, context: int, shape: str) -> bool:
    """DynamicCache K/V plus 16 GB of weights within an 80 GB H100, with room for activations."""
    config = SHAPES[shape]
    kv = 4 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * batch * context
    return kv < 40 * 2**30


CACHES = ("dynamic", *(f"turboquant-{p}" for p in PRESETS), "quanto-int4")


def speed(shape: str, contexts: list[int], batches: list[int], new_tokens: int, kinds=CACHES) -> list[dict]:
    model = random_model(shape)
    for kind in kinds:  # compile and autotune everything once (a prefill chunk into a compressed cache too)
        try:
            time_generation(model, kind, 1, PREFILL_CHUNK + 512, 2)
        except Exception as error:
            print(kind, "warm-up failed:", repr(error)[:300], flush=True)
    rows = []
    for context in contexts:
        for batch in batches:
            if not fits(batch, context, shape):
                rows.append(dict(batch=batch, context=context, skipped="bf16 K/V would not fit beside the weights"))
                continue
            for kind in kinds:
                if kind == "quanto-int4" and batch > 1:
                    continue  # it dequantizes the whole cache every step: measured at batch 1 only
                steps = min(new_tokens, QUANTO_STEPS) if kind == "quanto-int4" else new_tokens
                try:
                    row = time_generation(model, kind, batch, context, steps)
                except Exception as error:  # e.g. a backend that is not installed: a row, not the end of the run
                    row = dict(cache=kind, batch=batch, context=context, error=repr(error)[:300])
                rows.append(row)
                print(row, flush=True)
    return rows


def table(result: dict) -> str:
    lines = []
    for preset, cell in result.get("fidelity", {}).items():
        lines.append(f"- {preset}: greedy (10 prompts × 64 tokens) GPU fused == CPU reference in "
                     f"{cell['greedy_identical']}/10; agreement with DynamicCache: CPU reference "
                     f"{100 * cell['agreement_cpu_reference']:.2f}%, "
                     f"GPU fused {100 * cell['agreement_gpu_fused']:.2f}%")
    rows = [r for r in result.get("speed", []) if "ms_per_token" in r]
    if rows:
        lines += ["", "| batch × context | cache | ms/token | vs DynamicCache | peak GiB | cache holds GiB |",
                  "|---|---|---|---|---|---|"]
        base = {(r["batch"], r["context"]): r for r in rows if r["cache"] == "dynamic"}
        for r in rows:
            ref = base.get((r["batch"], r["context"]))
            ratio = f"{r['ms_per_token'] / ref['ms_per_token']:.2f}x" if ref else "—"
            held = "—" if r["cache_held_gib"] is None else r["cache_held_gib"]
            lines.append(f"| b{r['batch']} × {r['context'] // 1024}K | {r['cache']} | {r['ms_per_token']} | "
                         f"{ratio} | {r['peak_gib']} | {held} |")
    for r in result.get("speed", []):
        if "error" in r or "skipped" in r:
            lines.append(f"- b{r['batch']} × {r['context']}: {r.get('cache', '')} {r.get('error', r.get('skipped'))}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model for the fidelity section (default: embedded)")
    parser.add_argument("--sections", default="fidelity,speed",
                        help="fidelity-cpu (CPU reference run, writes --cpu-reference), fidelity (GPU), speed (GPU)")
    parser.add_argument("--cpu-reference", type=Path, default=Path("benchmarks/results/hf-fidelity-cpu.json"))
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES), help="random model of the speed section")
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--caches", default=",".join(CACHES), help="speed section: comma list from %(default)s")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hf-generate-h100.json"))
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    if sections == ["fidelity-cpu"]:
        args.cpu_reference.parent.mkdir(parents=True, exist_ok=True)
        args.cpu_reference.write_text(json.dumps(fidelity_cpu(args.model)) + "\n")
        return
    if not torch.cuda.is_available():
        sys.exit("hf_generate.py measures the GPU path: it needs a CUDA device")
    result = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                  versions=dict(python=platform.python_version(), torch=torch.__version__,
                                transformers=transformers.__version__), command=" ".join(sys.argv))
    if "fidelity" in sections:
        result["fidelity"] = fidelity(args.model, json.loads(args.cpu_reference.read_text()))
    if "speed" in sections:
        result["speed"] = speed(args.shape, [int(c) for c in args.contexts.split(",")],
                                [int(b) for b in args.batches.split(",")], args.new_tokens, args.caches.split(","))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    markdown = table(result)
    args.out.with_suffix(".md").write_text(f"# {args.out.stem} ({result['device']}, {result['date']})\n\n{markdown}\n")
    print(markdown)


if __name__ == "__main__":
    main()
