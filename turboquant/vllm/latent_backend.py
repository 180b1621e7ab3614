"""The vLLM backend for multi-head latent attention (DeepSeek-V2/V3): the latent cache compressed.

vLLM's MLA layer does the projections; a backend stores the latent and attends to it. Ours:
- `do_kv_cache_update` writes kv_c TurboQuant-compressed and k_pe exact (`latent_store`);
- decode (`forward_mqa`, absorbed MLA) reads the compressed latent directly (`latent_decode`). The
  latent's rotation R is folded into the layer's absorbed projections once after loading
  (`fold_rotation`: W_UK_T·Rᵀ and R·W_UV), so queries arrive rotated and the output leaves rotated at no
  cost per step: un-rotating a 512-wide sum per layer and step cost more than the attention itself;
- prefill attends in full precision to its own tokens (vLLM's prefill backend, as for bf16) and to a
  cached context that `latent_gather` writes out dequantized, chunk by chunk, into vLLM's workspace.
vLLM picks this class for MLA layers when the CUSTOM backend is selected (`plugin.py`); the page size its
KV-cache manager sees is the compressed one (`spec.py`). The cache of one layer is uint8
[num_blocks, page_bytes] (`kernels/latent.py`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.attention.mla_attention import (
    MLACommonBackend,
    MLACommonImpl,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
)
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.ops.merge_attn_states import merge_attn_states
from vllm.v1.attention.ops.triton_merge_attn_states import mask_empty_context

from ..core import TurboQuantConfig
from ..kernels import LatentCodec, latent_decode, latent_gather, latent_store
from ..kernels.latent import latent_token_bytes
from .backend import CompressedCacheBackend
from .settings import VllmSettings


class TurboQuantLatentBackend(CompressedCacheBackend, MLACommonBackend):
    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any latent that packs; checked when the codec is built

    @staticmethod
    def get_impl_cls() -> type["TurboQuantLatentImpl"]:
        return TurboQuantLatentImpl

    @staticmethod
    def get_builder_cls() -> type["TurboQuantLatentMetadataBuilder"]:
        return TurboQuantLatentMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        # The page bytes depend on the layer's bits, which this static hook is not told; vLLM views the
        # layer's raw buffer with this shape, so -1 takes its exact size.
        return (num_blocks, -1)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        # identity: no cross-layer cache allocation
        return (0, 1, 2) if include_num_layers_dimension else (0, 1)


class TurboQuantLatentMetadataBuilder(MLACommonMetadataBuilder[MLACommonMetadata]):
    # Decode's split count depends only on shapes, so a captured CUDA graph replays with the same grid.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


class TurboQuantLatentImpl(MLACommonImpl[MLACommonMetadata]):
    can_return_lse_for_decode: bool = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, alibi_slopes,
                 sliding_window, kv_cache_dtype: str, logits_soft_cap, attn_type: str,
                 kv_sharing_target_layer_name, **mla_args) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, **mla_args)
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise ValueError("turboquant's MLA backend serves plain causal MLA: no ALiBi, sliding window or "
                             "soft-capping")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"turboquant serves decoder self-attention only, not {attn_type}")
        vllm_config = get_current_vllm_config()
        parallel = vllm_config.parallel_config
        if parallel.decode_context_parallel_size > 1 or parallel.prefill_context_parallel_size > 1:
            raise ValueError("turboquant's MLA backend does not support context parallelism (DCP/PCP)")
        self.settings = VllmSettings.from_additional_config(vllm_config.additional_config)  # fail at start
        self.settings.exact_counts("on MLA (latent) layers")  # set in the config: stop here; the default is off
        self.num_layers = vllm_config.model_config.get_total_num_hidden_layers()
        self.supports_quant_query_input = False  # queries stay in the model's dtype
        self.layer_idx: int | None = None  # set by fold_rotation (vLLM does not tell an MLA impl its layer)
        self.config: TurboQuantConfig | None = None  # the layer's codec settings, also set there
        self.codec: LatentCodec | None = None

    def fold_rotation(self, layer) -> None:
        """Once, after vLLM built the layer's absorbed projections W_UK_T [heads, nope, latent] and W_UV
        [heads, latent, v]: q_nope·(W_UK_T·Rᵀ) is the rotated latent query, and (o·R)·W_UV = o_rot·(R·W_UV)
        up-projects an output left in the rotated space. The products are rounded once to the weights' dtype."""
        if self.layer_idx is not None:
            raise RuntimeError(f"turboquant: the rotation of {layer.layer_name} is already folded")
        layer_idx = extract_layer_index(layer.layer_name)
        config = self.settings.latent_config(layer_idx, self.num_layers)
        rotation = config.make_quantizer("key", self.kv_lora_rank, layer_idx).rotation.matrix()
        with torch.no_grad():
            rotation = rotation.to(layer.W_UK_T.device)
            layer.W_UK_T.copy_(layer.W_UK_T.float() @ rotation.T)
            layer.W_UV.copy_(rotation @ layer.W_UV.float())
        self.layer_idx, self.config = layer_idx, config

    def _codec(self, kv_cache: torch.Tensor, rope_dtype: torch.dtype) -> LatentCodec:
        """Built on the first call, once the layer's cache is known."""
        if self.codec is None:
            if self.layer_idx is None:
                raise RuntimeError("turboquant: the MLA layer's rotation was never folded into its projections "
                                   "(vLLM did not call process_weights_after_loading)")
            token_bytes = latent_token_bytes(self.kv_lora_rank, self.qk_rope_head_dim, self.config.key_bits)
            block_size = kv_cache.shape[-1] // token_bytes
            self.codec = LatentCodec.from_config(self.config, self.kv_lora_rank, self.qk_rope_head_dim, block_size,
                                                 rope_dtype, self.layer_idx, kv_cache.device)
            self.codec.layout.check_cache(kv_cache)
        return self.codec

    def do_kv_cache_update(self, kv_c_normed: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, kv_cache_dtype: str, k_scale: torch.Tensor) -> None:
        num_tokens = slot_mapping.shape[0]
        if num_tokens == 0 or kv_cache.numel() == 0:
            return
        k_pe = k_pe[:num_tokens].reshape(num_tokens, -1)  # vLLM hands k_pe over as [tokens, 1, rope_dim]
        latent_store(kv_c_normed[:num_tokens], k_pe, slot_mapping, kv_cache, self._codec(kv_cache, k_pe.dtype))

    def forward_mqa(self, q, kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: MLACommonMetadata,
                    layer) -> tuple[torch.Tensor, None]:
        q_latent, q_pe = q if isinstance(q, tuple) else q.split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        decode = attn_metadata.decode
        codec = self._codec(kv_c_and_k_pe_cache, q_pe.dtype)
        return latent_decode(q_latent, q_pe, kv_c_and_k_pe_cache, codec, decode.block_table, decode.seq_lens,
                             self.scale, rotated=True), None  # rotated by the folded W_UK_T, left for W_UV

    def _compute_prefill_context(self, q: torch.Tensor, kv_c_and_k_pe_cache: torch.Tensor,
                                 attn_metadata: MLACommonMetadata, k_scale: torch.Tensor):
        """The prefill queries against their cached context, in the workspace-sized chunks vLLM planned:
        the attention output and log-sum-exp that vLLM merges with the new tokens' own."""
        prefill = attn_metadata.prefill
        context = prefill.chunked_context
        latent_dim = self.kv_lora_rank
        codec = self._codec(kv_c_and_k_pe_cache, q.dtype)
        output = lse = None
        for i, num_rows in enumerate(context.seq_tot):
            rows = context.workspace[:num_rows]
            kv_c, k_pe = rows[:, :latent_dim], rows[:, latent_dim:]
            latent_gather(kv_c_and_k_pe_cache, codec, prefill.block_table, context.cu_seq_lens[i],
                          context.max_seq_lens[i], kv_c, k_pe, context.starts[i])
            kv_nope = self.kv_b_proj(kv_c)[0].view(-1, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
            k_nope, v = kv_nope.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k = self._concat_k_nope_k_pe(k_nope, k_pe.unsqueeze(1))
            chunk_output, chunk_lse = prefill.prefill_backend.run_prefill_context_chunk(chunk_idx=i, q=q, k=k, v=v)
            if context.has_empty_context[i]:
                mask_empty_context(chunk_lse, chunk_output, prefill.query_start_loc, context.cu_seq_lens[i])
            if output is None:
                output, lse = chunk_output, chunk_lse
                continue
            merged, merged_lse = torch.empty_like(output), torch.empty_like(lse)
            merge_attn_states(output=merged, output_lse=merged_lse, prefix_output=output, prefix_lse=lse,
                              suffix_output=chunk_output, suffix_lse=chunk_lse)
            output, lse = merged, merged_lse
        return output, lse
