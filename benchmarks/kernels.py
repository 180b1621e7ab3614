"""Kernel benchmark (CUDA): TurboQuant decode/extend/store kernels side by side with
(a) bf16 FlashAttention-3 over a paged bf16 cache (vLLM's `vllm_flash_attn`, the offline bundle) and
(b) vLLM 0.26's own TurboQuant decode kernel (`triton_turboquant_decode_attention`) at the same bits.
Extend is timed two ways: the fused kernel, and what the vLLM backend runs for long chunks (gather the
prefix with `gather_sequences`, then FA3 varlen on the contiguous K/V). A decode step ('step') is the
step's store and attention as the vLLM backends launch them: ours `compress_store(..., queries=)` then
`paged_decode_attention(..., query_rotated=True)`, bf16 vLLM's `reshape_and_cache_flash` then FA3; and
ours with an exact ring (`kernels/exact_ring.py`, the vLLM default, exact_sinks 4 / exact_recent 32) that
holds every sequence's sinks and latest tokens, so each of those reads comes from the ring.

    python benchmarks/kernels.py [--out benchmarks/results/kernels-h100.json] [--quick] [--only extend]
                                 [--grid 1,8x1024,4096] [--table-tokens 33024]

Every time is one CUDA-graph replay of 20 back-to-back calls divided by 20 (launch overhead hidden, as in
vLLM's decode graphs), median of 5 replays. GB/s = cache bytes the call must read ÷ time; the copy
bandwidth is (read + written bytes) ÷ time of a 4 GiB device-to-device copy. Caches hold random codes and
norms: the kernels' speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.core.rotation import hadamard_matrix  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402
from turboquant.kernels.exact_ring import ExactRing  # noqa: E402
from turboquant.kernels import decode as decode_module  # noqa: E402
from turboquant.kernels import decode_fragments  # noqa: E402
from turboquant.kernels import store as store_module  # noqa: E402
from turboquant.kernels.decode import fragment_min_span, paged_decode_attention  # noqa: E402
from turboquant.kernels import extend_hopper  # noqa: E402
from turboquant.kernels.extend import extend_attention  # noqa: E402
from turboquant.kernels.gather import gather_sequences  # noqa: E402
from turboquant.kernels.rotate import rotate  # noqa: E402
from turboquant.kernels.store import compress_store  # noqa: E402

BLOCK_SIZE = 16  # vLLM's default page size, for all three caches
EXACT_SINKS, EXACT_RECENT = 4, 32  # the step's exact ring
CALLS_PER_GRAPH = 20


def captured(fn, calls: int = CALLS_PER_GRAPH) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` back-to-back calls of fn (warmed up eagerly first, then on a side stream)."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def graph_time_ms(fn) -> float:
    graph = captured(fn)
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS_PER_GRAPH)
    del graph
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    src = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_time_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * (4 << 30) / ms / 1e6


def parse_cells(text: str, fields: int) -> list[tuple[int, ...]]:
    """Comma-separated items of `fields` positive integers joined by 'x' (BATCHxCONTEXT, ...); ValueError
    otherwise. The decode scripts' --cells."""
    cells = [tuple(int(n) for n in item.split("x")) for item in text.split(",")]
    if any(len(cell) != fields or min(cell) < 1 for cell in cells):
        raise ValueError(f"expected items of {fields} positive integers joined by 'x', got {text!r}")
    return cells


def kernel_module(source: str, name: str, directory: Path):
    """`source`, a copy of a `turboquant/kernels` module (edited, or as of another revision), loaded as
    `turboquant.kernels.<name>` from a file in `directory`: its relative imports resolve against this
    checkout, and Gluon, which reads a kernel's source file, finds it."""
    path = directory / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"turboquant.kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def block_table_for(batch: int, context: int, table_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(block table, sequence lengths, blocks): `context` tokens per sequence on random pages; the table
    is as wide as `table_tokens` where that is longer (vLLM's are as wide as the model's maximum length),
    its unused entries page 0."""
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int64).to(torch.int32).reshape(batch, blocks_per_seq)
    width = math.ceil(table_tokens / BLOCK_SIZE)
    if width > blocks_per_seq:
        table = torch.cat([table, table.new_zeros(batch, width - blocks_per_seq)], dim=1)
    return table, torch.full((batch,), context, dtype=torch.int32, device="cuda"), num_blocks


def random_compressed_cache(codec: KernelCodec, num_blocks: int) -> torch.Tensor:
    cache = torch.randint(0, 256, codec.layout.cache_shape(num_blocks), dtype=torch.uint8, device="cuda")
    for norms in codec.layout.views(cache)[2:]:
        norms.uniform_(0.5, 2.0)
    return cache


def random_bf16_cache(num_blocks: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged bf16 key and value caches [blocks, BLOCK_SIZE, kv_heads, head_dim], as vLLM's FA backend holds them."""
    key_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    return key_cache, torch.randn_like(key_cache)


class Baselines:
    """vLLM's FA3 and TurboQuant kernels, when vLLM is importable."""

    def __init__(self):
        try:
            from vllm.vllm_flash_attn import flash_attn_varlen_func, is_fa_version_supported
            from vllm.v1.attention.ops.triton_turboquant_decode import triton_turboquant_decode_attention
            from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig as VllmTQ
            from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
        except ImportError as error:
            self.error = f"vLLM not importable: {error}"
            return
        from vllm._custom_ops import reshape_and_cache_flash
        self.error = None if is_fa_version_supported(3) else "FA3 not supported here"
        self.flash_attn_varlen_func, self.reshape_and_cache_flash = flash_attn_varlen_func, reshape_and_cache_flash
        self.tq_decode, self.VllmTQ, self.get_centroids = triton_turboquant_decode_attention, VllmTQ, get_centroids

    def fa3_decode(self, query, key_cache, value_cache, table, seq_lens, context):
        batch = query.shape[0]
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        return lambda: self.flash_attn_varlen_func(
            query, key_cache, value_cache, max_seqlen_q=1, cu_seqlens_q=cu_q, max_seqlen_k=context,
            seqused_k=seq_lens, softmax_scale=query.shape[-1] ** -0.5, causal=True, block_table=table, fa_version=3)

    def bf16_store(self, keys, values, key_cache, value_cache, slots):
        """vLLM's store into its paged bf16 cache, as its FlashAttention backend calls it."""
        scale = torch.ones(1, dtype=torch.float32, device="cuda")
        return lambda: self.reshape_and_cache_flash(keys, values, key_cache, value_cache, slots, "auto", scale, scale)

    def fa3_extend(self, query, key_cache, value_cache, table, seq_lens, chunk, context):
        cu_q = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
        return lambda: self.flash_attn_varlen_func(
            query, key_cache, value_cache, max_seqlen_q=chunk, cu_seqlens_q=cu_q, max_seqlen_k=context,
            seqused_k=seq_lens, softmax_scale=query.shape[-1] ** -0.5, causal=True, block_table=table, fa_version=3)

    def fa3_gathered_extend(self, query, keys, values, chunk, context):
        """FA3 over contiguous K/V of one sequence whose last `chunk` keys are the queries' own."""
        cu_q = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, context], dtype=torch.int32, device="cuda")
        return lambda: self.flash_attn_varlen_func(
            query, keys, values, max_seqlen_q=chunk, cu_seqlens_q=cu_q, max_seqlen_k=context, cu_seqlens_k=cu_k,
            softmax_scale=query.shape[-1] ** -0.5, causal=True, fa_version=3)

    def vllm_tq_decode(self, preset, query, num_kv_heads, table, seq_lens, num_blocks):
        head_dim = query.shape[-1]
        config = self.VllmTQ.from_cache_dtype(preset, head_dim)
        cache = torch.randint(0, 256, (num_blocks, BLOCK_SIZE, num_kv_heads, config.slot_size_aligned),
                              dtype=torch.uint8, device="cuda")
        rotation = (hadamard_matrix(head_dim) / math.sqrt(head_dim)).float().cuda()
        centroids = self.get_centroids(head_dim, config.centroid_bits).cuda()
        fn = lambda: self.tq_decode(
            query=query, kv_cache=cache, block_table=table, seq_lens=seq_lens, Pi=rotation, centroids=centroids,
            scale=head_dim**-0.5, mse_bits=config.key_mse_bits, key_packed_size=config.key_packed_size,
            value_quant_bits=config.effective_value_quant_bits, key_fp8=config.key_fp8,
            norm_correction=config.norm_correction, PiT=rotation.T.contiguous(), max_num_kv_splits=32)
        return fn, cache, config.slot_size_aligned


def dense_rotation(codec: KernelCodec) -> KernelCodec:
    """The codec with its rotation taken as dense even where it is a scaled sign matrix (`codec.sign_form`):
    the kernels then multiply 16-bit rows by R's three 16-bit parts, as they all did before."""
    return dataclasses.replace(codec, rotation_signs=None, rotation_sign_scale=0.0)


def split_kernels(codec: KernelCodec, batch: int, group: int, table_tokens: int, context: int) -> str:
    """Which split kernels `paged_decode_attention` launches for the call, and which one serves its sequences."""
    min_span = fragment_min_span(codec, batch, group, table_tokens, torch.device("cuda"))
    if min_span is None:
        return "triton"
    return f"both: {'fragments' if context >= min_span else 'triton'}"


def decode_cell(baselines: Baselines, shape: dict, batch: int, context: int, preset: str, vllm_preset: str | None,
                copy_gbs: float, table_tokens: int = 0) -> dict:
    num_q_heads, num_kv_heads, head_dim = shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"]
    codec = KernelCodec.from_config(TurboQuantConfig.from_preset(preset), head_dim, num_kv_heads, BLOCK_SIZE,
                                    device="cuda")
    table, seq_lens, num_blocks = block_table_for(batch, context, table_tokens)
    query = torch.randn(batch, num_q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    tokens = batch * context
    cell = {"shape": shape["name"], "batch": batch, "context": context, "preset": preset,
            "table_tokens": table.shape[1] * BLOCK_SIZE}

    cache = random_compressed_cache(codec, num_blocks)
    ms = graph_time_ms(lambda: paged_decode_attention(query, cache, codec, table, seq_lens, head_dim**-0.5))
    ours_bytes = tokens * codec.layout.bytes_per_token
    cell["ours"] = {"ms": ms, "bytes": ours_bytes, "gbs": ours_bytes / ms / 1e6,
                    "fraction_of_copy_bw": ours_bytes / ms / 1e6 / copy_gbs,
                    "split_kernel": split_kernels(codec, batch, num_q_heads // num_kv_heads,
                                                  table.shape[1] * BLOCK_SIZE, context)}
    if cell["ours"]["split_kernel"].startswith("both"):  # the same launches, the fragment kernel's not overlapped
        with mock.patch.object(decode_module, "programmatic_launch_available", lambda device: False):
            cell["ours_unoverlapped_ms"] = graph_time_ms(
                lambda: paged_decode_attention(query, cache, codec, table, seq_lens, head_dim**-0.5))
        # overlapped, but the reduction launched after the fragment kernel ends
        with mock.patch.object(decode_module, "CHAIN_REDUCTION_AFTER_FRAGMENTS", False):
            cell["ours_reduction_unchained_ms"] = graph_time_ms(
                lambda: paged_decode_attention(query, cache, codec, table, seq_lens, head_dim**-0.5))
    for fragments in (False, True):  # each split kernel forced, where it can serve
        if fragments and decode_fragments.unsupported_reason(codec, num_q_heads // num_kv_heads, query.device):
            continue
        cell[f"ours_{'fragments' if fragments else 'triton'}_ms"] = graph_time_ms(
            lambda: paged_decode_attention(query, cache, codec, table, seq_lens, head_dim**-0.5, fragments=fragments))
    if codec.rotation_signs is not None:
        dense = dense_rotation(codec)
        cell["ours_dense_rotation_ms"] = graph_time_ms(
            lambda: paged_decode_attention(query, cache, dense, table, seq_lens, head_dim**-0.5))
    del cache

    if baselines.error is None:
        key_cache, value_cache = random_bf16_cache(num_blocks, num_kv_heads, head_dim)
        ms = graph_time_ms(baselines.fa3_decode(query, key_cache, value_cache, table, seq_lens, context))
        bf16_bytes = 2 * key_cache.numel() * 2 * tokens // (num_blocks * BLOCK_SIZE)
        cell["fa3_bf16"] = {"ms": ms, "bytes": bf16_bytes, "gbs": bf16_bytes / ms / 1e6}
        del key_cache, value_cache
        cell["speedup_vs_fa3"] = cell["fa3_bf16"]["ms"] / cell["ours"]["ms"]
        if vllm_preset:
            fn, tq_cache, slot = baselines.vllm_tq_decode(vllm_preset, query, num_kv_heads, table, seq_lens, num_blocks)
            ms = graph_time_ms(fn)
            tq_bytes = tokens * num_kv_heads * slot
            cell["vllm_tq"] = {"preset": vllm_preset, "ms": ms, "bytes": tq_bytes, "gbs": tq_bytes / ms / 1e6}
            cell["speedup_vs_vllm_tq"] = ms / cell["ours"]["ms"]
            del tq_cache
    torch.cuda.empty_cache()
    return cell


@dataclasses.dataclass
class DecodeStep:
    """One decode step's inputs: each sequence's newest token (keys, values, query) at position context − 1
    of a random compressed cache, `slots` where it is stored."""
    codec: KernelCodec
    table: torch.Tensor
    seq_lens: torch.Tensor
    num_blocks: int
    slots: torch.Tensor
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    out: torch.Tensor
    cache: torch.Tensor


def decode_step(num_q_heads: int, num_kv_heads: int, head_dim: int, preset: str, batch: int, context: int,
                table_tokens: int) -> DecodeStep:
    codec = KernelCodec.from_config(TurboQuantConfig.from_preset(preset), head_dim, num_kv_heads, BLOCK_SIZE,
                                    device="cuda")
    table, seq_lens, num_blocks = block_table_for(batch, context, table_tokens)
    last = seq_lens.long() - 1
    slots = table.gather(1, (last // BLOCK_SIZE)[:, None]).squeeze(1).long() * BLOCK_SIZE + last % BLOCK_SIZE
    query = torch.randn(batch, num_q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(batch, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    return DecodeStep(codec, table, seq_lens, num_blocks, slots, query, keys, torch.randn_like(keys),
                      torch.empty_like(query), random_compressed_cache(codec, num_blocks))


def step_cell(baselines: Baselines, shape: dict, batch: int, context: int, table_tokens: int) -> dict:
    """One decode step's attention at k4v4: each sequence's newest token stored at position context − 1,
    then its query attends to all `context` keys (see the module docstring)."""
    num_q_heads, num_kv_heads, head_dim = shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"]
    step = decode_step(num_q_heads, num_kv_heads, head_dim, "k4v4", batch, context, table_tokens)
    codec, table, seq_lens, num_blocks, slots = step.codec, step.table, step.seq_lens, step.num_blocks, step.slots
    query, keys, values, out, cache = step.query, step.keys, step.values, step.out, step.cache
    del step

    def ours(chained: bool):  # chained: the split kernel starts while the store runs, as the backend launches it
        rotated = compress_store(keys, values, slots, cache, codec, queries=query, launch_dependents=chained)
        paged_decode_attention(rotated, cache, codec, table, seq_lens, head_dim**-0.5, out=out, query_rotated=True,
                               after_store=chained)
    cell = {"shape": shape["name"], "batch": batch, "context": context, "preset": "k4v4",
            "table_tokens": table.shape[1] * BLOCK_SIZE, "ours_ms": graph_time_ms(lambda: ours(True)),
            "ours_unchained_ms": graph_time_ms(lambda: ours(False))}
    ring, entries, middle = filled_exact_ring(codec, cache, table, seq_lens)

    def ours_exact():
        rotated = compress_store(keys, values, slots, cache, codec, queries=query, launch_dependents=True, ring=ring,
                                 entries=entries)
        paged_decode_attention(rotated, cache, codec, table, seq_lens, head_dim**-0.5, out=out, query_rotated=True,
                               after_store=True, exact=ring, exact_middle=middle)
    cell["ours_exact_ms"] = graph_time_ms(ours_exact)
    del cache, ring
    if baselines.error is None:
        key_cache, value_cache = random_bf16_cache(num_blocks, num_kv_heads, head_dim)
        store = baselines.bf16_store(keys, values, key_cache, value_cache, slots)
        attend = baselines.fa3_decode(query, key_cache, value_cache, table, seq_lens, context)

        def bf16():
            store()
            attend()
        cell["bf16_ms"] = graph_time_ms(bf16)
        cell["speedup_vs_bf16"] = cell["bf16_ms"] / cell["ours_ms"]
        del key_cache, value_cache
    torch.cuda.empty_cache()
    return cell


def filled_exact_ring(codec: KernelCodec, cache: torch.Tensor, table: torch.Tensor, seq_lens: torch.Tensor):
    """An exact ring holding each sequence's first EXACT_SINKS and latest EXACT_RECENT tokens (random rows),
    the step's entries (each sequence's newest token stored again at its entry) and the middle's bounds."""
    batch, per_sequence = seq_lens.shape[0], EXACT_SINKS + EXACT_RECENT
    ring = ExactRing.allocate(batch * per_sequence, codec.layout, cache.shape[0], EXACT_SINKS, EXACT_RECENT, "cuda")
    lengths = seq_lens.long()[:, None]
    index = torch.arange(per_sequence, device="cuda")
    positions = torch.where(index < EXACT_SINKS, index, lengths - EXACT_RECENT + index - EXACT_SINKS)  # [batch, n]
    slots = table.long().gather(1, positions // BLOCK_SIZE) * BLOCK_SIZE + positions % BLOCK_SIZE
    shape = (batch * per_sequence, codec.layout.num_kv_heads, codec.layout.head_dim)
    compress_store(torch.randn(shape, device="cuda", dtype=torch.bfloat16),
                   torch.randn(shape, device="cuda", dtype=torch.bfloat16), slots.flatten(), cache, codec, ring=ring,
                   entries=torch.arange(shape[0], device="cuda", dtype=torch.int32))
    entries = (torch.arange(batch, device="cuda") * per_sequence + per_sequence - 1).to(torch.int32)
    middle = ((seq_lens - EXACT_RECENT).clamp(min=EXACT_SINKS).to(torch.int32),
              torch.full_like(seq_lens, EXACT_SINKS))
    return ring, entries, middle


def fits(shape: dict, batch: int, context: int) -> bool:
    bf16_bytes = 4 * batch * context * shape["num_kv_heads"] * shape["head_dim"]
    return bf16_bytes < 0.6 * torch.cuda.get_device_properties(0).total_memory


def store_cells(baselines: Baselines, shape: dict) -> list[dict]:
    out = []
    for preset in ("k4v4", "k3v3", "k8v4"):
        codec = KernelCodec.from_config(TurboQuantConfig.from_preset(preset), shape["head_dim"], shape["num_kv_heads"],
                                        BLOCK_SIZE, device="cuda")
        for tokens in (1, 32, 128, 512, 2048, 8192):
            cache = codec.layout.allocate(math.ceil(tokens / BLOCK_SIZE) + 1, "cuda")
            keys = torch.randn(tokens, shape["num_kv_heads"], shape["head_dim"], device="cuda", dtype=torch.bfloat16)
            values = torch.randn_like(keys)
            slots = torch.arange(tokens, dtype=torch.int32, device="cuda")
            ms = graph_time_ms(lambda: compress_store(keys, values, slots, cache, codec))
            cell = {"shape": shape["name"], "preset": preset, "tokens": tokens, "ms": ms,
                    "us_per_token": 1000 * ms / tokens}
            with mock.patch.object(store_module, "ONE_BLOCK_MAX_TOKENS", 0):  # two 64-column rotation blocks
                cell["columns_64_ms"] = graph_time_ms(lambda: compress_store(keys, values, slots, cache, codec))
            if tokens > store_module.SHORT_TILE_MAX_TOKENS:  # a prefill chunk's store in a decode step's tiles
                with mock.patch.object(store_module, "SHORT_TILE_MAX_TOKENS", tokens):
                    cell["rows_16_ms"] = graph_time_ms(lambda: compress_store(keys, values, slots, cache, codec))
            if baselines.error is None and preset == "k4v4":  # vLLM's bf16 store of the same tokens
                key_cache, value_cache = random_bf16_cache(math.ceil(tokens / BLOCK_SIZE) + 1, shape["num_kv_heads"],
                                                           shape["head_dim"])
                cell["bf16_store_ms"] = graph_time_ms(baselines.bf16_store(keys, values, key_cache, value_cache,
                                                                           slots.long()))
                del key_cache, value_cache
            dense = dense_rotation(codec) if codec.rotation_signs is not None else None
            if dense is not None:
                cell["dense_rotation_ms"] = graph_time_ms(lambda: compress_store(keys, values, slots, cache, dense))
            if tokens <= 64:  # a decode step: its queries rotated in the store's launch, or in a launch of their own
                queries = torch.randn(tokens, shape["num_q_heads"], shape["head_dim"], device="cuda",
                                      dtype=torch.bfloat16)
                cell["with_queries_ms"] = graph_time_ms(
                    lambda: compress_store(keys, values, slots, cache, codec, queries=queries))
                if dense is not None:
                    cell["dense_rotation_with_queries_ms"] = graph_time_ms(
                        lambda: compress_store(keys, values, slots, cache, dense, queries=queries))
                cell["rotate_queries_ms"] = graph_time_ms(lambda: rotate(queries, codec))
            out.append(cell)
    return out


def extend_case(shape: dict, prefix: int, chunk: int) -> tuple:
    """One chunk of a single sequence over a compressed prefix, as the extend benchmarks time it (k4v4, random
    codes; bf16 query and fresh K/V): (codec, block table, seq_lens, cache, query, keys, values, query_start)."""
    num_q_heads, num_kv_heads, head_dim = shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"]
    codec = KernelCodec.from_config(TurboQuantConfig.from_preset("k4v4"), head_dim, num_kv_heads, BLOCK_SIZE,
                                    device="cuda")
    table, seq_lens, num_blocks = block_table_for(1, prefix + chunk)
    cache = random_compressed_cache(codec, num_blocks)
    query = torch.randn(chunk, num_q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(chunk, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    starts = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
    return codec, table, seq_lens, cache, query, keys, values, starts


def extend_cells(baselines: Baselines, shape: dict, prefix: int, chunks: list[int]) -> list[dict]:
    num_kv_heads, head_dim = shape["num_kv_heads"], shape["head_dim"]
    out = []
    for chunk in chunks:
        context = prefix + chunk
        codec, table, seq_lens, cache, query, keys, values, starts = extend_case(shape, prefix, chunk)
        num_blocks = table.shape[1]  # one sequence's table: every page of the cache, once

        def fused():
            return extend_attention(query, keys, values, starts, seq_lens, cache, codec, table, head_dim**-0.5, chunk)
        ms = graph_time_ms(fused)
        cell = {"shape": shape["name"], "prefix": prefix, "chunk": chunk, "preset": "k4v4", "ours_ms": ms}
        with mock.patch.object(extend_hopper, "enabled", False):  # extend.py's Triton kernel on the same inputs
            cell["ours_triton_kernel_ms"] = graph_time_ms(fused)
        gathered_keys = torch.empty(context, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        gathered_values = torch.empty_like(gathered_keys)
        key_start = torch.tensor([0, context], dtype=torch.int32, device="cuda")

        def gather():
            gather_sequences(keys, values, starts, seq_lens, cache, codec, table, key_start, context, gathered_keys,
                             gathered_values)
        cell["gather_ms"] = graph_time_ms(gather)
        if baselines.error is None:
            attend = baselines.fa3_gathered_extend(query, gathered_keys, gathered_values, chunk, context)

            def gather_then_attend():
                gather()
                attend()
            cell["gather_fa3_ms"] = graph_time_ms(gather_then_attend)
            key_cache, value_cache = random_bf16_cache(num_blocks, num_kv_heads, head_dim)
            cell["fa3_bf16_ms"] = graph_time_ms(
                baselines.fa3_extend(query, key_cache, value_cache, table, seq_lens, chunk, context))
            cell["ratio_to_fa3"] = ms / cell["fa3_bf16_ms"]
            cell["gather_fa3_ratio_to_fa3"] = cell["gather_fa3_ms"] / cell["fa3_bf16_ms"]
            del key_cache, value_cache
        del cache, gathered_keys, gathered_values
        out.append(cell)
        torch.cuda.empty_cache()
    return out


LLAMA_8B = {"name": "llama-3.1-8b", "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128}
HEAD_64 = {"name": "llama-3.2-1b (d=64)", "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 64}
HEAD_256 = {"name": "gemma-2-9b (d=256)", "num_q_heads": 16, "num_kv_heads": 8, "head_dim": 256}


def markdown(result: dict) -> str:
    nan = float("nan")
    lines = [f"Device: {result['device']}, {result['date']}; copy bandwidth {result['copy_gbs']:.0f} GB/s "
             f"(read + write). Times per call (CUDA graph), ms."]
    widths = {c["table_tokens"] for c in result["decode"] + result.get("step", [])
              if c.get("table_tokens", 0) > c["context"]}
    if widths:
        lines += ["", f"Decode block tables {', '.join(map(str, sorted(widths)))} tokens wide, as vLLM's are at that "
                  "max_model_len (`--table-tokens`): each engine is given vLLM's table, and ours picks its split "
                  "kernel and split count from its width."]
    if result["decode"]:
        lines += ["", "Ours: `paged_decode_attention` as called, which picks its split kernel (column 'kernel'); "
                  "'not overlapped' times the same launches where both split kernels run, the fragment "
                  "kernel's launched after the Triton one ends, and 'reduction not chained' with them overlapped "
                  "but the reduction launched after the fragment kernel ends "
                  "(`decode.CHAIN_REDUCTION_AFTER_FRAGMENTS`); the two columns after it time each split kernel "
                  "forced (`fragments=False` / `True`; the "
                  "fragment kernel serves 4-bit keys and values only); 'dense R ms' times the call with its "
                  "Hadamard rotation taken as dense (`dense_rotation`: the query is rotated by R's three 16-bit "
                  "parts, not by its sign matrix).", "",
                  "| shape | preset | batch | context | ours ms | kernel | not overlapped ms "
                  "| reduction not chained ms | Triton split ms | fragment split ms | dense R ms "
                  "| ours GB/s (% copy) | FA3 bf16 ms | vs FA3 | vLLM TQ ms | vs vLLM TQ |",
                  "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["decode"]:
        fa3 = c.get("fa3_bf16", {})
        tq = c.get("vllm_tq", {})
        lines.append(
            f"| {c['shape']} | {c['preset']} | {c['batch']} | {c['context']} | {c['ours']['ms']:.4f} | "
            f"{c['ours'].get('split_kernel', '')} | {c.get('ours_unoverlapped_ms', nan):.4f} | "
            f"{c.get('ours_reduction_unchained_ms', nan):.4f} | {c.get('ours_triton_ms', nan):.4f} | "
            f"{c.get('ours_fragments_ms', nan):.4f} | {c.get('ours_dense_rotation_ms', nan):.4f} | "
            f"{c['ours']['gbs']:.0f} ({100 * c['ours']['fraction_of_copy_bw']:.0f}%) | "
            f"{fa3.get('ms', nan):.4f} | {c.get('speedup_vs_fa3', nan):.2f}x | "
            f"{tq.get('ms', nan):.4f} | {c.get('speedup_vs_vllm_tq', nan):.2f}x |")
    if result["extend"]:
        lines += ["", "Extend: 'fused' is `extend_attention` (on Hopper, `extend_hopper.py`'s Gluon kernel where it "
                  "serves: 4-bit, d=64/128/256); 'Triton kernel' is extend.py's on the same inputs.", "",
                  "| extend: shape | prefix | chunk | fused ms | Triton kernel ms | FA3 bf16 ms | fused / FA3 | "
                  "gather ms | gather + FA3 ms | (gather + FA3) / FA3 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["extend"]:
        lines.append(f"| {c['shape']} | {c['prefix']} | {c['chunk']} | {c['ours_ms']:.3f} | "
                     f"{c.get('ours_triton_kernel_ms', nan):.3f} | "
                     f"{c.get('fa3_bf16_ms', nan):.3f} | {c.get('ratio_to_fa3', nan):.2f} | {c.get('gather_ms', nan):.3f} | "
                     f"{c.get('gather_fa3_ms', nan):.3f} | {c.get('gather_fa3_ratio_to_fa3', nan):.2f} |")
    if result.get("step"):
        lines += ["", "Decode step (store + attention, as the vLLM backends launch them; see the module docstring), "
                  "k4v4, ms; 'not chained': ours with the split kernel launched after the store ends:", "",
                  "| step: shape | batch | context | ours ms | not chained ms | exact ring ms | bf16 (store + FA3) ms "
                  "| vs bf16 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result.get("step", []):
        lines.append(f"| {c['shape']} | {c['batch']} | {c['context']} | {c['ours_ms']:.4f} | "
                     f"{c.get('ours_unchained_ms', nan):.4f} | {c.get('ours_exact_ms', nan):.4f} | "
                     f"{c.get('bf16_ms', nan):.4f} | {c.get('speedup_vs_bf16', nan):.2f}x |")
    if result["store"]:
        lines += ["", "Store: 'ms, 64-column blocks' times the same call with the rotation always in 64-column "
                  "blocks (`store.ONE_BLOCK_MAX_TOKENS` = 0), as every store ran before decode steps took one "
                  "block; 'dense R' the same call with its Hadamard rotation taken as dense (three dots with R's "
                  "16-bit parts, not one with its sign matrix: `dense_rotation`); 'ms, 16-row tiles' a prefill "
                  "chunk's store in a decode step's tile height (`store.SHORT_TILE_MAX_TOKENS`); 'bf16 store' "
                  "vLLM's `reshape_and_cache_flash` of the same tokens into a paged bf16 cache.", "",
                  "| store: shape | preset | tokens | ms | ms, 64-column blocks | ms, dense R | ms, 16-row tiles "
                  "| bf16 store ms | µs/token | ms, queries rotated in it | same, dense R "
                  "| queries rotated alone ms |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["store"]:
        lines.append(f"| {c['shape']} | {c['preset']} | {c['tokens']} | {c['ms']:.4f} | "
                     f"{c.get('columns_64_ms', nan):.4f} | {c.get('dense_rotation_ms', nan):.4f} | "
                     f"{c.get('rows_16_ms', nan):.4f} | {c.get('bf16_store_ms', nan):.4f} | "
                     f"{c['us_per_token']:.4f} | {c.get('with_queries_ms', nan):.4f} | "
                     f"{c.get('dense_rotation_with_queries_ms', nan):.4f} | {c.get('rotate_queries_ms', nan):.4f} |")
    return "\n".join(lines)


def save(result: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/kernels-h100.json")
    parser.add_argument("--quick", action="store_true", help="a few cells only (smoke run)")
    parser.add_argument("--grid", help="decode and step: only Llama-3.1-8B k4v4 at these batches x contexts, "
                                       "e.g. 1,8x1024,4096")
    parser.add_argument("--table-tokens", type=int, default=0,
                        help="decode and step: block tables this many tokens wide, as vLLM's are (its "
                             "max_model_len), so that ours picks its kernel and split count as it does in vLLM "
                             "(default: the context)")
    parser.add_argument("--only", choices=("decode", "extend", "store", "step"), action="append",
                        help="run only these sections (repeatable; default: all)")
    parser.add_argument("--table", default=None, help="print the markdown table of a saved JSON and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return 0
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    import triton

    baselines = Baselines()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "triton": triton.__version__, "block_size": BLOCK_SIZE,
              "baselines": baselines.error or "vLLM FA3 (vllm_flash_attn) and triton_turboquant_decode_attention",
              "copy_gbs": copy_bandwidth_gbs(), "decode": [], "extend": [], "store": [], "step": []}
    print(f"copy bandwidth {result['copy_gbs']:.0f} GB/s; baselines: {result['baselines']}", flush=True)
    sections = set(args.only or ("decode", "extend", "store", "step"))
    batches, contexts = ((8, 32), (1024, 16384)) if args.quick else ((1, 8, 32, 64), (1024, 4096, 16384, 32768, 131072))
    if args.grid:
        batches, contexts = (tuple(map(int, part.split(","))) for part in args.grid.split("x"))
    plan = [(LLAMA_8B, b, c, "k4v4", "turboquant_4bit_nc") for b in batches for c in contexts]
    if not args.grid:
        plan += [(LLAMA_8B, b, c, "k3v3", "turboquant_3bit_nc") for b in (8, 32) for c in (4096, 32768)]
        plan += [(shape, 32, c, "k4v4", "turboquant_4bit_nc") for shape in (HEAD_64, HEAD_256) for c in (4096, 16384)]
    for shape, batch, context, preset, vllm_preset in plan if "decode" in sections else []:
        if not fits(shape, batch, context):
            print(f"skip {shape['name']} b{batch} x {context}: bf16 cache does not fit", flush=True)
            continue
        cell = decode_cell(baselines, shape, batch, context, preset, vllm_preset, result["copy_gbs"], args.table_tokens)
        result["decode"].append(cell)
        print(json.dumps(cell), flush=True)
        save(result, args.out)
    if "extend" in sections:
        result["extend"] = extend_cells(baselines, LLAMA_8B, 16384, [64, 128, 512, 2048])
        for shape in () if args.quick else (HEAD_64, HEAD_256):
            result["extend"] += extend_cells(baselines, shape, 16384, [512, 2048])
    if "store" in sections:
        result["store"] = store_cells(baselines, LLAMA_8B)
    # a step's store and launches matter where attention is short: the grid's contexts, else 1K and 16K
    step_contexts = contexts if args.grid or args.quick else (1024, 16384)
    for batch, context in [(b, c) for b in batches for c in step_contexts] if "step" in sections else []:
        if fits(LLAMA_8B, batch, context):
            result["step"].append(step_cell(baselines, LLAMA_8B, batch, context, args.table_tokens))
            print(json.dumps(result["step"][-1]), flush=True)
    save(result, args.out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
