"""Gather: each sequence's compressed prefix, dequantized and un-rotated, followed by its chunk's fresh
K/V, written as contiguous keys/values [sum of seq_lens, kv_heads, head_dim] — the input of a
FlashAttention varlen call.

This is how a long prefill chunk attends to a compressed prefix fastest: the fused `extend_attention`
unpacks the prefix again for every block of queries, so its cost grows with the chunk length, while
here the prefix is unpacked once per chunk and the attention runs at FlashAttention's speed. The
price is bandwidth: 4 bytes per coordinate written and read back, which a short chunk does not repay
(the vLLM backend picks per step). The fp16 levels are un-rotated by R rounded to fp16 (2^-11
relative: no coarser than the 16-bit K/V that FlashAttention reads), scaled by the fp32 norm, cast on store.
With an exact ring (`exact_ring.py`) a prefix's sinks and latest tokens come from the ring where it still
holds them, as decode steps read them.
Reference: `reference.gather_sequence_reference` per sequence (and `exact_rows_reference`), then the
chunk's own K/V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codec import KernelCodec
from .exact_ring import ExactRing, held_rows, unit_rows
from .launch import (FLOAT_DTYPES, SLICED_METADATA, check_block_table, check_codec_device, check_device_tensor,
                     check_kv, head_dim_pad, lookup_constants, page_constants)
from .packed_tile import load_levels, load_norms

# Tokens per program and output coordinates per dot: 64 × 32 compiles for sm_90 without spilling at every
# head_dim (Triton 3.6 ptxas: 168–251 registers); 64 × 64 spills, 32 × 32 reloads R twice as often.
GATHER_ROWS, GATHER_COLUMNS = 64, 32


@triton.jit
def _gather_rows(page_ptrs, in_prefix, centroids_ptr, norms_ptr, fresh_ptrs, fresh, out_ptrs, in_sequence,
                 rotation_ptr, ring_ptrs, ring_norm_ptrs, exact, BITS: tl.constexpr, ROW_BYTES: tl.constexpr,
                 LUT: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, COLUMNS: tl.constexpr,
                 RING: tl.constexpr):
    """Rows of one role (keys or values): prefix rows from their codes (RING: the `exact` ones from their
    rotated unit rows at `ring_ptrs` and norms at `ring_norm_ptrs`, as codes are), the others copied from
    `fresh_ptrs`."""
    dims = tl.arange(0, HEAD_DIM_PAD)
    if RING:
        levels, norms = unit_rows(ring_ptrs, ring_norm_ptrs, exact, page_ptrs, norms_ptr, in_prefix & ~exact,
                                  centroids_ptr, BITS, ROW_BYTES, HEAD_DIM, HEAD_DIM_PAD, LUT)
    else:
        levels = load_levels(page_ptrs, in_prefix, centroids_ptr, BITS, ROW_BYTES, HEAD_DIM_PAD, LUT)
        norms = load_norms(norms_ptr, in_prefix)
    for block in range(HEAD_DIM_PAD // COLUMNS):  # a loop, not unrolled: one block's addresses live at a time
        columns = block * COLUMNS + tl.arange(0, COLUMNS)
        column_mask = (columns < HEAD_DIM)[None, :]
        # levels @ R; R's zero rows past HEAD_DIM drop the padded levels
        rotation = tl.load(rotation_ptr + dims[:, None] * HEAD_DIM + columns[None, :],
                           mask=(dims < HEAD_DIM)[:, None] & column_mask, other=0.0)
        dequantized = tl.dot(levels, rotation) * norms[:, None]
        copied = tl.load(fresh_ptrs[:, None] + columns[None, :], mask=fresh[:, None] & column_mask, other=0.0)
        rows = tl.where(in_prefix[:, None], dequantized, copied.to(tl.float32))
        tl.store(out_ptrs[:, None] + columns[None, :], rows.to(out_ptrs.dtype.element_ty),
                 mask=in_sequence[:, None] & column_mask)


@triton.jit(do_not_specialize_on_alignment=SLICED_METADATA)
def _gather_kernel(
    keys_ptr, values_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, query_start_ptr, key_start_ptr,
    rotation_ptr, key_centroids_ptr, value_centroids_ptr, out_keys_ptr, out_values_ptr, ring_keys_ptr,
    ring_values_ptr, ring_key_norms_ptr, ring_value_norms_ptr, slot_of_entry_ptr, entry_of_slot_ptr,
    stride_key_token, stride_key_head, stride_value_token, stride_value_head, stride_out_token, stride_out_head,
    stride_table_seq,
    NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_PAGE_BYTES: tl.constexpr,
    VALUES_OFFSET: tl.constexpr, KEY_NORMS_OFFSET: tl.constexpr, VALUE_NORMS_OFFSET: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, KEY_BITS: tl.constexpr, KEY_BYTES: tl.constexpr,
    KEY_LUT: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_BYTES: tl.constexpr, VALUE_LUT: tl.constexpr,
    COLUMNS: tl.constexpr, ROWS: tl.constexpr, RING: tl.constexpr, SINKS: tl.constexpr, RECENT: tl.constexpr,
):
    seq, tile = tl.program_id(0), tl.program_id(1)
    kv_head, role = tl.program_id(2) // 2, tl.program_id(2) % 2  # role 0: keys, 1: values
    seq_len = tl.load(seq_lens_ptr + seq)
    if tile * ROWS < seq_len:
        query_start = tl.load(query_start_ptr + seq)
        prefix_len = seq_len - (tl.load(query_start_ptr + seq + 1) - query_start)
        positions = tile * ROWS + tl.arange(0, ROWS)
        in_sequence = positions < seq_len
        in_prefix = positions < prefix_len
        fresh = in_sequence & (positions >= prefix_len)

        blocks = tl.load(block_table_ptr + seq * stride_table_seq + positions // BLOCK_SIZE, mask=in_prefix, other=0)
        page_ptrs = cache_ptr + (blocks.to(tl.int64) * NUM_KV_HEADS + kv_head) * HEAD_PAGE_BYTES
        offsets = positions % BLOCK_SIZE
        exact = positions < 0  # none, without a ring
        ring_rows = tl.zeros([ROWS], dtype=tl.int64)
        if RING:  # the prefix's sinks and latest tokens whose ring entry still holds their slot
            exact, ring_rows, _ = held_rows(blocks.to(tl.int64) * BLOCK_SIZE + offsets,
                                            in_prefix & ((positions < SINKS) | (positions >= prefix_len - RECENT)),
                                            entry_of_slot_ptr, slot_of_entry_ptr, kv_head, NUM_KV_HEADS)
        fresh_rows = (query_start + positions - prefix_len).to(tl.int64)
        out_offsets = (tl.load(key_start_ptr + seq) + positions).to(tl.int64) * stride_out_token \
            + kv_head * stride_out_head
        if role == 0:
            _gather_rows(page_ptrs + offsets * KEY_BYTES, in_prefix, key_centroids_ptr,
                         page_ptrs + KEY_NORMS_OFFSET + offsets * 4,
                         keys_ptr + fresh_rows * stride_key_token + kv_head * stride_key_head, fresh,
                         out_keys_ptr + out_offsets, in_sequence, rotation_ptr, ring_keys_ptr + ring_rows * HEAD_DIM,
                         ring_key_norms_ptr + ring_rows, exact, KEY_BITS, KEY_BYTES, KEY_LUT, HEAD_DIM, HEAD_DIM_PAD,
                         COLUMNS, RING)
        else:
            _gather_rows(page_ptrs + VALUES_OFFSET + offsets * VALUE_BYTES, in_prefix, value_centroids_ptr,
                         page_ptrs + VALUE_NORMS_OFFSET + offsets * 4,
                         values_ptr + fresh_rows * stride_value_token + kv_head * stride_value_head, fresh,
                         out_values_ptr + out_offsets, in_sequence, rotation_ptr,
                         ring_values_ptr + ring_rows * HEAD_DIM, ring_value_norms_ptr + ring_rows, exact, VALUE_BITS,
                         VALUE_BYTES, VALUE_LUT, HEAD_DIM, HEAD_DIM_PAD, COLUMNS, RING)


def gather_sequences(keys: torch.Tensor, values: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
                     cache: torch.Tensor, codec: KernelCodec, block_table: torch.Tensor, key_start: torch.Tensor,
                     max_seq_len: int, out_keys: torch.Tensor, out_values: torch.Tensor,
                     ring: ExactRing | None = None) -> None:
    """Sequence i — chunk rows query_start[i]:query_start[i+1] of keys/values [tokens, kv_heads, d]
    after a compressed prefix of seq_lens[i] − chunk length tokens — is written to rows
    key_start[i]:key_start[i] + seq_lens[i] of out_keys/out_values [rows, kv_heads, d] (any float
    dtype), prefix first. query_start and key_start are int32 [batch + 1]; `max_seq_len` bounds
    seq_lens (the grid). Rows of `out_*` outside those ranges are left as they are. `ring`: each prefix's
    first `ring.sinks` and latest `ring.recent` tokens from the ring where it still holds them."""
    layout = codec.layout
    layout.check_cache(cache)
    check_codec_device(codec, cache)
    check_kv(keys, values, layout, cache.device)
    batch = seq_lens.shape[0] if isinstance(seq_lens, torch.Tensor) else 0
    check_block_table(block_table, seq_lens, batch, cache.device)
    check_device_tensor(query_start, "query_start", (torch.int32,), (batch + 1,), cache.device)
    check_device_tensor(key_start, "key_start", (torch.int32,), (batch + 1,), cache.device)
    for name, out in (("out_keys", out_keys), ("out_values", out_values)):
        shape = (out.shape[0] if isinstance(out, torch.Tensor) else 0, layout.num_kv_heads, layout.head_dim)
        check_device_tensor(out, name, FLOAT_DTYPES, shape, cache.device)
    if out_keys.stride() != out_values.stride():
        raise ValueError("out_keys and out_values must have the same strides")
    if ring is not None:
        ring.check(layout, cache)
    if batch == 0 or max_seq_len <= 0:
        return
    _gather_kernel[(batch, triton.cdiv(max_seq_len, GATHER_ROWS), 2 * layout.num_kv_heads)](
        keys, values, cache, block_table, seq_lens, query_start, key_start, codec.rotation_fp16_parts[0],
        codec.key_centroids_fp16, codec.value_centroids_fp16, out_keys, out_values,
        # without a ring these pointers are never read; the cache stands in for them because its address is
        # always aligned, so the launch reuses one compiled variant (a sliced stand-in would change with
        # the slice's offset: a compile at serving time)
        *((ring.keys, ring.values, ring.key_norms, ring.value_norms, ring.slot_of_entry, ring.entry_of_slot)
          if ring is not None else (cache,) * 6),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), out_keys.stride(0), out_keys.stride(1),
        block_table.stride(0),
        **page_constants(layout),
        **lookup_constants(codec, bits=(4,)),  # 3-bit byte permutes into tl.dot tiles: Triton 3.6 fails to compile
        COLUMNS=min(GATHER_COLUMNS, head_dim_pad(layout.head_dim)), ROWS=GATHER_ROWS, num_warps=4, num_stages=1,
        RING=ring is not None, SINKS=0 if ring is None else ring.sinks, RECENT=0 if ring is None else ring.recent,
    )
