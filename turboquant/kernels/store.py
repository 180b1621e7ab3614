"""Compress-store: new keys and values → normalized, rotated, quantized, packed, written to their
slots of the paged cache. One launch per layer; the rotation is a tile matmul inside the kernel
(`rotate.rotated_columns`).
Reference: `reference.compress_store_reference`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from .codec import KernelCodec, PackedBits
from .exact_ring import ExactRing
from .launch import (check_codec_device, check_device_tensor, check_kv, head_dim_pad, page_constants,
                     programmatic_launch_available)
from .packed_tile import store_codes
from .rotate import load_head_rows, rotated_columns, rotation_columns, rotation_operand, store_rotated_block


@triton.jit
def _slots(slot_mapping_ptr, tokens, num_tokens, BLOCK_SIZE: tl.constexpr):
    """(valid rows, cache blocks, offsets in the block) of `tokens`' slots; vLLM pads with slot −1."""
    slots = tl.load(slot_mapping_ptr + tokens, mask=tokens < num_tokens, other=-1).to(tl.int64)
    rows_valid = slots >= 0
    slots = tl.maximum(slots, 0)
    return rows_valid, slots // BLOCK_SIZE, slots % BLOCK_SIZE


@triton.jit
def _safe_divide(numerators, denominators):
    return numerators / tl.maximum(denominators, 1.1754943508222875e-38)  # a zero vector keeps norm 0


@triton.jit
def _load_rows(x_ptr, stride_token, stride_head, tokens, rows_valid, head, HEAD_DIM: tl.constexpr,
               HEAD_DIM_PAD: tl.constexpr):
    """(x [ROWS, HEAD_DIM_PAD] zero-padded, its fp32 row norms, their inverses)."""
    x = load_head_rows(x_ptr, stride_token, stride_head, tokens, rows_valid, head, HEAD_DIM, HEAD_DIM_PAD)
    x32 = x.to(tl.float32)
    norms = tl.sqrt(tl.sum(x32 * x32, axis=1))
    return x, norms, _safe_divide(1.0, norms)


@triton.jit
def _quantize_block(x, inverse_norms, block, rotation_ptr, centroids_ptr, boundaries_ptr, code_ptrs, rows_valid,
                    ring_ptrs, ring_rows, NORM_CORRECTION: tl.constexpr, BITS: tl.constexpr, COORDS: tl.constexpr,
                    GROUP_BYTES: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    PART_SCALE: tl.constexpr, SIGN_SCALE: tl.constexpr, COLUMNS: tl.constexpr, ROWS: tl.constexpr,
                    RING: tl.constexpr):
    """Rotate, quantize and pack coordinates block·COLUMNS … of each row (RING: also store the rotated
    unit coordinates of the `ring_rows` at `ring_ptrs`, fp16); returns the rows' Σ level² over them (0
    without norm correction)."""
    dims = tl.arange(0, HEAD_DIM_PAD)
    columns = block * COLUMNS + tl.arange(0, COLUMNS)
    rotated = rotated_columns(x, rotation_ptr, columns, dims, HEAD_DIM, PART_SCALE, SIGN_SCALE, False)
    unit = rotated * inverse_norms[:, None]
    if RING:
        tl.store(ring_ptrs[:, None] + columns[None, :], unit.to(tl.float16),
                 mask=ring_rows[:, None] & (columns < HEAD_DIM)[None, :])
    # Nearest level = number of decision boundaries below the value (torch.bucketize), stored as its code
    # (`core.packing.sign_magnitude`: the half it is in, then its magnitude's rank).
    codes = tl.zeros([ROWS, COLUMNS], dtype=tl.int32)
    if BITS <= 4:
        # The codebook is symmetric (boundary 2^(BITS-1) − 1 is 0, the others ± p): count the ≤ 7 positive
        # boundaries p below |v|, uniform loads, no gathers. v > 0 takes level 2^(BITS-1) + #(p < v), its
        # code; v ≤ 0 takes 2^(BITS-1) − 1 − #(p ≤ −v), code #(p ≤ −v), counted as #(p < the next float
        # above −v), as bucketize does.
        positive = unit > 0.0
        above = ((-unit).to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)
        magnitude = tl.where(positive, unit, above)
        for j in tl.static_range(1 << (BITS - 1), (1 << BITS) - 1):
            codes += (magnitude > tl.load(boundaries_ptr + j)).to(tl.int32)
        codes = tl.where(positive, (1 << (BITS - 1)) + codes, codes)
    else:  # binary search over 255 boundaries, then the index's code
        for step in tl.static_range(BITS):
            candidate = codes + (1 << (BITS - 1 - step))
            codes = tl.where(unit > tl.load(boundaries_ptr + candidate - 1), candidate, codes)
        codes = tl.where(codes < (1 << (BITS - 1)), codes ^ ((1 << (BITS - 1)) - 1), codes)
    levels_sq = tl.zeros([ROWS], dtype=tl.float32)
    if NORM_CORRECTION:
        levels = tl.where((columns < HEAD_DIM)[None, :], tl.load(centroids_ptr + codes), 0.0)
        levels_sq = tl.sum(levels * levels, axis=1)
    store_codes(code_ptrs + block * (COLUMNS * BITS // 8), rows_valid, codes, BITS, COORDS, GROUP_BYTES,
                HEAD_DIM - block * COLUMNS, COLUMNS, ROWS)
    return levels_sq


@triton.jit
def _quantize_rows(x_ptr, stride_token, stride_head, tokens, rows_valid, head, rotation_ptr, centroids_ptr,
                   boundaries_ptr, code_ptrs, norm_ptrs, ring_ptrs, ring_norm_ptrs, ring_rows,
                   NORM_CORRECTION: tl.constexpr,
                   BITS: tl.constexpr, COORDS: tl.constexpr, GROUP_BYTES: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HEAD_DIM_PAD: tl.constexpr, PART_SCALE: tl.constexpr, SIGN_SCALE: tl.constexpr,
                   COLUMNS: tl.constexpr, ROWS: tl.constexpr, RING: tl.constexpr):
    x, norms, inverse_norms = _load_rows(x_ptr, stride_token, stride_head, tokens, rows_valid, head, HEAD_DIM,
                                         HEAD_DIM_PAD)
    levels_sq = tl.zeros([ROWS], dtype=tl.float32)
    for block in tl.static_range(HEAD_DIM_PAD // COLUMNS):
        levels_sq += _quantize_block(x, inverse_norms, block, rotation_ptr, centroids_ptr, boundaries_ptr, code_ptrs,
                                     rows_valid, ring_ptrs, ring_rows, NORM_CORRECTION, BITS, COORDS, GROUP_BYTES,
                                     HEAD_DIM, HEAD_DIM_PAD, PART_SCALE, SIGN_SCALE, COLUMNS, ROWS, RING)
    if RING:  # the norm itself: the ring's rows are exact
        tl.store(ring_norm_ptrs, norms, mask=ring_rows)
    if NORM_CORRECTION:
        norms = _safe_divide(norms, tl.sqrt(levels_sq))
    tl.store(norm_ptrs.to(tl.pointer_type(tl.float32)), norms, mask=rows_valid)


@triton.jit(do_not_specialize=["num_tokens", "num_query_tokens"])  # they change every step: one variant for all
def _compress_store_kernel(
    keys_ptr, values_ptr, slot_mapping_ptr, rotation_ptr, cache_ptr,
    key_centroids_ptr, key_boundaries_ptr, value_centroids_ptr, value_boundaries_ptr, queries_ptr,
    rotated_queries_ptr, entries_ptr, ring_keys_ptr, ring_values_ptr, ring_key_norms_ptr, ring_value_norms_ptr,
    slot_of_entry_ptr, entry_of_slot_ptr, num_tokens, num_query_tokens, stride_key_token, stride_key_head,
    stride_value_token, stride_value_head, stride_query_token, stride_query_head, stride_rotated_token,
    stride_rotated_head,
    GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_PAGE_BYTES: tl.constexpr,
    VALUES_OFFSET: tl.constexpr, KEY_NORMS_OFFSET: tl.constexpr, VALUE_NORMS_OFFSET: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NORM_CORRECTION: tl.constexpr,
    KEY_BITS: tl.constexpr, KEY_COORDS: tl.constexpr, KEY_GROUP_BYTES: tl.constexpr, KEY_BYTES: tl.constexpr,
    VALUE_BITS: tl.constexpr, VALUE_COORDS: tl.constexpr, VALUE_GROUP_BYTES: tl.constexpr,
    VALUE_BYTES: tl.constexpr, PART_SCALE: tl.constexpr, SIGN_SCALE: tl.constexpr, COLUMNS: tl.constexpr,
    ROWS: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr, RING: tl.constexpr,
):
    if LAUNCH_DEPENDENTS:  # the decode launched next may start now; it waits for this one before reading
        gdc_launch_dependents()
    tile, head, role = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tokens = tile * ROWS + tl.arange(0, ROWS)
    if role >= 2:  # query head head · GROUP + role − 2 of the first num_query_tokens tokens: rotated only
        query_head, rows_valid = head * GROUP + role - 2, tokens < num_query_tokens
        x = load_head_rows(queries_ptr, stride_query_token, stride_query_head, tokens, rows_valid, query_head,
                           HEAD_DIM, HEAD_DIM_PAD)
        for block in tl.static_range(HEAD_DIM_PAD // COLUMNS):
            store_rotated_block(x, block, rotation_ptr, rotated_queries_ptr, stride_rotated_token, stride_rotated_head,
                                tokens, rows_valid, query_head, HEAD_DIM, HEAD_DIM_PAD, PART_SCALE, SIGN_SCALE, False,
                                COLUMNS)
        return
    rows_valid, blocks, offsets = _slots(slot_mapping_ptr, tokens, num_tokens, BLOCK_SIZE)
    page_ptrs = cache_ptr + (blocks * NUM_KV_HEADS + head) * HEAD_PAGE_BYTES
    # RING (`exact_ring.py`): tokens with an entry also go there, rotated, as unit rows and norms; each
    # stored slot records its entry (−1: none), written by one head's key programs
    entries = tl.full([ROWS], -1, tl.int64)
    if RING:
        entries = tl.load(entries_ptr + tokens, mask=rows_valid, other=-1).to(tl.int64)
        if (role == 0) & (head == 0):
            slots = blocks * BLOCK_SIZE + offsets
            tl.store(entry_of_slot_ptr + slots, entries.to(tl.int32), mask=rows_valid)
            tl.store(slot_of_entry_ptr + entries, slots, mask=rows_valid & (entries >= 0))
    ring_rows = rows_valid & (entries >= 0)
    ring_row = tl.maximum(entries, 0) * NUM_KV_HEADS + head
    if role == 0:
        _quantize_rows(keys_ptr, stride_key_token, stride_key_head, tokens, rows_valid, head, rotation_ptr,
                       key_centroids_ptr, key_boundaries_ptr, page_ptrs + offsets * KEY_BYTES,
                       page_ptrs + KEY_NORMS_OFFSET + offsets * 4, ring_keys_ptr + ring_row * HEAD_DIM,
                       ring_key_norms_ptr + ring_row, ring_rows, NORM_CORRECTION, KEY_BITS, KEY_COORDS,
                       KEY_GROUP_BYTES, HEAD_DIM, HEAD_DIM_PAD, PART_SCALE, SIGN_SCALE, COLUMNS, ROWS, RING)
    else:
        _quantize_rows(values_ptr, stride_value_token, stride_value_head, tokens, rows_valid, head, rotation_ptr,
                       value_centroids_ptr, value_boundaries_ptr, page_ptrs + VALUES_OFFSET + offsets * VALUE_BYTES,
                       page_ptrs + VALUE_NORMS_OFFSET + offsets * 4, ring_values_ptr + ring_row * HEAD_DIM,
                       ring_value_norms_ptr + ring_row, ring_rows, NORM_CORRECTION, VALUE_BITS, VALUE_COORDS,
                       VALUE_GROUP_BYTES, HEAD_DIM, HEAD_DIM_PAD, PART_SCALE, SIGN_SCALE, COLUMNS, ROWS, RING)


# Up to this many tokens a store is latency-bound (a decode step of up to 64 sequences): 16-bit rows at
# head_dim ≤ 128 are then rotated in one block of dots, not two of 64 columns, a shorter chain of R loads
# and dots. H200, d=128, 1 / 32 tokens, dense three-part rotations (`kernels-store-h200-columns.md`; with
# a Hadamard rotation's one sign-matrix dot since, k4v4 takes 3.9 / 4.8 µs: `kernels-store-h200-signs.md`):
# k4v4 6.3 / 6.3 → 5.4 / 5.6 µs, k3v3 5.9 / 6.2 → 5.0 / 5.2, k8v4 9.8 / 10.4 → 7.7 / 8.5. Longer calls
# keep two blocks: with one, their 64-row tiles take 235–255 registers a thread, against 158–174, and
# spill at 8 bits and at 3 bits with a dense rotation (sm_90, `benchmarks/store_sass.py` →
# store-sass.json); a probe found no gain at 128 tokens.
ONE_BLOCK_MAX_TOKENS = 64
# Up to this many tokens a program stores 16 rows (more programs: a decode step's few tokens fill the
# device); above it 64, which loads R a quarter as often. H200, d=128 (`kernels-store-h200-symmetric.md`):
# at 2048 tokens 16 rows took k4v4 22.9 against 24.3 µs, k3v3 21.6 against 25.6, k8v4 41.0 against 44.5;
# at 8192, 64 rows won at k4v4 (75.6 against 82.2) and k8v4 (151.6 against 160.0), not at k3v3 (79.7, 75.1).
SHORT_TILE_MAX_TOKENS = 2048


def tile_token_counts(max_tokens: int) -> list[int]:
    """One token count (up to `max_tokens`) per tile shape that `compress_store` picks by the count: a caller
    that stores once at each, with and without queries, has compiled every variant its later calls launch
    (in an engine, a first short prompt after a warm-up of long ones would compile one mid-serving)."""
    return [count for count in (1, ONE_BLOCK_MAX_TOKENS + 1, SHORT_TILE_MAX_TOKENS + 1) if count <= max_tokens]


def store_columns(head_dim_pad: int, part_scale: float, num_tokens: int | None) -> int:
    """Rotated coordinates per dot in `_compress_store_kernel` (see ONE_BLOCK_MAX_TOKENS); None tokens: the
    same blocks whatever the count (`fixed_tile`: a GPU's dots may round a row differently in another)."""
    if num_tokens is not None and num_tokens <= ONE_BLOCK_MAX_TOKENS and part_scale and head_dim_pad <= 128:
        return head_dim_pad
    return rotation_columns(head_dim_pad, part_scale)


def compress_store(keys: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor, cache: torch.Tensor,
                   codec: KernelCodec, fixed_tile: bool = False, queries: torch.Tensor | None = None,
                   rotated_queries: torch.Tensor | None = None, launch_dependents: bool = False,
                   ring: ExactRing | None = None, entries: torch.Tensor | None = None) -> torch.Tensor | None:
    """Write keys/values [tokens, kv_heads, head_dim] (fp16/bf16/fp32) into `cache` at slot_mapping[i]
    (int32/int64 [tokens], block · block_size + offset; negative = skip). `fixed_tile`: one tile height
    whatever the token count, so that a token's codes do not depend on how many were stored with it (a
    GPU's matmul may round a row differently in a taller tile; vLLM's batch-invariant mode needs this).
    `queries` [query tokens ≤ tokens, q_heads, head_dim] (the keys' dtype): also rotated in the same launch,
    as `rotate.rotate` does, into `rotated_queries` (fp32, their shape; allocated when None), which is
    returned: what `paged_decode_attention(..., query_rotated=True)` reads. One launch fewer per decode step.
    `launch_dependents`: the decode launched next by programmatic dependent launch may start while this
    one runs (`paged_decode_attention(..., after_store=True)`). `ring` with `entries` (int32 [≥ tokens], −1:
    none): token i also goes to entry entries[i] of the ring, and every stored slot records its entry."""
    layout = codec.layout
    layout.check_cache(cache)
    check_codec_device(codec, cache)
    check_kv(keys, values, layout, cache.device)
    check_device_tensor(slot_mapping, "slot_mapping", (torch.int32, torch.int64), (keys.shape[0],), cache.device)
    num_tokens = keys.shape[0]
    if values.dtype != keys.dtype:
        raise ValueError(f"keys and values must have one dtype, got {keys.dtype} and {values.dtype}")
    group = 0
    if queries is not None:
        if not isinstance(queries, torch.Tensor) or queries.ndim != 3 or queries.shape[0] > num_tokens \
                or queries.shape[2] != layout.head_dim or queries.shape[1] % layout.num_kv_heads:
            raise ValueError(f"queries must be [query tokens <= {num_tokens}, a multiple of {layout.num_kv_heads} "
                             f"heads, {layout.head_dim}], got "
                             f"{tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__}")
        check_device_tensor(queries, "queries", (keys.dtype,), None, cache.device)
        if rotated_queries is None:
            rotated_queries = torch.empty(queries.shape, dtype=torch.float32, device=cache.device)
        check_device_tensor(rotated_queries, "rotated_queries", (torch.float32,), queries.shape, cache.device)
        group = queries.shape[1] // layout.num_kv_heads
    if ring is not None:
        ring.check(layout, cache)
        check_device_tensor(entries, "entries", (torch.int32,), None, cache.device)
        if entries.ndim != 1 or entries.shape[0] < num_tokens:
            raise ValueError(f"entries must be int32 [>= {num_tokens}], got {tuple(entries.shape)}")
    if num_tokens == 0:
        return rotated_queries
    rows = 16 if num_tokens <= SHORT_TILE_MAX_TOKENS or fixed_tile else 64
    grid = (triton.cdiv(num_tokens, rows), layout.num_kv_heads, 2 + group)
    key_bits, value_bits = PackedBits.of(layout.key_bits), PackedBits.of(layout.value_bits)
    rotation, part_scale, sign_scale = rotation_operand(codec, keys.dtype)
    # without query programs these pointers and strides are never read
    query_in, query_out = (queries, rotated_queries) if group else (keys, keys)
    # without a ring these pointers are never read either
    ring_tensors = (entries, ring.keys, ring.values, ring.key_norms, ring.value_norms, ring.slot_of_entry,
                    ring.entry_of_slot) if ring is not None \
        else (slot_mapping, keys, values, keys, keys, slot_mapping, slot_mapping)
    _compress_store_kernel[grid](
        keys, values, slot_mapping, rotation, cache,
        codec.key_centroids, codec.key_boundaries, codec.value_centroids, codec.value_boundaries, query_in,
        query_out, *ring_tensors, num_tokens, query_in.shape[0] if group else 0, keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1), query_in.stride(0), query_in.stride(1), query_out.stride(0),
        query_out.stride(1),
        GROUP=group, NORM_CORRECTION=codec.norm_correction, ROWS=rows, PART_SCALE=part_scale, SIGN_SCALE=sign_scale,
        **page_constants(layout),
        KEY_COORDS=key_bits.coords, KEY_GROUP_BYTES=key_bits.group_bytes, VALUE_COORDS=value_bits.coords,
        VALUE_GROUP_BYTES=value_bits.group_bytes,
        COLUMNS=store_columns(head_dim_pad(layout.head_dim), part_scale, None if fixed_tile else num_tokens),
        LAUNCH_DEPENDENTS=launch_dependents and programmatic_launch_available(cache.device), RING=ring is not None,
    )
    return rotated_queries
