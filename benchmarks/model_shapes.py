"""Write a model directory with a real model's shape for vLLM's dummy weights: its config plus a
tokenizer copied from another directory (prompts are random token ids; the tokenizer only has to load).

    python benchmarks/model_shapes.py deepseek-v2-lite --out /tmp/models/dsv2-lite-shape \
        --tokenizer-from /tmp/models/llama8b-shape

deepseek-v2-lite: DeepSeek-V2-Lite's published config (27 layers, 16 heads, MLA with kv_lora_rank 512 and a
64-dim RoPE key) with two changes that leave attention as it is:
- every layer has the model's dense MLP (its first layer's, intermediate 10944) instead of 64 routed + 2
  shared experts: the offline vLLM bundle has no MoE kernels (`_moe_C`);
- no YaRN rope scaling (max_position_embeddings 40960 covers the benchmarks' lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

SHAPES = {
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "first_k_dense_replace": 27, "moe_layer_freq": 1, "routed_scaling_factor": 1.0,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "scoring_func": "softmax", "norm_topk_prob": False,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
        "eos_token_id": 2,
    },
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def write_shape(name: str, out: str, tokenizer_from: str) -> str:
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; choose from {sorted(SHAPES)}")
    copied = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_from, f))]
    if "tokenizer.json" not in copied:
        raise SystemExit(f"no tokenizer.json in {tokenizer_from}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(SHAPES[name], f, indent=1)
    for file in copied:
        shutil.copy(os.path.join(tokenizer_from, file), out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--tokenizer-from", required=True, help="a model directory whose tokenizer files to copy")
    args = parser.parse_args()
    print(write_shape(args.shape, args.out, args.tokenizer_from))


if __name__ == "__main__":
    main()
