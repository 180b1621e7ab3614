"""Make vLLM's KV-cache manager see our compressed page size.

vLLM 0.26 sizes KV pages from the spec each attention layer returns (`Attention.get_kv_cache_spec`,
`MLAAttention.get_kv_cache_spec`), and those methods only know bf16/fp8 and vLLM's own `turboquant_*`
dtypes. A plugin cannot add a cache dtype, so `patch_attention_specs` wraps the two methods: a layer
served by one of our backends returns a spec with our bytes per token, every other layer is untouched.
- Per-head layers return vLLM's own `TQFullAttentionSpec` (a full-attention spec whose page is
  `block_size · num_kv_heads · tq_slot_size` bytes) with our bytes per token and head.
- MLA layers return `LatentAttentionSpec`, an `MLAAttentionSpec` whose page is `block_size ·
  latent_token_bytes` (kv_c codes, its norm and k_pe; `kernels/latent.py`); vLLM finds its manager and
  group through the parent class.
Layers with different bit widths (8-bit boundary layers, when configured) get different page sizes;
vLLM keeps them in one group of full-attention layers (`UniformTypeKVCacheSpecs`) and gives each its
own memory.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.layers.attention.mla_attention import MLAAttention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import MLAAttentionSpec, TQFullAttentionSpec

from ..kernels.latent import latent_token_bytes
from .settings import VllmSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentAttentionSpec(MLAAttentionSpec):
    latent_token_bytes: int

    @property
    def real_page_size_bytes(self) -> int:
        return self.storage_block_size * self.latent_token_bytes

    @classmethod
    def merge(cls, specs: list["LatentAttentionSpec"]) -> "LatentAttentionSpec":
        if any(spec.latent_token_bytes != specs[0].latent_token_bytes for spec in specs):
            raise ValueError("MLA layers of one KV-cache group must store the same bytes per token")
        merged = MLAAttentionSpec.merge.__func__(MLAAttentionSpec, specs)  # vLLM's checks; it builds a parent
        fields = {field.name: getattr(merged, field.name) for field in dataclasses.fields(merged) if field.init}
        return cls(**fields, latent_token_bytes=specs[0].latent_token_bytes)


def layer_settings(layer, vllm_config) -> tuple[VllmSettings, int, int]:
    settings = VllmSettings.from_additional_config(vllm_config.additional_config)
    return settings, extract_layer_index(layer.layer_name), vllm_config.model_config.get_total_num_hidden_layers()


def compressed_spec(layer, vllm_config) -> TQFullAttentionSpec:
    if layer.head_size_v != layer.head_size:
        raise ValueError(f"turboquant needs equal key and value head sizes, {layer.layer_name} has "
                         f"{layer.head_size} and {layer.head_size_v}")
    settings, layer_idx, num_layers = layer_settings(layer, vllm_config)
    config = settings.layer_config(layer_idx, num_layers, layer.head_size)
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


def compressed_latent_spec(layer, vllm_config) -> LatentAttentionSpec:
    settings, layer_idx, num_layers = layer_settings(layer, vllm_config)
    config = settings.latent_config(layer_idx, num_layers)
    return LatentAttentionSpec(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=1,
        head_size=layer.head_size,
        dtype=torch.uint8,
        cache_dtype_str=layer.kv_cache_dtype,
        latent_token_bytes=latent_token_bytes(layer.kv_lora_rank, layer.qk_rope_head_dim, config.key_bits),
    )


def _wrap_spec_method(layer_cls: type, backend_cls: type, make_spec) -> None:
    """Idempotent: `layer_cls.get_kv_cache_spec` returns `make_spec(layer, vllm_config)` for layers
    served by `backend_cls`."""
    original = layer_cls.get_kv_cache_spec
    if getattr(original, "_turboquant", False):
        return

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        if isinstance(self.attn_backend, type) and issubclass(self.attn_backend, backend_cls):
            return make_spec(self, vllm_config)
        return original(self, vllm_config)

    get_kv_cache_spec._turboquant = True
    layer_cls.get_kv_cache_spec = get_kv_cache_spec


def patch_attention_specs(backend_cls: type, latent_backend_cls: type) -> None:
    """Layers served by `backend_cls` (per-head) or `latent_backend_cls` (MLA) report compressed pages."""
    _wrap_spec_method(Attention, backend_cls, compressed_spec)
    _wrap_spec_method(MLAAttention, latent_backend_cls, compressed_latent_spec)
