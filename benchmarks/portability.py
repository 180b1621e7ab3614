"""Portability matrix, Hugging Face part: every architecture family we claim, built offline from a small
random config that keeps the real model's attention layout (head_dim, GQA ratio, sliding-window pattern,
soft-capping, q/k norms, M-RoPE), run through `TurboQuantCache` on the CPU.

Per architecture: `generate` with the cache runs; `verify` (teacher-forced, 256-token prefill + 64 steps)
gives the per-layer K/V reconstruction cosine on the compressed tokens (gate: `verify`'s threshold for
the preset's bits on every compressed layer, ≥ 0.99 at k4v4) and the attention outputs' cosine to DynamicCache's (reported), and says
which layers stayed uncompressed and why; an architecture the cache cannot hold must be refused with a
ValueError at construction. Random weights: next-token agreement is reported, not gated.

    python benchmarks/portability.py --out benchmarks/results/portability
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
import transformers as tf

from turboquant.core import TurboQuantConfig
from turboquant.hf.cache import TurboQuantCache, cache_kwargs
from turboquant.hf.verify import KV_COSINE_THRESHOLDS, verify_ids

VOCAB, LAYERS, PREFILL, DECODE, NEW_TOKENS = 512, 4, 256, 64, 8
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=LAYERS, intermediate_size=256, max_position_embeddings=4096)


def text(config_cls, heads: int, kv_heads: int, head_dim: int, **extra):
    return config_cls(**COMMON, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      hidden_size=heads * head_dim, **extra)


# name → (what it stands for, builder of the config). Head counts are scaled down, ratios kept.
ARCHITECTURES = {
    "llama-3.1": ("Llama-3.1-8B: d128, GQA 4:1", lambda: text(tf.LlamaConfig, 4, 1, 128)),
    "mistral-7b-v0.3": ("Mistral-7B v0.3: d128, GQA 4:1, no sliding window",
                        lambda: text(tf.MistralConfig, 4, 1, 128, sliding_window=None)),
    "mistral-7b-v0.1": ("Mistral-7B v0.1: d128, GQA 4:1, 4096-token sliding window on every layer",
                        lambda: text(tf.MistralConfig, 4, 1, 128, sliding_window=4096)),
    "qwen2.5": ("Qwen2.5-7B: d128, GQA 7:1, q/k/v bias", lambda: text(tf.Qwen2Config, 7, 1, 128)),
    "qwen3": ("Qwen3-8B: d128, GQA 4:1, q/k RMSNorm", lambda: text(tf.Qwen3Config, 4, 1, 128)),
    "phi-3-mini": ("Phi-3-mini: d96, MHA", lambda: text(tf.Phi3Config, 4, 4, 96, pad_token_id=0)),
    "phi-4": ("Phi-4: d128, GQA 4:1", lambda: text(tf.Phi3Config, 4, 1, 128, pad_token_id=0)),
    "gemma-2": ("Gemma-2-9B: d256, GQA 2:1, logit soft-capping, sliding/global alternating",
                lambda: text(tf.Gemma2Config, 2, 1, 256, sliding_window=128, attn_logit_softcapping=50.0,
                             query_pre_attn_scalar=256)),
    "gemma-3": ("Gemma-3: d256, GQA 2:1, q/k norm, 5 sliding : 1 global",
                lambda: tf.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 6}, num_attention_heads=2,
                                            num_key_value_heads=1, head_dim=256, hidden_size=512,
                                            sliding_window=128)),
    "qwen3-next (hybrid)": ("Qwen3-Next: 3 linear-attention (Gated DeltaNet) : 1 full-attention layers, d256, GQA 8:1",
                            lambda: tf.Qwen3NextConfig(
                                **COMMON, num_attention_heads=8, num_key_value_heads=1, head_dim=256, hidden_size=256,
                                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
                                linear_value_head_dim=64, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                layer_types=["linear_attention"] * 3 + ["full_attention"])),
    "qwen2-vl": ("Qwen2-VL language tower: d128, GQA 7:1, M-RoPE (text tokens)",
                 lambda: tf.Qwen2VLConfig(text_config=dict(
                     **COMMON, num_attention_heads=7, num_key_value_heads=1, hidden_size=896,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
                     vision_config=dict(depth=1, embed_dim=64, num_heads=2, hidden_size=896))),
    "llava": ("LLaVA-1.5 language tower (Llama): d128, MHA (text tokens)",
              lambda: tf.LlavaConfig(text_config=text(tf.LlamaConfig, 4, 4, 128),
                                     vision_config=dict(model_type="clip_vision_model", hidden_size=64,
                                                        intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=32, patch_size=16))),
    "molmo2": ("Molmo2 language tower (Qwen3-style): d128, GQA 4:1, q/k norm (text tokens)",
               lambda: tf.Molmo2Config(
                   text_config=dict(**COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                                    hidden_size=512),
                   vision_config=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, head_dim=32),
                   adapter_config=dict(hidden_size=64, intermediate_size=64, text_hidden_size=512,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                                       vision_feature_layer=[-1, -2]))),
    "mllama": ("Llama-3.2-Vision language tower: d128, GQA 4:1, a cross-attention layer (text tokens)",
               lambda: tf.MllamaConfig(
                   text_config=dict(**COMMON, num_attention_heads=4, num_key_value_heads=1, hidden_size=512,
                                    cross_attention_layers=[1], bos_token_id=1, eos_token_id=2, pad_token_id=0),
                   vision_config=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_global_layers=1,
                                      attention_heads=2, image_size=28, patch_size=14, vision_output_dim=128,
                                      max_num_tiles=1, supported_aspect_ratios=[[1, 1]],
                                      intermediate_layers_indices=[0]),
                   image_token_index=VOCAB - 1)),
    "deepseek-v2 (MLA)": ("DeepSeek-V2: multi-head latent attention",
                          lambda: tf.DeepseekV2Config(**COMMON, num_attention_heads=4, num_key_value_heads=4,
                                                      hidden_size=256, kv_lora_rank=256, q_lora_rank=None,
                                                      # head dims vLLM's MLA serves (latent 256/512 + RoPE 64)
                                                      qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                                                      first_k_dense_replace=LAYERS, n_routed_experts=4,
                                                      num_experts_per_tok=2, moe_intermediate_size=64)),
}


def build_model(config):
    torch.manual_seed(0)
    for auto in (tf.AutoModelForCausalLM, tf.AutoModelForImageTextToText):
        try:
            return auto.from_config(config, torch_dtype=torch.float32).eval()
        except ValueError:
            continue
    raise ValueError(f"no causal-LM class for {type(config).__name__}")


def kv_cosine_gate(config: TurboQuantConfig) -> float:
    return KV_COSINE_THRESHOLDS[min(config.key_bits, config.value_bits)]


def measure(name: str, preset: str) -> dict:
    description, make_config = ARCHITECTURES[name]
    row = {"architecture": name, "layout": description}
    start = time.perf_counter()
    try:
        model = build_model(make_config())
    except Exception as error:  # noqa: BLE001 - the matrix records what transformers cannot build
        return {**row, "status": f"not built: {type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (1, PREFILL + DECODE), generator=generator)
    config = TurboQuantConfig.from_preset(preset)
    try:
        cache = TurboQuantCache(model.config, config)
    except ValueError as error:
        return {**row, "status": "refused", "reason": str(error)}
    with torch.no_grad():
        generated = model.generate(input_ids[:, :PREFILL], **cache_kwargs(model, cache), max_new_tokens=NEW_TOKENS,
                                   do_sample=False, min_new_tokens=NEW_TOKENS)
        report = verify_ids(model, input_ids, config, PREFILL, progress=False)
    compressed = [r for r in report.layers if r.status == "compressed"]
    cosines = [min(r.key_cosine, r.value_cosine) for r in compressed if r.key_cosine is not None]
    row.update(
        status="ok",
        generated_tokens=int(generated.shape[1] - PREFILL),
        compressed_layers=[r.layer for r in compressed],
        uncompressed_layers={r.layer: r.status for r in report.layers if r.status != "compressed"},
        min_kv_cosine=round(min(cosines), 5) if cosines else None,
        min_attention_cosine=round(min(r.attention_cosine for r in report.layers if r.attention_cosine is not None), 5),
        agreement=round(report.agreement, 4),
        kv_bytes=report.kv_bytes, dynamic_kv_bytes=report.dynamic_kv_bytes,
        seconds=round(time.perf_counter() - start, 1),
    )
    row["passed"] = row["generated_tokens"] == NEW_TOKENS and (not cosines or min(cosines) >= kv_cosine_gate(config))
    return row


def markdown(result: dict) -> str:
    lines = [f"# Portability, Hugging Face path ({result['device']}, {result['date']}, preset {result['preset']})", "",
             f"Small random configs with each model's attention layout; {PREFILL}-token prefill + {DECODE} "
             f"teacher-forced steps; gate: every compressed layer's K/V cosine ≥ {kv_cosine_gate(TurboQuantConfig.from_preset(result['preset']))} "
             "and `generate` runs.", "",
             "| architecture | layout | result | compressed layers | uncompressed (why) | min K/V cosine | "
             "min attention cosine | agreement |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['architecture']} | {row['layout']} | {row['status']}"
                         f"{': ' + row['reason'] if row.get('reason') else ''} | | | | | |")
            continue
        why = "; ".join(f"{k}: {v}" for k, v in row["uncompressed_layers"].items()) or "—"
        lines.append(f"| {row['architecture']} | {row['layout']} | {'PASS' if row['passed'] else 'FAIL'} | "
                     f"{row['compressed_layers']} | {why} | {row['min_kv_cosine']} | {row['min_attention_cosine']} | "
                     f"{row['agreement']:.2%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="k4v4")
    parser.add_argument("--only", help=f"comma list from {list(ARCHITECTURES)}")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(ARCHITECTURES)
    rows = []
    for name in names:
        rows.append(measure(name, args.preset))
        print(json.dumps(rows[-1]), flush=True)
    result = {"device": "cpu", "date": datetime.date.today().isoformat(), "preset": args.preset,
              "transformers": tf.__version__, "torch": torch.__version__, "rows": rows}
    print(markdown(result))
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(result))


if __name__ == "__main__":
    main()
