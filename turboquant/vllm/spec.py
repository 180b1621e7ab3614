"""Make vLLM's KV-cache manager see our compressed page size.

vLLM 0.26 sizes KV pages from the spec each attention layer returns (`Attention.get_kv_cache_spec`), and
that method only knows bf16/fp8 and vLLM's own `turboquant_*` dtypes. A plugin cannot add a cache dtype,
so `patch_attention_spec` wraps that one method: a layer served by our backend returns vLLM's own
`TQFullAttentionSpec` (a full-attention spec whose page is `block_size · num_kv_heads · tq_slot_size`
bytes) with our bytes per token and head; every other layer is untouched. Layers with different bit
widths (8-bit boundary layers, when configured) get different page sizes; vLLM keeps them in one group
of full-attention layers (`UniformTypeKVCacheSpecs`) and gives each its own memory.
"""

from __future__ import annotations

import functools

import torch
from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import TQFullAttentionSpec

from .settings import VllmSettings


def compressed_spec(layer, vllm_config) -> TQFullAttentionSpec:
    if layer.head_size_v != layer.head_size:
        raise ValueError(f"turboquant needs equal key and value head sizes, {layer.layer_name} has "
                         f"{layer.head_size} and {layer.head_size_v}")
    settings = VllmSettings.from_additional_config(vllm_config.additional_config)
    num_layers = vllm_config.model_config.get_total_num_hidden_layers()
    config = settings.layer_config(extract_layer_index(layer.layer_name), num_layers, layer.head_size)
    return TQFullAttentionSpec(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=layer.num_kv_heads,
        head_size=layer.head_size,
        head_size_v=layer.head_size_v,
        dtype=torch.uint8,
        # A sliding-window layer is stored for every token and attended with its window by the kernels.
        sliding_window=layer.sliding_window,
        tq_slot_size=config.bytes_per_token_per_head(layer.head_size),  # = PagedLayout's bytes per token·head
    )


def patch_attention_spec(backend_cls: type) -> None:
    """Idempotent: wrap `Attention.get_kv_cache_spec` so layers using `backend_cls` report compressed pages."""
    original = Attention.get_kv_cache_spec
    if getattr(original, "_turboquant", False):
        return

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        if isinstance(self.attn_backend, type) and issubclass(self.attn_backend, backend_cls):
            return compressed_spec(self, vllm_config)
        return original(self, vllm_config)

    get_kv_cache_spec._turboquant = True
    Attention.get_kv_cache_spec = get_kv_cache_spec
