"""The vLLM attention backend: a thin adapter from vLLM 0.26's v1 metadata to our kernels.

Each step, `forward` first compresses the new tokens into the paged cache (`compress_store`), which in
the same launch rotates the queries that decode attention reads (one launch fewer per layer than vLLM's
separate `do_kv_cache_update` would allow); then it runs decode requests through `paged_decode_attention`
(split-K over the compressed pages, CUDA-graph safe: its launches depend only on shapes) and prefill
chunks, which attend to their compressed prefix and in full precision to their own K/V (compressed on
the "decode" route), by the route `prefill_groups.prefill_route` picks for the step ("flash", "gather",
"fused" or "decode"; that module says when and why each). A decode step with exact tokens (a ring)
hands its store to `paged_decode_attention(store=)` instead, which runs it beside the split kernels.
In vLLM's batch-invariant mode (`VLLM_BATCH_INVARIANT=1`) every token, decode steps and prefill chunks
alike, goes through `cached_attention` instead: each query reads the cache alone (its own chunk from the
cache too), so its result does not depend on how requests were batched, chunked, prefix-cached or
recomputed after preemption. Prefill then attends to compressed copies of its own chunk: a small loss
of fidelity, and the fused kernel's prefill speed, for reproducibility. That mode also needs vLLM's
RMSNorm with a residual made batch invariant, which vLLM 0.26 leaves out (`batch_invariance.py`).

The cache of one layer is uint8 [num_blocks, num_kv_heads, head_page_bytes] (`core/paged_layout.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.fa_utils import get_flash_attn_version, is_flash_attn_varlen_func_available
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.worker.workspace import current_workspace_manager, is_workspace_manager_initialized

from ..kernels import (ExactRing, KernelCodec, cached_attention, compress_store, extend_attention, gather_sequences,
                       paged_decode_attention)
from ..kernels.codec import KERNEL_HEAD_DIMS
from ..kernels.decode import variant_batches
from ..kernels.extend import WIDE_ROWS as EXTEND_WIDE_ROWS
from ..kernels.extend import split_counts as extend_split_counts
from ..kernels.launch import multiprocessor_count
from ..kernels.rotate import SHORT_TILE_MAX_TOKENS as ROTATE_SHORT_TILE_MAX_TOKENS
from ..kernels.store import tile_token_counts
from .batch_invariance import install_residual_rms_norm
from .exact_tokens import ExactStep, ExactTokens
from .prefill_groups import (PrefillGroup, chunk_decode_queries, decode_route_max_tokens, engine_gathers,
                             prefill_groups, prefill_route)
from .settings import VllmSettings

if is_flash_attn_varlen_func_available():
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func
else:
    flash_attn_varlen_func = None

logger = init_logger(__name__)
KERNEL_BLOCK_SIZES = [16, 32, 64, 128]
BATCH_INVARIANT_MODE = "in vLLM's batch-invariant mode (a token's ring entry depends on the batch)"


class CompressedCacheBackend:
    """What our per-head and latent backends tell vLLM alike (listed first among their bases)."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    # The model's dtype: the compressed format is chosen by the plugin's settings, not by this string.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int]:
        return KERNEL_BLOCK_SIZES

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability.major >= 8  # fp16 tensor-core tl.dot


class TurboQuantBackend(CompressedCacheBackend, AttentionBackend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(KERNEL_HEAD_DIMS)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return True  # forward routes every token through cached_attention in that mode

    @staticmethod
    def get_impl_cls() -> type["TurboQuantImpl"]:
        return TurboQuantImpl

    @staticmethod
    def get_builder_cls() -> type["TurboQuantMetadataBuilder"]:
        return TurboQuantMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        # The page bytes depend on the layer's bits (8-bit boundary layers, when configured), which this
        # static hook is not told; vLLM views the layer's raw buffer with this shape, so -1 takes its exact size.
        return (num_blocks, num_kv_heads, -1)


@dataclass
class TurboQuantMetadata(AttentionMetadata):
    slot_mapping: torch.Tensor  # [tokens (CUDA-graph padded with −1)]: where each new token's K/V goes
    seq_lens: torch.Tensor  # int32 [num_reqs]: tokens in each sequence, this step's included
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    query_start: torch.Tensor  # int32 [num_reqs + 1]
    max_query_len: int
    num_actual_tokens: int
    num_decodes: int  # decode requests come first (reorder_batch_threshold = 1)
    num_decode_tokens: int
    num_prefills: int
    prefill_query_start: torch.Tensor  # int32 [num_prefills + 1], relative to the first prefill token
    prefill_max_query_len: int
    prefill_route: str  # prefill_groups.prefill_route's: "flash", "gather", "fused" or "decode" (no prefill: "")
    # "gather": consecutive prefill requests whose keys fit the workspace together
    prefill_groups: list["PrefillGroup"] | None = None
    # "decode": each prefill token's block-table row [prefill tokens, width] and sequence length
    chunk_block_table: torch.Tensor | None = None
    chunk_seq_lens: torch.Tensor | None = None
    exact: ExactStep | None = None  # settings exact_sinks / exact_recent: this step's ring entries


def gather_workspace(num_keys: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [num_keys, num_kv_heads, head_size] in vLLM's shared workspace (reserved by the
    builder for the model's maximum length, so it never grows after vLLM locks it), or fresh tensors
    where vLLM runs without one."""
    shape = (num_keys, num_kv_heads, head_size)
    if is_workspace_manager_initialized():
        keys, values = current_workspace_manager().get_simultaneous((shape, dtype), (shape, dtype))
        return keys, values
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)


class TurboQuantMetadataBuilder(AttentionMetadataBuilder[TurboQuantMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self.gather_capacity = vllm_config.model_config.max_model_len  # keys one gather may hold
        self.gathers = engine_gathers(vllm_config.speculative_config is not None,
                                      vllm_config.parallel_config.use_ubatching)
        self.num_sms = multiprocessor_count(torch.device(device))
        exact_counts = VllmSettings.from_additional_config(vllm_config.additional_config).exact_counts(
            BATCH_INVARIANT_MODE if envs.VLLM_BATCH_INVARIANT else None)
        self.exact = ExactTokens(*exact_counts, vllm_config.scheduler_config.max_num_seqs,
                                 vllm_config.scheduler_config.max_num_batched_tokens, device) \
            if any(exact_counts) else None
        if self.gathers and is_workspace_manager_initialized():  # reserve it now, while vLLM profiles memory
            gather_workspace(self.gather_capacity, kv_cache_spec.num_kv_heads, kv_cache_spec.head_size,
                             vllm_config.model_config.dtype, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TurboQuantMetadata:
        common = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(common, decode_threshold=1)
        query_start_cpu = common.query_start_loc_cpu[num_decodes:]
        query_lens = (query_start_cpu[1:] - query_start_cpu[:-1]).tolist()
        seq_lens_cpu = common.seq_lens_cpu_upper_bound  # exact for prefill rows
        prefill_query_start = common.query_start_loc[num_decodes:] - num_decode_tokens
        route, groups, chunk_block_table, chunk_seq_lens = "", None, None, None
        if num_prefills:
            # without CPU lengths, assume prefixes (the kernels read the exact lengths on the GPU)
            seq_lens = None if seq_lens_cpu is None else seq_lens_cpu[num_decodes:].tolist()
            prefix_lens = [1] * num_prefills if seq_lens is None else [s - q for s, q in zip(seq_lens, query_lens)]
            route = prefill_route(query_lens, prefix_lens, self.kv_cache_spec.num_kv_heads, self.num_sms,
                                  self.gathers and seq_lens is not None)
            if route == "gather":
                groups = prefill_groups(query_lens, seq_lens, self.gather_capacity, self.device)
            elif route == "decode":
                chunk_block_table, chunk_seq_lens = chunk_decode_queries(
                    prefill_query_start, common.seq_lens[num_decodes:], common.block_table_tensor[num_decodes:],
                    common.num_actual_tokens - num_decode_tokens)
        return TurboQuantMetadata(
            slot_mapping=common.slot_mapping,
            seq_lens=common.seq_lens,
            block_table=common.block_table_tensor,
            query_start=common.query_start_loc,
            max_query_len=common.max_query_len,
            num_actual_tokens=common.num_actual_tokens,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            num_prefills=num_prefills,
            prefill_query_start=prefill_query_start,
            prefill_max_query_len=max(query_lens, default=0),
            prefill_route=route,
            prefill_groups=groups,
            chunk_block_table=chunk_block_table,
            chunk_seq_lens=chunk_seq_lens,
            exact=None if self.exact is None else self.exact.step(
                common.query_start_loc, common.seq_lens, common.num_actual_tokens, common.num_reqs, num_decodes),
        )


def skipped_step(tokens: int, key: torch.Tensor, value: torch.Tensor, query: torch.Tensor,
                 meta: TurboQuantMetadata) -> tuple[torch.Tensor, ...]:
    """Zeroed keys, values and queries of `tokens` rows with the step's strides (Triton compiles a variant
    per divisibility of each stride), a slot mapping of the step's dtype that skips every row, and ring
    entries that skip them too: a store that writes nothing, for compiling before serving."""
    keys, values, queries = (torch.empty_strided((tokens, *x.shape[1:]), x.stride(), dtype=x.dtype,
                                                 device=x.device).zero_() for x in (key, value, query))
    skipped = torch.full((tokens,), -1, dtype=meta.slot_mapping.dtype, device=key.device)
    return keys, values, queries, skipped, skipped.to(torch.int32)


def exact_tokens_unsupported(sliding_window: int | None, kv_sharing_target_layer_name: str | None) -> str | None:
    """Where a layer cannot read exact tokens from a ring, why (completing "exact tokens are off …"); else None."""
    if envs.VLLM_BATCH_INVARIANT:
        return BATCH_INVARIANT_MODE
    if sliding_window:
        return "on sliding-window layers"
    if kv_sharing_target_layer_name:
        return "on layers that read another layer's cache (KV sharing)"
    return None


class TurboQuantImpl(AttentionImpl[TurboQuantMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **extra) -> None:
        if alibi_slopes is not None:
            raise ValueError("turboquant: ALiBi attention is not supported")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"turboquant serves decoder self-attention only, not {attn_type}")
        vllm_config = get_current_vllm_config()
        if vllm_config.model_config.is_hybrid:
            # vLLM pads the recurrent layers' state pages to a bf16 attention page (platforms'
            # _align_hybrid_block_size), which our compressed page does not divide.
            raise ValueError("turboquant's vLLM backend does not serve hybrid models (attention beside Mamba or "
                             "linear-attention layers, e.g. Qwen3-Next); serve this model without "
                             "--attention-backend CUSTOM, or compress its cache in transformers (TurboQuantCache)")
        self.settings = VllmSettings.from_additional_config(vllm_config.additional_config)  # bad config: fail at start
        if envs.VLLM_BATCH_INVARIANT:
            install_residual_rms_norm()  # vLLM's mode leaves that norm batch-dependent (batch_invariance.py)
        unsupported = exact_tokens_unsupported(sliding_window, kv_sharing_target_layer_name)
        exact_counts = self.settings.exact_counts(unsupported)
        if any(exact_counts):
            logger.info_once("turboquant: decode steps read each sequence's first %d and latest %d tokens exactly, "
                             "from a ring beside the compressed cache", *exact_counts)
        elif unsupported:
            logger.info_once("turboquant: exact sinks and latest tokens are off %s; those layers read every token "
                             "compressed", unsupported)
        self.exact_ring: ExactRing | None = None  # built on the first step that has the builder's ExactTokens
        self.num_layers = vllm_config.model_config.get_total_num_hidden_layers()
        self.kv_cache_dtype = kv_cache_dtype
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        # the ring's rows now, with the model, so that vLLM's memory profile leaves them out of the KV budget
        self.exact_rows = ExactRing.allocate_rows(
            sum(ExactTokens.capacities(*exact_counts, vllm_config.scheduler_config.max_num_seqs)),
            self.num_kv_heads, head_size,
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu") \
            if any(exact_counts) else None  # None: this layer reads every token compressed
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.sliding_window = sliding_window
        self.softcap = logits_soft_cap if logits_soft_cap else None
        self.fa_version = get_flash_attn_version(head_size=head_size) if flash_attn_varlen_func else None
        self.codec: KernelCodec | None = None
        self.gathers = self.fa_version is not None and engine_gathers(
            vllm_config.speculative_config is not None, vllm_config.parallel_config.use_ubatching)
        self.max_step_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        self.serving_uncompiled = True  # its Triton kernels are compiled before serving (_compile_serving_kernels)

    def _codec(self, layer, kv_cache: torch.Tensor) -> KernelCodec:
        """Built on the first call, when the layer's name (its index, hence its bits) and cache are known."""
        if self.codec is None:
            layer_idx = extract_layer_index(layer.layer_name)
            config = self.settings.layer_config(layer_idx, self.num_layers, self.head_size)
            head_page_bytes = kv_cache.shape[-1]
            block_size = head_page_bytes // config.bytes_per_token_per_head(self.head_size)
            self.codec = KernelCodec.from_config(config, self.head_size, self.num_kv_heads, block_size, layer_idx,
                                                 kv_cache.device)
            self.codec.layout.check_cache(kv_cache)
        return self.codec

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: TurboQuantMetadata, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("turboquant does not fuse output quantization")
        if attn_metadata is None:  # vLLM's profiling run: no cache yet
            return output.fill_(0)
        meta, codec = attn_metadata, self._codec(layer, kv_cache)
        decodes, decode_tokens, num_tokens = meta.num_decodes, meta.num_decode_tokens, meta.num_actual_tokens
        output = output.view(-1, self.num_heads, self.head_size)
        if envs.VLLM_BATCH_INVARIANT:
            self._store(key, value, kv_cache, codec, meta, None)
            cached_attention(query[:num_tokens], meta.query_start, meta.seq_lens, kv_cache, codec, meta.block_table,
                             self.scale, meta.max_query_len, self.sliding_window, self.softcap,
                             out=output[:num_tokens])
            return output
        if meta.exact is not None and self.exact_rows is not None and self.exact_ring is None:
            self.exact_ring = meta.exact.tokens.ring(codec.layout, kv_cache.shape[0], self.exact_rows)
        if self.serving_uncompiled and key is not None and kv_cache.is_cuda \
                and not torch.cuda.is_current_stream_capturing():
            self._compile_serving_kernels(query, key, value, kv_cache, codec, meta)
        ring = self.exact_ring
        exact_middle = None if ring is None else (meta.exact.middle_ends, meta.exact.middle_starts)
        if decodes and not meta.num_prefills and ring is not None and ring.recent and self._stores(key):
            # A decode step with a ring: decode attention runs the store beside its split kernels where it can
            # (their middle ends before the step's tokens). The launches depend only on shapes (batch,
            # block-table width), so a captured CUDA graph replays them.
            paged_decode_attention(
                query[:decode_tokens], kv_cache, codec, meta.block_table[:decodes], meta.seq_lens[:decodes],
                self.scale, self.sliding_window, self.softcap, out=output[:decode_tokens], exact=ring,
                exact_middle=exact_middle,
                store=lambda queries: self._store(key, value, kv_cache, codec, meta, queries, queries is not None))
            return output
        # the tokens that attend as decode queries over the cache: decode steps, and short chunks' tokens
        decode_queries = num_tokens if meta.prefill_route == "decode" else decode_tokens
        # the first decode launch starts while the store runs (programmatic dependent launch)
        rotated = self._store(key, value, kv_cache, codec, meta, query[:decode_queries], bool(decode_queries))
        queries = query if rotated is None else rotated
        if decodes:
            paged_decode_attention(
                queries[:decode_tokens], kv_cache, codec, meta.block_table[:decodes], meta.seq_lens[:decodes],
                self.scale, self.sliding_window, self.softcap, out=output[:decode_tokens],
                query_rotated=rotated is not None, after_store=True, exact=ring, exact_middle=exact_middle)
        if meta.num_prefills:
            rows = slice(decode_tokens, num_tokens)
            if meta.prefill_route == "decode":
                # after_store also after the decodes' launches: the split kernel's wait then waits for the last
                # of them, which ended after the store. So the call launches the variants the decode graphs
                # compiled; its own (launched normally) compiled while serving, once, 5 s at b32 x 1024 on an
                # H200 (vllm-throughput-h200-exact-repeat.md: 742 then 2514 tok/s).
                paged_decode_attention(queries[rows], kv_cache, codec, meta.chunk_block_table, meta.chunk_seq_lens,
                                       self.scale, self.sliding_window, self.softcap, out=output[rows],
                                       query_rotated=rotated is not None, after_store=True, exact=ring)
            else:
                self._prefill(query[rows], key[rows], value[rows], kv_cache, codec, meta, output[rows])
        return output

    def _compile_serving_kernels(self, query, key, value, kv_cache, codec, meta: TurboQuantMetadata) -> None:
        """Compile the Triton kernels that steps other than CUDA-graph decode batches launch, for this layer's
        tensors on its first uncaptured call (vLLM's dummy runs before graph capture), by launches that
        write nothing a step reads: the store at each of its tile shapes with and without decode queries,
        as prefill-only and mixed steps launch it (every slot skipped); decode attention over empty
        sequences at each set of variants (`decode.variant_batches`) of the batches a step can hold (a
        mixed step's decodes, uncaptured, and the "decode" route's chunk tokens, which may outnumber the
        largest captured batch); the gather (where the engine gathers) and the fused extend kernel with its
        rotations over one empty sequence, the latter in both of its program shapes, at both of `rotate`'s
        tile heights where the call has the tokens for the taller one, and at each split count a short chunk
        may take (`extend.split_counts`).
        vLLM's kernel warm-up has no hook for an attention backend, and its dummy batches take none of these
        routes: the first long chunk after a cached prefix stalled serving for seconds of Triton compilation
        (H200, b32 × 1024: 0.69x bf16's tok/s, vllm-throughput-h200-chained-fixed.md), and most likely so did
        a first step of one or two 1K prompts after a warm-up whose first step held more, which stores
        ≤ 2048 tokens without queries (669 and 836 tok/s against about 2515, vllm-throughput-h200-seven.md)."""
        self.serving_uncompiled = False
        if self.kv_sharing_target_layer_name is None:
            for tokens in tile_token_counts(self.max_step_tokens):
                keys, values, queries, skipped, entries = skipped_step(tokens, key, value, query, meta)
                entries = None if self.exact_ring is None else entries
                for with_queries in (False, True):
                    compress_store(keys, values, skipped, kv_cache, codec, queries=queries if with_queries else None,
                                   launch_dependents=with_queries, ring=self.exact_ring, entries=entries)
        self._compile_decode_kernels(query, key, value, kv_cache, codec, meta)
        zeros = torch.zeros(2, dtype=torch.int32, device=kv_cache.device)  # query_start, seq_lens, key_start
        table = meta.block_table[:1]
        if self.gathers:
            keys, values = (torch.empty(1, self.num_kv_heads, self.head_size, dtype=key.dtype, device=key.device)
                            for _ in range(2))
            gather_sequences(key[:1], value[:1], zeros, zeros[:1], kv_cache, codec, table, zeros, 1, keys, values,
                             ring=self.exact_ring)  # None without exact tokens
        for tokens in sorted({1, min(key.shape[0], ROTATE_SHORT_TILE_MAX_TOKENS + 1)}):
            # both program shapes (`extend.extend_launch`): the wide one where the grid would fill the SMs
            for max_query_len in (1, EXTEND_WIDE_ROWS * multiprocessor_count(kv_cache.device)):
                extend_attention(query[:tokens], key[:tokens], value[:tokens], zeros, zeros[:1], kv_cache, codec,
                                 table, self.scale, max_query_len, self.sliding_window, self.softcap,
                                 out=torch.empty(tokens, self.num_heads, self.head_size, dtype=query.dtype,
                                                 device=query.device))
        # the splits a short chunk's programs may take over a long prefix (a reduction per count)
        table_tokens = table.shape[1] * codec.layout.block_size
        for num_splits in extend_split_counts(self.head_size, self.num_kv_heads, table_tokens,
                                              multiprocessor_count(kv_cache.device))[1:]:
            extend_attention(query[:1], key[:1], value[:1], zeros, zeros[:1], kv_cache, codec, table, self.scale, 1,
                             self.sliding_window, self.softcap, num_splits=num_splits,
                             out=torch.empty(1, self.num_heads, self.head_size, dtype=query.dtype, device=query.device))

    def _compile_decode_kernels(self, query, key, value, kv_cache, codec, meta: TurboQuantMetadata) -> None:
        """`paged_decode_attention` as forward calls it, over empty sequences, at each batch of distinct
        kernel variants up to the most decode queries a step holds (`_compile_serving_kernels`): after the
        store as mixed steps call it, and with a ring also handed the store as decode-only steps do (a store
        over skipped slots, the queries unrotated with forward's strides)."""
        most_route_tokens = decode_route_max_tokens(self.num_kv_heads, multiprocessor_count(kv_cache.device),
                                                    self.max_num_seqs)
        most = min(self.max_step_tokens, max(self.max_num_seqs, most_route_tokens))
        table_width = meta.block_table.shape[1]
        rotated = self._stores(key)  # by the store, as forward's queries are
        ring = self.exact_ring
        store_handed = rotated and ring is not None and ring.recent > 0  # forward's decode-only steps
        for batch in variant_batches(codec, self.num_heads // self.num_kv_heads, table_width * codec.layout.block_size,
                                     kv_cache.device, most, rotates_queries=store_handed):
            empty = torch.zeros(batch, dtype=torch.int32, device=kv_cache.device)
            table = torch.zeros(batch, table_width, dtype=torch.int32, device=kv_cache.device)
            out = torch.empty(batch, self.num_heads, self.head_size, dtype=query.dtype, device=kv_cache.device)
            queries = torch.zeros(batch, self.num_heads, self.head_size, device=kv_cache.device,
                                  dtype=torch.float32 if rotated else query.dtype)
            paged_decode_attention(queries, kv_cache, codec, table, empty, self.scale, self.sliding_window,
                                   self.softcap, out=out, query_rotated=rotated, after_store=True, exact=ring,
                                   exact_middle=None if ring is None else (empty, empty))
            if store_handed:
                keys, values, queries, skipped, entries = skipped_step(batch, key, value, query, meta)
                paged_decode_attention(
                    queries, kv_cache, codec, table, empty, self.scale, self.sliding_window, self.softcap, out=out,
                    exact=ring, exact_middle=(empty, empty),
                    store=lambda q: compress_store(keys, values, skipped, kv_cache, codec, queries=q,
                                                   launch_dependents=q is not None, ring=ring, entries=entries))

    def _stores(self, key) -> bool:
        """Whether this layer stores its keys and values (not where it reads the cache of an earlier layer)."""
        return self.kv_sharing_target_layer_name is None and key is not None

    def _store(self, key, value, kv_cache, codec, meta: TurboQuantMetadata, queries: torch.Tensor | None,
               launch_dependents: bool = False) -> torch.Tensor | None:
        """Compress the step's keys and values into the cache, and rotate `queries` in the same launch
        (returned fp32; None where this layer stores nothing)."""
        if not self._stores(key):
            return None
        num_slots = meta.slot_mapping.shape[0]
        return compress_store(key[:num_slots], value[:num_slots], meta.slot_mapping, kv_cache, codec,
                              fixed_tile=envs.VLLM_BATCH_INVARIANT,
                              queries=queries if queries is not None and queries.shape[0] else None,
                              launch_dependents=launch_dependents,
                              ring=self.exact_ring, entries=None if self.exact_ring is None else meta.exact.entries)

    def _prefill(self, query, key, value, kv_cache, codec, meta: TurboQuantMetadata, out: torch.Tensor) -> None:
        route = meta.prefill_route
        if route == "flash" and self.fa_version is not None:
            self._flash_attention(query, key, value, meta.prefill_query_start, meta.prefill_query_start,
                                  meta.prefill_max_query_len, meta.prefill_max_query_len, out)
            return
        prefills = slice(meta.num_decodes, None)
        seq_lens, block_table = meta.seq_lens[prefills], meta.block_table[prefills]
        if route == "gather" and self.fa_version is not None:
            for group in meta.prefill_groups:
                rows, requests = group.rows, group.requests
                keys, values = gather_workspace(group.num_keys, self.num_kv_heads, self.head_size, query.dtype,
                                                query.device)
                gather_sequences(key[rows], value[rows], group.query_start, seq_lens[requests], kv_cache, codec,
                                 block_table[requests], group.key_start, group.max_seq_len, keys, values,
                                 ring=self.exact_ring)
                self._flash_attention(query[rows], keys, values, group.query_start, group.key_start,
                                      group.max_query_len, group.max_seq_len, out[rows])
            return
        extend_attention(
            query, key, value, meta.prefill_query_start, seq_lens, kv_cache, codec, block_table, self.scale,
            meta.prefill_max_query_len, self.sliding_window, self.softcap, out=out)

    def _flash_attention(self, query, keys, values, query_start, key_start, max_query_len: int, max_seq_len: int,
                         out: torch.Tensor) -> None:
        """Causal varlen FlashAttention; each sequence's queries are its last keys (bottom-right aligned)."""
        flash_attn_varlen_func(
            q=query, k=keys, v=values, max_seqlen_q=max_query_len, cu_seqlens_q=query_start,
            max_seqlen_k=max_seq_len, cu_seqlens_k=key_start, softmax_scale=self.scale, causal=True,
            window_size=[self.sliding_window - 1, 0] if self.sliding_window else [-1, -1],
            softcap=self.softcap or 0.0, fa_version=self.fa_version, out=out)
