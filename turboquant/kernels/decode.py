"""Decode attention over the paged compressed cache (flash-decoding: split-K + a reduction).

Per (sequence, kv head, split) one program walks its share of the tokens: it unpacks key indices,
scores them against the rotated query in fp16 on the tensor cores (keys are never un-rotated), scales
each score by the key's fp32 norm, and keeps an fp32 online softmax. Values are accumulated in the
rotated space with their norms folded into the probabilities; the result is un-rotated once.
All query heads of a GQA group share one read of their K/V. The grid depends only on the batch size,
the number of kv heads and `num_splits`, so it can be captured in a CUDA graph.
At k4v4 a call's long sequences go to `decode_fragments`' kernel instead (the same partial outputs, in one
buffer: each kernel skips the other's sequences; `fragment_min_span`).
Reference: `reference.decode_reference`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import decode_fragments
from .codec import KEY_TABLE_ROW, VALUE_TABLE_ROW, KernelCodec
from .exact_ring import ExactRing, exact_window_partials, middle_ends
from .group_query import load_group_query
from .launch import (FLOAT_DTYPES, SLICED_METADATA, check_attention_options, check_block_table, check_codec_device,
                     check_device_tensor, head_dim_pad, lookup_constants, multiprocessor_count, page_constants,
                     programmatic_launch, programmatic_launch_available)
from .packed_tile import lane_lookup_tables, load_levels, load_norms
from .rotate import SHORT_TILE_MAX_TOKENS as ROTATE_SHORT_TILE_MAX_TOKENS
from .rotate import rotate, rotated_columns, rotation_columns, rotation_operand
from .softmax import empty_softmax_state, online_softmax_step, tanh
from .visible_keys import first_visible_key

_KEY_TABLE_ROW, _VALUE_TABLE_ROW = tl.constexpr(KEY_TABLE_ROW), tl.constexpr(VALUE_TABLE_ROW)


def decode_launch(head_dim: int, key_bits: int, value_bits: int, byte_permute: bool) -> dict:
    """Tokens per tile and Triton's warps/pipeline depth, from sweeps on an H100 (b32 × 16K/32K, b8 × 32K;
    benchmarks/results/launch-sweep-h100.json). Byte-permute lookups (`lut_asm.py`) run best without
    software pipelining, 4-bit ones with the shorter tile, except at head_dim 64 and 256 (H200, k4v4: a
    128-token tile 0.76–0.88x the time at d=64, 0.92–0.94x at d=256). TOKEN_ROWS (the kernel's
    orientation) where keys and values are 4-bit lookups: H200, 4–14% faster there (b32 × 1K 0.0381
    against 0.0416 ms), where 3-bit lookups and gathers ran up to 10% slower
    (benchmarks/results/decode-variants-h200.md); with 3-bit lookups at head_dim 128 it wins once capped
    at 128 registers (Triton's maxnreg: 0.95–0.98x, where the cap kept four programs per SM; at d=256 it
    lost), benchmarks/results/decode-variants-h200-rules.md."""
    four_bit = byte_permute and key_bits == value_bits == 4
    if head_dim > 128:
        # d=256 at 3 bits: a 64-token tile exceeds shared memory
        tiling = (dict(TILE=32, num_stages=1) if 3 in (key_bits, value_bits)
                  else dict(TILE=128 if four_bit else 64, num_stages=2))
    elif byte_permute:
        short = 4 in (key_bits, value_bits) and not (four_bit and head_dim <= 64)
        tiling = dict(TILE=64 if short else 128, num_stages=1)
    else:
        tiling = dict(TILE=128, num_stages=2)
    if four_bit:
        orientation = dict(TOKEN_ROWS=True)
    elif byte_permute and head_dim_pad(head_dim) == 128:
        orientation = dict(TOKEN_ROWS=True, maxnreg=128)
    else:
        orientation = dict(TOKEN_ROWS=False)
    return tiling | dict(num_warps=4) | orientation


@triton.jit(do_not_specialize=["min_span", "max_span"], do_not_specialize_on_alignment=SLICED_METADATA)
def _decode_split_kernel(
    query_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, key_starts_ptr, key_centroids_ptr, value_centroids_ptr,
    lut_tables_ptr, rotation_ptr, partial_out_ptr, partial_lse_ptr,
    stride_query_seq, stride_query_head, stride_table_seq, scale, softcap, sliding_window, min_span, max_span,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PARTIAL_SPLITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_PAGE_BYTES: tl.constexpr, VALUES_OFFSET: tl.constexpr,
    KEY_NORMS_OFFSET: tl.constexpr, VALUE_NORMS_OFFSET: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    KEY_BITS: tl.constexpr, KEY_BYTES: tl.constexpr, KEY_LUT: tl.constexpr, VALUE_BITS: tl.constexpr,
    VALUE_BYTES: tl.constexpr, VALUE_LUT: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_STARTS: tl.constexpr, TILE: tl.constexpr, REDUCTION_NEXT: tl.constexpr, READERS_NEXT: tl.constexpr,
    WAIT_FOR_QUERY: tl.constexpr, TOKEN_ROWS: tl.constexpr, ROTATE_QUERY: tl.constexpr, PART_SCALE: tl.constexpr,
    SIGN_SCALE: tl.constexpr,
):
    if REDUCTION_NEXT:  # the reduction, launched programmatically next, waits for this grid to end: start it now
        gdc_launch_dependents()
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    first = first_visible_key(seq_len, seq, key_starts_ptr, sliding_window, USE_WINDOW, USE_STARTS)
    # Launched programmatically after the launch that wrote the query (and the step's keys): wait for it
    # before reading them, and before returning, as a program's return lets the fragment kernel start too.
    if WAIT_FOR_QUERY:
        gdc_wait()
    if READERS_NEXT:  # the next launch reads the query without waiting: let it start once the query is there
        gdc_launch_dependents()
    if (seq_len - first < min_span) | (seq_len - first > max_span):  # the fragment kernel's sequence
        return
    per_split = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), TILE) * TILE
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    query, group, heads = load_group_query(query_ptr, seq, kv_head, stride_query_seq, stride_query_head, scale,
                                           GROUP, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, rotation_ptr, PART_SCALE,
                                           SIGN_SCALE, ROTATE_QUERY)
    dims = tl.arange(0, HEAD_DIM_PAD)
    running_max, running_sum, acc = empty_softmax_state(GROUP_PAD, HEAD_DIM_PAD)
    # TOKEN_ROWS: the tile's tokens are the rows of both products (scores [TILE, GROUP_PAD], the value sum
    # transposed [HEAD_DIM_PAD, GROUP_PAD]), so a tile of 64+ tokens is a Hopper warpgroup MMA (wgmma);
    # else the query heads are (scores [GROUP_PAD, TILE]). AXIS: the tokens' axis of the scores.
    AXIS: tl.constexpr = 0 if TOKEN_ROWS else 1
    if TOKEN_ROWS:
        query_t = tl.trans(query)
        acc = tl.trans(acc)

    # the byte-permute lookups' table words, held in registers (`lane_lookup_tables`)
    key_tables = lane_lookup_tables(lut_tables_ptr, _KEY_TABLE_ROW) if KEY_LUT != "" else None
    value_tables = lane_lookup_tables(lut_tables_ptr, _VALUE_TABLE_ROW) if VALUE_LUT != "" else None

    table_ptr = block_table_ptr + seq * stride_table_seq
    for start in range(lo, hi, TILE):
        tokens = start + tl.arange(0, TILE)
        valid = tokens < hi
        blocks = tl.load(table_ptr + tokens // BLOCK_SIZE, mask=valid, other=0)
        page_ptrs = cache_ptr + (blocks.to(tl.int64) * NUM_KV_HEADS + kv_head) * HEAD_PAGE_BYTES
        offsets = tokens % BLOCK_SIZE

        keys = load_levels(page_ptrs + offsets * KEY_BYTES, valid, key_centroids_ptr, KEY_BITS, KEY_BYTES,
                           HEAD_DIM_PAD, KEY_LUT, key_tables)
        key_norms = load_norms(page_ptrs + KEY_NORMS_OFFSET + offsets * 4, valid)
        if TOKEN_ROWS:
            scores = tl.dot(keys, query_t)
        else:
            scores = tl.dot(query, tl.trans(keys))
        scores = scores * tl.expand_dims(key_norms, 1 - AXIS)
        if USE_SOFTCAP:
            scores = softcap * tanh(scores / softcap)
        # log2 units
        scores = tl.where(tl.expand_dims(valid, 1 - AXIS), scores * 1.4426950408889634, float("-inf"))

        probs, correction, new_max, running_sum = online_softmax_step(scores, running_max, running_sum, AXIS)

        values = load_levels(page_ptrs + VALUES_OFFSET + offsets * VALUE_BYTES, valid, value_centroids_ptr,
                             VALUE_BITS, VALUE_BYTES, HEAD_DIM_PAD, VALUE_LUT, value_tables)
        value_norms = load_norms(page_ptrs + VALUE_NORMS_OFFSET + offsets * 4, valid)
        weights = (probs * tl.expand_dims(value_norms, 1 - AXIS)).to(tl.float16)
        if TOKEN_ROWS:
            acc = acc * correction[None, :] + tl.dot(tl.trans(values), weights)
        else:
            acc = acc * correction[:, None] + tl.dot(weights, values)
        running_max = new_max
    if TOKEN_ROWS:
        acc = tl.trans(acc)

    partial = (seq * NUM_KV_HEADS * GROUP + heads) * PARTIAL_SPLITS + split
    head_mask = group < GROUP
    out = acc / tl.maximum(running_sum, 1e-30)[:, None]
    # an empty split's output is never read (the reduction weighs it by its −inf alone)
    tl.store(partial_out_ptr + partial[:, None] * HEAD_DIM_PAD + dims[None, :], out,
             mask=(head_mask & (running_sum > 0))[:, None])
    lse = tl.where(running_sum > 0, running_max + tl.log2(tl.maximum(running_sum, 1e-30)), float("-inf"))
    tl.store(partial_lse_ptr + partial, lse, mask=head_mask)
    for extra in tl.static_range(1, PARTIAL_SPLITS // NUM_SPLITS):  # slots past this kernel's splits: empty
        tl.store(partial_lse_ptr + partial + extra * NUM_SPLITS, tl.full([GROUP_PAD], float("-inf"), tl.float32),
                 mask=head_mask)


@triton.jit(do_not_specialize=["num_rows"])
def _decode_reduce_kernel(partial_out_ptr, partial_lse_ptr, extra_out_ptr, extra_lse_ptr, rotation_ptr, out_ptr,
                          lse_ptr, num_rows, stride_out_seq, stride_out_head, HEADS: tl.constexpr,
                          NUM_SPLITS: tl.constexpr, NUM_SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                          HEAD_DIM_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr, ROWS: tl.constexpr,
                          UNROTATE: tl.constexpr, COLUMNS: tl.constexpr, COLUMN_PROGRAMS: tl.constexpr,
                          RETURN_LSE: tl.constexpr, CHAINED: tl.constexpr, EXTRA: tl.constexpr):
    """Merge each (sequence · head) row's split partials by their log-sum-exps, ROWS rows per program
    (EXTRA: and that many more partials per row, [EXTRA, rows, HEAD_DIM_PAD] and [EXTRA, rows], from
    `exact_ring`);
    UNROTATE: then x @ R (fp32 R, tf32x3: fp32-accurate; `rotate`'s bf16 parts times the sign form measured
    slower in these few-row programs, H200 scratch run, b1 / b8 × 1K 0.0096 → 0.0102 / 0.0154 → 0.0160 ms)
    in the same program, stored cast to out's dtype,
    which saves the un-rotation its own launch; COLUMN_PROGRAMS programs (grid axis 1) share a row block,
    each merging it and un-rotating its share of the columns."""
    if CHAINED:  # launched programmatically after the split kernel; an un-rotation after it may start early
        gdc_launch_dependents()
        gdc_wait()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # seq · HEADS + head
    rows_valid = rows < num_rows
    splits = tl.arange(0, NUM_SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    lse = tl.load(partial_lse_ptr + rows[:, None] * NUM_SPLITS + splits[None, :],
                  mask=rows_valid[:, None] & (splits < NUM_SPLITS)[None, :], other=float("-inf"))
    top = tl.max(lse, axis=1)
    for part in tl.static_range(EXTRA):
        top = tl.maximum(top, tl.load(extra_lse_ptr + part * num_rows + rows, mask=rows_valid, other=float("-inf")))
    top = tl.where(top == float("-inf"), 0.0, top)  # an empty sequence: every weight is 0
    total = tl.sum(tl.exp2(lse - top[:, None]), axis=1)
    out = tl.zeros([ROWS, HEAD_DIM_PAD], dtype=tl.float32)
    for first in tl.static_range(0, NUM_SPLITS_PAD, SPLIT_BLOCK):  # [ROWS, SPLIT_BLOCK, HEAD_DIM_PAD] at a time
        block = first + tl.arange(0, SPLIT_BLOCK)
        valid = rows_valid[:, None] & (block < NUM_SPLITS)[None, :]
        block_lse = tl.load(partial_lse_ptr + rows[:, None] * NUM_SPLITS + block[None, :], mask=valid,
                            other=float("-inf"))
        weights = tl.exp2(block_lse - top[:, None])
        # an empty split (−inf) may leave its partial output unwritten (the fragment kernel does)
        partial = tl.load(partial_out_ptr + ((rows[:, None] * NUM_SPLITS + block[None, :]) * HEAD_DIM_PAD)[:, :, None]
                          + dims[None, None, :], mask=(valid & (block_lse > float("-inf")))[:, :, None], other=0.0)
        out += tl.sum(weights[:, :, None] * partial, axis=1)
    for part in tl.static_range(EXTRA):
        extra_lse = tl.load(extra_lse_ptr + part * num_rows + rows, mask=rows_valid, other=float("-inf"))
        extra_weight = tl.exp2(extra_lse - top)
        total += extra_weight
        out += extra_weight[:, None] * tl.load(extra_out_ptr + (part * num_rows + rows[:, None]) * HEAD_DIM_PAD
                                               + dims[None, :],
                                               mask=(rows_valid & (extra_lse > float("-inf")))[:, None], other=0.0)
    out = out / tl.maximum(total, 1e-30)[:, None]
    row_ptrs = out_ptr + (rows // HEADS) * stride_out_seq + (rows % HEADS) * stride_out_head
    if UNROTATE:
        blocks: tl.constexpr = HEAD_DIM_PAD // COLUMNS // COLUMN_PROGRAMS
        for block in tl.static_range(blocks):
            columns = (tl.program_id(1) * blocks + block) * COLUMNS + tl.arange(0, COLUMNS)
            y = rotated_columns(out, rotation_ptr, columns, dims, HEAD_DIM, 0.0, 0.0, True)
            tl.store(row_ptrs[:, None] + columns[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=rows_valid[:, None] & (columns < HEAD_DIM)[None, :])
    else:
        tl.store(row_ptrs[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=rows_valid[:, None] & (dims < HEAD_DIM)[None, :])
    if RETURN_LSE:  # natural log, like torch.logsumexp; by a row block's first program
        if tl.program_id(1) == 0:
            row_lse = tl.where(total > 0, (top + tl.log2(tl.maximum(total, 1e-30))) * 0.6931471805599453,
                               float("-inf"))
            tl.store(lse_ptr + rows, row_lse, mask=rows_valid)


# The merge stays a launch of its own: merged instead by each pair's last split program (a ticket from an
# atomic counter, then the merge and an FMA un-rotation) it measured slower wherever the Triton kernel ran
# (H200: b32 x 1K 0.052 against 0.043 ms; kernels-decode-h200-merge-in-split.md, not kept): the last
# program's serial merge cost more than the launch it saved.
# Rows per reduction program when it also un-rotates: the rotation's dot needs at least 16.
UNROTATE_ROWS = 16
# Up to this many splits the reduction un-rotates in its own programs. With more, its few 16-row programs
# each merge too much serially (H200, fragment kernel at batch 1 × 16K, 128 splits: 0.347 ms, against 0.036
# ms with one row per program and the un-rotation launched after it); with fewer, the launch it saves is
# worth more (batch 64 × 1K: 0.077 → 0.070 ms). benchmarks/results/kernels-decode-h200-table33k*.md
UNROTATE_MAX_SPLITS = 16
# ... and up to this head_dim: at 256 the program spills about a thousand local-memory instructions (sm_90,
# `python benchmarks/reduce_sass.py`), and b32 × 4K / 16K at d=256 measured 0.218 / 0.576 ms fused against
# 0.181 / 0.539 ms unfused (H200: kernels-decode-h200-reduce-all-splits.md against kernels-decode-h200.md).
UNROTATE_MAX_HEAD_DIM = 128


def reduction_unrotates(num_splits: int, head_dim_pad: int) -> bool:
    """Whether `paged_decode_attention` un-rotates inside the reduction (else in a launch after it)."""
    return num_splits <= UNROTATE_MAX_SPLITS and head_dim_pad <= UNROTATE_MAX_HEAD_DIM


def merge_splits(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None,
                 codec: KernelCodec, chained: bool = False,
                 extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """`reduce_splits` into the caller's `out` with the weighted value sum un-rotated once: inside the
    reduction where it can (`reduction_unrotates`), else by a rotation launched after it."""
    if reduction_unrotates(partial_lse.shape[-1], partial_out.shape[-1]):
        reduce_splits(partial_out, partial_lse, out, lse, rotation=codec.rotation, chained=chained, extra=extra)
    else:
        rotated_out = torch.empty(out.shape, device=out.device, dtype=torch.float32)
        reduce_splits(partial_out, partial_lse, rotated_out, lse, chained=chained, extra=extra)
        rotate(rotated_out, codec, inverse=True, out=out, after_previous=chained)


def reduce_split_block(num_splits_pad: int, head_dim_pad: int, rows: int = 1) -> int:
    """Partial outputs the reduction holds at once: at most 8K fp32 values (more spill to local memory,
    which cost a 512-wide latent ~1 ms per call)."""
    return max(1, min(num_splits_pad, 8192 // (head_dim_pad * rows)))


def reduce_splits(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None,
                  rotation: torch.Tensor | None = None, chained: bool = False,
                  extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """out [batch, heads, D] (any strides of its first two axes, any float dtype) ← the splits merged:
    partial_out [batch, heads, splits, D_pad] fp32 and partial_lse [batch, heads, splits] (log2 units),
    and `extra` (outs [parts, batch, heads, D_pad], lses [parts, batch, heads]) as `parts` more splits;
    `rotation` (fp32 [D, D]): un-rotated (x @ R) on the way. `lse` [batch, heads] fp32, natural log."""
    batch, heads, num_splits = partial_lse.shape
    pad = partial_out.shape[-1]
    column_programs = 1 if rotation is None else reduce_column_programs(batch * heads, pad, out.device)
    constants = reduce_constants(num_splits, pad, rotation is not None, column_programs)
    extra_out, extra_lse = extra if extra is not None else (partial_out, partial_lse)  # not read without extra
    _decode_reduce_kernel[(triton.cdiv(batch * heads, constants["ROWS"]), constants["COLUMN_PROGRAMS"])](
        partial_out, partial_lse, extra_out, extra_lse, partial_lse if rotation is None else rotation, out,
        partial_lse if lse is None else lse, batch * heads, out.stride(0), out.stride(1), HEADS=heads,
        HEAD_DIM=out.shape[-1], **constants, RETURN_LSE=lse is not None, CHAINED=chained,
        EXTRA=0 if extra is None else extra_lse.shape[0],
        **programmatic_launch(chained),
    )


def reduce_column_programs(num_rows: int, head_dim_pad: int, device: torch.device) -> int:
    """Programs per UNROTATE_ROWS-row block of an un-rotating reduction over `num_rows` (sequence · head)
    rows: about one program per SM, each un-rotating at least 16 columns, at most 4. Its few 16-row
    programs are latency-bound; sharing the un-rotation among more of them measured faster (H200, k4v4
    d=128, two and four per row block against one:
    b1 x 1K 0.90x and 0.86x, b8 x 1K 0.92x and 0.90x, b32 x 1K 0.96x and 0.97x, b64 x 1K 0.99x and 1.01x;
    benchmarks/results/decode-variants-h200-launch.md)."""
    row_blocks = triton.cdiv(num_rows, UNROTATE_ROWS)
    wanted = max(1, multiprocessor_count(device) // max(1, row_blocks))
    return max(1, min(1 << (wanted.bit_length() - 1), 4, head_dim_pad // 16))


def reduce_constants(num_splits: int, head_dim_pad: int, unrotate: bool, column_programs: int = 1) -> dict:
    """`_decode_reduce_kernel`'s tiling constants (also compiled by `benchmarks/reduce_sass.py`)."""
    rows = UNROTATE_ROWS if unrotate else 1
    splits_pad = triton.next_power_of_2(num_splits)
    column_programs = column_programs if unrotate else 1
    return dict(NUM_SPLITS=num_splits, NUM_SPLITS_PAD=splits_pad, HEAD_DIM_PAD=head_dim_pad,
                SPLIT_BLOCK=reduce_split_block(splits_pad, head_dim_pad, rows), ROWS=rows, UNROTATE=unrotate,
                COLUMNS=min(rotation_columns(head_dim_pad, 0.0), head_dim_pad // column_programs),
                COLUMN_PROGRAMS=column_programs)


def default_num_splits(batch: int, num_kv_heads: int, max_tokens: int, tile: int, num_sms: int) -> int:
    """Enough programs to fill the device about twice, but no split shorter than two tiles."""
    wanted = max(1, math.ceil(2 * num_sms / max(1, batch * num_kv_heads)))
    longest = max(1, max_tokens // (2 * tile))
    return int(min(triton.next_power_of_2(wanted), triton.next_power_of_2(longest), 64))


# The split kernel is chosen per sequence, from its visible keys times the call's (sequence · kv head)
# pairs: at or above this many the fragment kernel, below it the Triton one. One-warp programs cannot
# hide their latency with little work. H200, k4v4 d=128, against 2^19 since the fragment kernel reads its
# query in whole sectors (`python benchmarks/decode_min_work.py`, decode-min-work-h200.md): b2 x 16K, b4 x
# 8K, b8 x 4K / 6K, b16 x 2K and b32 x 1K took 0.71-0.98x the time, in exact and in 33K-token tables, the
# other cells within 2%.
FRAGMENT_MIN_WORK = 1 << 18
# ... but calls of fewer pairs than this (one sequence of 8 kv heads) need twice that work: at 2^18 a
# single sequence of 32K keys went to the fragment kernel and took 1.10x the time (of 16K keys in a
# 33K-token table: 1.05x).
FRAGMENT_FEW_PAIRS = 16
# Where both split kernels run, overlapped, and no exact window kernel runs between them and the reduction,
# the reduction is launched programmatically after the fragment kernel. H200, 33K-token tables, against the
# reduction launched after it ends: b8 x 1K 0.0156 against 0.0165 ms, b32 x 4K 0.6-1.0% slower, the other
# cells within 0.8% (kernels-decode-h200-reduction-chained*.md; kernels.py's 'reduction not chained').
CHAIN_REDUCTION_AFTER_FRAGMENTS = True
# Up to this batch the rotation, the Triton split kernel and the reduction are chained by programmatic
# dependent launch where the device has it: each starts while the one before runs and waits for it only
# before reading its output, which hides launch gaps that dominate a short call. H200, 1K, chained against
# one after another (`decode_variants.py --variants default,chained_launches`,
# decode-variants-h200-chained.md): b2 0.0117 → 0.0104 ms, b4 0.0125 → 0.0114, but b8 0.0155 → 0.0169,
# b16 and b32 3% slower, b8 x 4K 8% slower (b1 x 1K: 0.014 → 0.012 ms when it was first chained).
CHAIN_MAX_BATCH = 4
# Up to this batch, where the Triton split kernel serves every sequence and nothing else reads the rotated
# query (no exact ring, no store handed over), each of its programs rotates its group's query rows itself
# instead of a rotation launch before it (head_dim up to 128: a 256-wide rotation tile spills). Same output
# bit for bit; H200, k4v4 d=128 × 1K, in the split kernel against apart (`decode_variants.py --variants
# query_rotated_apart,query_rotated_in_split`, decode-variants-h200-query-in-split.md): b1 0.981x, b2 0.983x
# the time, but b4 1.012x, b8 1.043x, b16 1.032x, b4 / b8 × 4K 1.018x / 1.025x (every split program repeats
# its group's rotation); at b8 × 1K k3v3 0.979x, d=64 0.913x.
ROTATE_IN_SPLIT_MAX_BATCH = 2
# The Triton kernel's span limit when it serves every sequence (int32).
ANY_SPAN = (1 << 31) - 1


def fragment_min_span(codec: KernelCodec, batch: int, group: int, max_tokens: int, device: torch.device) -> int | None:
    """The fewest visible keys of a sequence that `paged_decode_attention` sends to the fragment kernel by
    default; shorter ones go to the Triton kernel. None: the fragment kernel is not launched (it cannot
    serve the layer, or no sequence the block table can hold reaches the limit). From shapes only, so a
    CUDA graph replays the same launches; each kernel's programs skip the other's sequences."""
    pairs = batch * codec.layout.num_kv_heads
    work = FRAGMENT_MIN_WORK * (2 if pairs < FRAGMENT_FEW_PAIRS else 1)
    if pairs * max_tokens < work or decode_fragments.unsupported_reason(codec, group, device):
        return None
    return -(-work // pairs)


def launch_triton_split(query: torch.Tensor, cache: torch.Tensor, codec: KernelCodec,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, key_starts: torch.Tensor | None,
                        partial_out: torch.Tensor, partial_lse: torch.Tensor, scale: float, softcap: float | None,
                        sliding_window: int | None, num_splits: int, min_span: int = 0, max_span: int = ANY_SPAN,
                        chained: bool = False, readers_next: bool = False, after_store: bool = False,
                        rotates_query: bool = False) -> None:
    """Fill the partials [batch, Hq, S(, D_pad)] of the sequences whose visible keys number min_span …
    max_span, each cut into `num_splits` (a divisor of S) splits; their slots past those read empty.
    `chained`: the reduction is launched programmatically after it, and it so after the query's rotation
    (where there is one);
    `readers_next`: a kernel that reads the query without waiting (the fragment kernel) is launched
    programmatically after it; `after_store`: launched
    programmatically after the store that wrote the query and the step's keys. `rotates_query`: the
    query is not rotated, and each program rotates its group's rows (no rotation launch before it)."""
    layout = codec.layout
    batch, num_q_heads, partial_splits = partial_lse.shape
    if partial_splits % num_splits:
        raise ValueError(f"num_splits ({num_splits}) must divide the partials' {partial_splits} splits")
    group = num_q_heads // layout.num_kv_heads
    lookups = lookup_constants(codec, table_inputs=True)
    rotation, part_scale, sign_scale = (rotation_operand(codec, query.dtype) if rotates_query
                                        else (partial_lse, 0.0, 0.0))  # not read unless rotates_query
    after_rotation = chained and not rotates_query
    _decode_split_kernel[(batch, layout.num_kv_heads, num_splits)](
        query, cache, block_table, seq_lens, seq_lens if key_starts is None else key_starts,
        codec.key_centroids_fp16, codec.value_centroids_fp16, codec.lut_lane_tables, rotation,
        partial_out, partial_lse, query.stride(0), query.stride(1), block_table.stride(0),
        float(scale), float(softcap or 0.0), int(sliding_window or 0), int(min_span), int(max_span),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), NUM_SPLITS=num_splits,
        PARTIAL_SPLITS=partial_splits, **page_constants(layout), **lookups,
        USE_SOFTCAP=softcap is not None, USE_WINDOW=sliding_window is not None, USE_STARTS=key_starts is not None,
        REDUCTION_NEXT=chained, READERS_NEXT=readers_next, WAIT_FOR_QUERY=after_rotation or after_store,
        ROTATE_QUERY=rotates_query, PART_SCALE=part_scale, SIGN_SCALE=sign_scale,
        **triton_split_launch(codec, lookups), **programmatic_launch(after_rotation or after_store),
    )


def triton_split_launch(codec: KernelCodec, lookups: dict | None = None) -> dict:
    """`decode_launch` for the codec's layer and its lookups (`lookup_constants`)."""
    layout, lookups = codec.layout, lookups or lookup_constants(codec)
    return decode_launch(layout.head_dim, layout.key_bits, layout.value_bits,
                         bool(lookups["KEY_LUT"] and lookups["VALUE_LUT"]))


@dataclass(frozen=True)
class SplitPlan:
    """The split kernels a `paged_decode_attention` call launches, from its shapes alone."""
    min_span: int | None  # None: the Triton kernel alone; 0: the fragment kernel alone; else its fewest keys
    triton_splits: int  # the Triton kernel's split count (0: not launched)
    num_splits: int  # the partials' splits: the larger of the two kernels' counts


def split_plan(codec: KernelCodec, batch: int, group: int, max_tokens: int, device: torch.device,
               fragments: bool | None = None, num_splits: int | None = None) -> SplitPlan:
    """`paged_decode_attention`'s choice for `batch` sequences in block tables of `max_tokens` keys
    (`fragments` and `num_splits` as it takes them)."""
    layout = codec.layout
    if fragments is None:
        min_span = fragment_min_span(codec, batch, group, max_tokens, device)
    elif fragments:
        if unsupported := decode_fragments.unsupported_reason(codec, group, device):
            raise ValueError(f"the fragment decode kernel cannot serve this call: {unsupported}")
        min_span = 0
    else:
        min_span = None
    triton_runs = min_span != 0
    if num_splits is None:
        # each kernel's own split count, for the longest sequence it may serve; the partials hold the larger
        num_sms = multiprocessor_count(device)
        triton_splits = default_num_splits(
            batch, layout.num_kv_heads, max_tokens if min_span is None else min(max_tokens, min_span - 1),
            triton_split_launch(codec)["TILE"], num_sms) if triton_runs else 0
        fragment_splits = (0 if min_span is None
                           else decode_fragments.default_num_splits(batch * layout.num_kv_heads, max_tokens, num_sms,
                                                                    layout.head_dim))
        num_splits = max(triton_splits, fragment_splits)
    else:
        triton_splits = num_splits if triton_runs else 0
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits!r}")
    return SplitPlan(min_span, triton_splits, num_splits)


def rotates_in_split_kernel(batch: int, head_dim_pad: int) -> bool:
    """Whether the Triton split kernel rotates an unrotated query itself (see ROTATE_IN_SPLIT_MAX_BATCH)."""
    return batch <= ROTATE_IN_SPLIT_MAX_BATCH and head_dim_pad <= 128


def variant_batches(codec: KernelCodec, group: int, max_tokens: int, device: torch.device, most: int,
                    rotates_queries: bool = False) -> list[int]:
    """The smallest batch of each set of kernel variants that `paged_decode_attention` calls of 1 … `most`
    sequences launch by default: the variants follow which split kernels run and their split counts (not
    the fragment kernel's span, a run-time value), a batch up to CHAIN_MAX_BATCH (chained launches) and up
    to ROTATE_IN_SPLIT_MAX_BATCH (the split kernel's own query rotation, where an unrotated query allows it), the
    tile height of each rotation of the batch's rows (the output's where the reduction does not un-rotate,
    the query's where the calls rotate it: `rotates_queries`, an unrotated query or `store=`) and the
    reduction's programs per row block where it un-rotates (`reduce_column_programs`). Calls at these
    batches compile all of them (an engine before serving: `vllm.backend`)."""
    seen, batches, pad = set(), [], head_dim_pad(codec.layout.head_dim)
    for batch in range(1, most + 1):
        plan = split_plan(codec, batch, group, max_tokens, device)
        unrotates = reduction_unrotates(plan.num_splits, pad)
        tall_rotation = (rotates_queries or not unrotates) and batch > ROTATE_SHORT_TILE_MAX_TOKENS
        column_programs = (reduce_column_programs(batch * group * codec.layout.num_kv_heads, pad, device)
                           if unrotates else 1)
        rotates_in_split = rotates_queries and plan.min_span is None and rotates_in_split_kernel(batch, pad)
        key = (plan.min_span is None, plan.min_span == 0, plan.triton_splits, plan.num_splits,
               batch <= CHAIN_MAX_BATCH, rotates_in_split, tall_rotation, column_programs)
        if key not in seen:
            seen.add(key)
            batches.append(batch)
    return batches


# The exact window's kernel runs on a stream of its own, forked after the store and joined before the
# reduction, so it overlaps the split kernels, where no fragment kernel is launched or the call has at least
# this many (sequence · kv head) pairs. Otherwise it runs after the split kernels: overlapping a fragment
# kernel's single wave of programs at fewer pairs cost much more (H200, the ring's cost per step, side stream
# against after: b8 x 16K +33.3 / +12.1 us, b16 x 6K +26.5 / +11.5, b16 x 16K +65.9 / +10.9; at 256+ pairs
# b32 x 1K +8.0 / +11.7, b32 x 16K +7.5 / +12.5, b64 x 1K +28.8 / +34.7): ring-cost-h200-side-stream*.md.
# Launched in the split kernels' stream while they run (chained, between, or inside the Triton one) it
# cost as much or more: kernels-step-h200-exact-between.md, ring-cost-h200-{own-programs,first-split}.md.
WINDOW_STREAM_MIN_PAIRS = 256
# The window stream's CUDA priority (lower: sooner; the split kernels' stream is at 0): see window_stream.
WINDOW_STREAM_PRIORITY = -1
_window_streams: dict[tuple[torch.device, int], torch.cuda.Stream] = {}


def window_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the exact window's kernel runs on beside the split kernels (one per device), at a higher
    priority than theirs: its few programs then take the SMs' free slots ahead of the split kernels' pending
    ones, and end sooner (H200, the ring's cost per step: b32 x 1K 1.4 against 2.1 µs, b64 x 1K 7.6
    against 9.9; elsewhere even: ring-cost-h200-window-parts.md)."""
    key = (device, WINDOW_STREAM_PRIORITY)
    if key not in _window_streams:
        _window_streams[key] = torch.cuda.Stream(device, priority=WINDOW_STREAM_PRIORITY)
    return _window_streams[key]


def paged_decode_attention(query: torch.Tensor, cache: torch.Tensor, codec: KernelCodec, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                           softcap: float | None = None, num_splits: int | None = None,
                           key_starts: torch.Tensor | None = None, return_lse: bool = False,
                           out: torch.Tensor | None = None, fragments: bool | None = None,
                           query_rotated: bool = False, after_store: bool = False, exact: ExactRing | None = None,
                           exact_middle: tuple[torch.Tensor, torch.Tensor] | None = None,
                           store: Callable[[torch.Tensor | None], torch.Tensor | None] | None = None,
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """query [batch, num_q_heads, head_dim] (the token at position seq_len − 1 of each sequence) →
    attention output of the same shape and dtype. block_table int32 [batch, max_blocks], seq_lens int32
    [batch]. A CUDA graph must fix `num_splits` (the default depends only on shapes, not on values).
    `key_starts` (int32 [batch]) hides each sequence's keys before that position (left padding);
    `return_lse` also returns the fp32 log-sum-exp of the scores [batch, num_q_heads] (−inf where no key
    is visible), so a caller can merge this output with attention over keys held elsewhere. `out` (the
    query's shape) receives the output in place of a new tensor. `fragments` picks the split kernel:
    True the fragment kernel (`decode_fragments.py`; ValueError where it cannot serve the layer), False
    the Triton one, None each sequence's by its length (`fragment_min_span`). `query_rotated`: the query
    is already rotated (x @ Rᵀ, e.g. by `compress_store(..., queries=)` in the launch that stored the step's
    keys), so this call launches no rotation of its own. `after_store`: that store ran before this call,
    and the launch just before it either is the store, which let its dependents start
    (`launch_dependents=True`), or ended after it: the split kernel starts while that launch runs and
    waits for it before reading the query and the cache. `exact` (`exact_ring.ExactRing`):
    each sequence's first `exact.sinks` and latest `exact.recent` keys are read from the ring where it
    still holds them, as one more split; the split kernels read the middle, positions [starts, ends) of
    `exact_middle` (int32 [batch] each: max(seq_len − recent, sinks) and sinks; computed when None).
    `store` (with `exact`, recent ≥ 1, the query not rotated): launches the step's store, not yet run;
    called with the query it also rotates it in the same launch, lets the next launch start early
    (`compress_store(queries=, launch_dependents=True)`) and returns it rotated; called with None it
    stores only. Where the window kernel runs on its own stream, the split kernels then wait only for a
    rotation of the query: they read the middle, which ends before the step's tokens, so the store runs
    beside them, on the window's stream before the window kernel. Elsewhere it runs first."""
    layout = codec.layout
    layout.check_cache(cache)
    check_codec_device(codec, cache)
    if not isinstance(query, torch.Tensor) or query.ndim != 3 or query.shape[-1] != layout.head_dim:
        raise ValueError(f"query must be [batch, num_q_heads, {layout.head_dim}], got "
                         f"{tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__}")
    check_device_tensor(query, "query", FLOAT_DTYPES, None, cache.device)
    batch, num_q_heads = query.shape[:2]
    if num_q_heads % layout.num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({layout.num_kv_heads})")
    check_block_table(block_table, seq_lens, batch, cache.device)
    check_attention_options(sliding_window, softcap, key_starts, out, batch, query.shape, cache.device)
    window_lengths = seq_lens
    if store is not None and (exact is None or exact.recent < 1 or query_rotated):
        raise ValueError("store= runs the step's store beside the split kernels, which needs an exact ring with "
                         "recent >= 1 (its middle then ends before the step's tokens) and an unrotated query")
    if exact is not None:
        exact.check(layout, cache)
        if sliding_window is not None or key_starts is not None:
            raise ValueError("an exact ring reads each sequence's first and latest keys: not with sliding_window "
                             "or key_starts")
        if exact_middle is None:
            exact_middle = (middle_ends(seq_lens, exact.sinks, exact.recent), torch.full_like(seq_lens, exact.sinks))
        for name, tensor in zip(("exact_middle ends", "exact_middle starts"), exact_middle):
            check_device_tensor(tensor, name, (torch.int32,), (batch,), cache.device)
        seq_lens, key_starts = exact_middle
    group = num_q_heads // layout.num_kv_heads
    plan = split_plan(codec, batch, group, block_table.shape[1] * layout.block_size, cache.device, fragments,
                      num_splits)
    min_span, triton_splits, num_splits = plan.min_span, plan.triton_splits, plan.num_splits

    pad = head_dim_pad(layout.head_dim)
    # rotate q once (keys stay in the rotated space); up to CHAIN_MAX_BATCH sequences the launches are chained
    pdl = programmatic_launch_available(cache.device)
    rotates_in_split = (not query_rotated and store is None and exact is None and min_span is None
                        and rotates_in_split_kernel(batch, pad))
    pairs = batch * layout.num_kv_heads
    # the exact window's kernel on a stream of its own (see WINDOW_STREAM_MIN_PAIRS)
    window_beside = exact is not None and cache.is_cuda and (min_span is None or pairs >= WINDOW_STREAM_MIN_PAIRS)
    store_beside = store is not None and window_beside
    if store is not None and not store_beside:
        query, query_rotated, after_store = store(query), True, True
    after_store = (store_beside or (after_store and query_rotated)) and triton_splits > 0 and pdl
    chained = (batch <= CHAIN_MAX_BATCH and min_span is None and (after_store or not query_rotated) and pdl
               and exact is None)
    if store_beside:  # the split kernels wait for this rotation as for a store's
        rotated_query = rotate(query, codec, launch_dependents=after_store)
    elif query_rotated or rotates_in_split:  # the latter: the split kernel rotates it
        rotated_query = query
    else:
        rotated_query = rotate(query, codec, launch_dependents=chained)
    partial_out = torch.empty(batch, num_q_heads, num_splits, pad, device=cache.device, dtype=torch.float32)
    partial_lse = torch.empty(batch, num_q_heads, num_splits, device=cache.device, dtype=torch.float32)
    # Where both split kernels are launched, the fragment kernel starts while the Triton one runs: a call
    # mostly gives all its sequences to one of them, and the other's programs, which only skip, then cost
    # no launch gap of their own (H200, b32 x 1K in 33K-token tables: kernels-decode-h200-overlap.md).
    overlapped = bool(triton_splits) and min_span is not None and pdl
    # ... and the reduction then starts while the fragment kernel runs, and waits for its grid (whose first
    # program waits for the Triton one's) to end, which hides one launch gap where the Triton kernel served
    # every sequence (see CHAIN_REDUCTION_AFTER_FRAGMENTS)
    reduction_chained = chained or (overlapped and exact is None and CHAIN_REDUCTION_AFTER_FRAGMENTS)
    side = None
    if window_beside:
        main, side = torch.cuda.current_stream(cache.device), window_stream(cache.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            if store_beside:
                store(None)
            extra = exact_window_partials(rotated_query, cache, codec, exact, block_table, window_lengths, scale,
                                          softcap)
    if triton_splits:
        launch_triton_split(rotated_query, cache, codec, block_table, seq_lens, key_starts, partial_out, partial_lse,
                            scale, softcap, sliding_window, triton_splits,
                            max_span=ANY_SPAN if min_span is None else min_span - 1, chained=chained,
                            readers_next=overlapped, after_store=after_store, rotates_query=rotates_in_split)
    if min_span is not None:
        decode_fragments.launch_split(rotated_query, cache, codec, block_table, seq_lens, key_starts, partial_out,
                                      partial_lse, scale, softcap, sliding_window, min_span, after_split=overlapped,
                                      reduction_next=reduction_chained)
    if side is not None:
        main.wait_stream(side)
    elif exact is not None:
        extra = exact_window_partials(rotated_query, cache, codec, exact, block_table, window_lengths, scale, softcap)
    else:
        extra = None
    out = torch.empty_like(query) if out is None else out
    lse = torch.empty(batch, num_q_heads, device=cache.device, dtype=torch.float32) if return_lse else None
    merge_splits(partial_out, partial_lse, out, lse, codec, chained=reduction_chained, extra=extra)
    return (out, lse) if return_lse else out
