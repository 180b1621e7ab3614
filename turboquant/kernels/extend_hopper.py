"""Extend attention on Hopper (sm_90) as a warp-specialized Gluon kernel: the fused extend kernel of
`extend.py`, with the unpacking of compressed tiles done by warps of its own beside the attention.

Why a second kernel: Triton 3.6 waits for each `wgmma` right after issuing it, and every warp of
`extend.py`'s programs both unpacks codes and runs the softmax, so neither overlaps the tensor cores;
at d=128 that kernel took 2.5–2.9x the time of bf16 FlashAttention-3 over a 16K prefix. Here each
program (one block of query rows of one GQA group, as in `extend.py`) is warpgroups of two roles,
FlashAttention-3 style, which the warp schedulers interleave:
- two producer warpgroups, one for the keys and one for the values, each load a tile's packed codes and
  norms ahead of unpacking them (one tile ahead, 128 keys where a single consumer waits on them), look the
  codes up into fp16 levels (byte permutes, `lut_asm.py`; values times their norms, and with two consumers
  keys times theirs, rounded once from an fp16 hi/lo pair of the fp32 norm) and store them into a
  ring of STAGES shared-memory operand buffers; after the prefix come the chunk's own fresh K/V (key norms
  1). Split in two, the unpacking issues from two warps per scheduler (H200, scratch run: 1.5–2.7% faster
  than one producer at chunks of 512–2048 tokens, 1.6–2.5% slower with one consumer);
- one or two consumer warpgroups of 64 query rows each score a tile on the tensor cores (`wgmma`; the
  query in registers where there are two, in shared memory where there is one), multiply the scores by
  the keys' fp32 norms where the keys come unscaled, run the fp32 online softmax, accumulate the previous
  tile's values, and hand each stage back when both MMAs that read it are done; at the end they un-rotate
  a 16-bit output themselves (`unrotates`: two MMAs with the rotation's signs, which the first consumer
  put in shared memory at its start), which saves the output's rotation a launch of its own;
- mbarriers pass the stages between them (ready: both producers filled it; empty: every consumer is
  done with it).
With the producers' registers few and the consumers' many (`setmaxnreg`), the unpacking no longer
shares the consumers' register budget.

It serves what `serves` says (4-bit keys and values, head_dim 64, 128 or 256, the chunk's fresh K/V:
`extend_attention`, not `cached_attention`); `extend.py` runs everything else and is this kernel's
specification, as `reference.extend_reference` is for both. Gluon does not run in Triton's interpreter:
tests/kernels/test_extend_hopper.py runs it on a Hopper GPU only.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .codec import KEY_TABLE_ROW, VALUE_TABLE_ROW
from .launch import SLICED_METADATA
from .lut_asm import byte_permute_available
from .softmax import masked_online_softmax_step
from .visible_keys import extend_tile_range

LOG2E = gl.constexpr(1.4426950408889634)
_KEY_TABLE_ROW, _VALUE_TABLE_ROW = gl.constexpr(KEY_TABLE_ROW), gl.constexpr(VALUE_TABLE_ROW)
# a barrier among the warps of one partition: `thread_barrier` in Triton 3.6, `barrier` in later releases
partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
enabled = True  # False: `extend_attention` runs extend.py's kernel everywhere (benchmarks time both)
STAGES = 4  # tiles the ring holds (d=128: 32 KB of fp16 keys and values each); 2 at d=256 (64 KB each)
# Registers a thread: each consumer warpgroup's, and each producer's where there are two consumers (with
# one, they have plenty). Two consumers and two producers at these counts use the whole register file
# (the consumers need 184 with the query in registers).
CONSUMER_REGS = 184
PRODUCER_REGS = 72
NARROW_PRODUCER_REGS = 152
# d=256's, one tile ahead: the consumer needs the rest (up to 248 with splits, softcap and a window)
WIDEST_PRODUCER_REGS = 128


def serves(layout, device: torch.device, cached_chunk: bool, rows: int) -> bool:
    """Whether `extend_attention` runs this kernel: a Hopper GPU, 4-bit keys and values, fresh K/V, and
    head_dim 64 or 128 in programs of 64 or 128 query rows, or 256 in programs of 64 (`narrow_only`)."""
    return (enabled and not cached_chunk and byte_permute_available(device)
            and torch.cuda.get_device_capability(device)[0] == 9 and layout.key_bits == 4 and layout.value_bits == 4
            and shape_served(layout.head_dim, rows))


def shape_served(head_dim: int, rows: int) -> bool:
    """`serves`' program shapes: head_dim 64 or 128 in programs of 64 or 128 query rows, 256 in programs of 64."""
    return head_dim in (64, 128, 256) and rows in ((64,) if narrow_only(head_dim) else (64, 128))


def narrow_only(head_dim: int) -> bool:
    """Whether the kernel serves programs of 64 query rows only (one consumer). At d=256 two consumers and
    two producers are 16 warps, 128 registers a thread at launch, fewer than the MMA into a [64, 256] fp32
    accumulator needs (ptxas asks for 158); with producers of 2 warps each, consumers or producers spill
    (sm_90, Triton 3.6, compiled on the CPU)."""
    return head_dim > 128


def program_warps(rows: int) -> int:
    """The warps of a program of `rows` query rows: a consumer warpgroup per 64 rows, two producer warpgroups."""
    return 4 * (rows // 64 + 2)


@gluon.jit
def _coordinate_order(levels, words):
    """The eight [R, W] outputs of a lookup over `words` (level k of each run of 8 indices) → [R, 8W] in
    coordinate order (each join adds a trailing axis, so the outermost join splits the lowest index bit)."""
    o0, o1, o2, o3, o4, o5, o6, o7 = levels
    even = gl.join(gl.join(o0, o4), gl.join(o2, o6))
    odd = gl.join(gl.join(o1, o5), gl.join(o3, o7))
    return gl.reshape(gl.join(even, odd), [words.shape[0], words.shape[1] * 8])


@gluon.jit
def _softcapped_log2(scores, softcap):
    """softcap · tanh(scores / softcap) in log2 units, tanh(x) = 1 − 2 / (exp(2x) + 1)."""
    return softcap * LOG2E * (1.0 - 2.0 / (gl.exp2(scores * (2.0 * LOG2E / softcap)) + 1.0))


@gluon.jit
def _tile_bounds(t, n_prefix, lo, hi, prefix_len, chunk_lo, chunk_hi, TILE: gl.constexpr):
    """(position of the first key, end of the keys) of tile t of a program: the prefix's tiles from `lo` up
    to `hi`, then the chunk's from prefix_len + chunk_lo up to prefix_len + chunk_hi."""
    chunk = t >= n_prefix
    start = gl.where(chunk, prefix_len + chunk_lo + (t - n_prefix) * TILE, lo + t * TILE)
    limit = gl.where(chunk, prefix_len + chunk_hi, hi)
    return start, limit


@gluon.jit
def _tile_blocks(block_table_ptr, table_row, start, limit, BLOCK_SIZE: gl.constexpr, TILE: gl.constexpr,
                 WORDS_LAYOUT: gl.constexpr):
    """The pages of a prefix tile's rows (in the rows of WORDS_LAYOUT; 0 past `limit`)."""
    positions = start + gl.arange(0, TILE, layout=gl.SliceLayout(1, WORDS_LAYOUT))
    return gl.load(block_table_ptr + table_row + positions // BLOCK_SIZE, mask=positions < limit, other=0)


@gluon.jit
def _load_codes(cache_ptr, blocks, kv_head, start, limit, NUM_KV_HEADS: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                HEAD_PAGE_BYTES: gl.constexpr, CODES_OFFSET: gl.constexpr, NORMS_OFFSET: gl.constexpr,
                CODE_BYTES: gl.constexpr, TILE: gl.constexpr, WORDS: gl.constexpr, WORDS_LAYOUT: gl.constexpr):
    """A prefix tile's packed codes [TILE, WORDS] of one role (keys or values) and their norms, in the rows
    of WORDS_LAYOUT, from its pages (`_tile_blocks`); rows past `limit` read zeros."""
    positions = start + gl.arange(0, TILE, layout=gl.SliceLayout(1, WORDS_LAYOUT))
    valid = positions < limit
    page = cache_ptr + (blocks.to(gl.int64) * NUM_KV_HEADS + kv_head) * HEAD_PAGE_BYTES
    offsets = positions % BLOCK_SIZE
    words = gl.arange(0, WORDS, layout=gl.SliceLayout(0, WORDS_LAYOUT))[None, :]
    codes = gl.load((page + CODES_OFFSET + offsets * CODE_BYTES).to(gl.pointer_type(gl.int32))[:, None] + words,
                    mask=valid[:, None], other=0)
    norms = gl.load((page + NORMS_OFFSET + offsets * 4).to(gl.pointer_type(gl.float32)), mask=valid, other=0.0)
    return codes, norms


@gluon.jit
def _producer(cache_ptr, tables_ptr, block_table_ptr, table_row, kv_head, fresh_ptr, stride_kv_token,
              stride_kv_head, query_start, lo, hi, n_prefix, chunk_lo, chunk_hi, n_tiles, bufs, kn_bufs, ready, empty,
              NUM_KV_HEADS: gl.constexpr, BLOCK_SIZE: gl.constexpr, HEAD_PAGE_BYTES: gl.constexpr,
              CODES_OFFSET: gl.constexpr, NORMS_OFFSET: gl.constexpr, CODE_BYTES: gl.constexpr, LUT: gl.constexpr,
              HEAD_DIM: gl.constexpr, TILE: gl.constexpr, STAGES: gl.constexpr, PREFETCH: gl.constexpr,
              KEYS: gl.constexpr, SCALED_KEYS: gl.constexpr):
    """Fills one side of the ring (KEYS: the keys, scaled by their fp32 norms where SCALED_KEYS, else with
    the norms beside them; else the values scaled by their fp16 norms): prefix tiles unpacked from the
    cache, then the chunk's fresh K/V (key norms 1)."""
    WORDS: gl.constexpr = HEAD_DIM // 8
    WORDS_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [128 // WORDS, WORDS // 4], [4, 1], [1, 0])
    ROWS_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [256 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])
    # the lookup's four table words (`KernelCodec.lut_lane_tables`), one register each that every lookup
    # shares (a constant would be re-materialized before each byte permute)
    table = gl.zeros([1, 1], gl.int32, layout=WORDS_LAYOUT) + (_KEY_TABLE_ROW if KEYS else _VALUE_TABLE_ROW) * 32
    t0 = gl.load(tables_ptr + table)
    t1 = gl.load(tables_ptr + table + 32)
    t2 = gl.load(tables_ptr + table + 64)
    t3 = gl.load(tables_ptr + table + 96)
    # codes arrive PREFETCH tiles ahead of their unpacking, in registers, and the pages that hold them a tile
    # before that (read right before the codes they locate, pages stalled every tile: H200, scratch run, chunk
    # 64 / 512 / 2048 at d=128 0.099 / 0.351 / 1.487 ms, pages a tile ahead 0.092 / 0.349 / 1.490)
    first = _tile_blocks(block_table_ptr, table_row, lo, hi, BLOCK_SIZE, TILE, WORDS_LAYOUT)
    codes, norms = _load_codes(cache_ptr, first, kv_head, lo, hi, NUM_KV_HEADS, BLOCK_SIZE, HEAD_PAGE_BYTES,
                               CODES_OFFSET, NORMS_OFFSET, CODE_BYTES, TILE, WORDS, WORDS_LAYOUT)
    if PREFETCH == 2:
        second = _tile_blocks(block_table_ptr, table_row, lo + TILE, hi, BLOCK_SIZE, TILE, WORDS_LAYOUT)
        codes2, norms2 = _load_codes(cache_ptr, second, kv_head, lo + TILE, hi, NUM_KV_HEADS, BLOCK_SIZE,
                                     HEAD_PAGE_BYTES, CODES_OFFSET, NORMS_OFFSET, CODE_BYTES, TILE, WORDS, WORDS_LAYOUT)
    blocks = _tile_blocks(block_table_ptr, table_row, lo + PREFETCH * TILE, hi, BLOCK_SIZE, TILE, WORDS_LAYOUT)
    for t in range(n_prefix):
        next_codes, next_norms = _load_codes(
            cache_ptr, blocks, kv_head, lo + (t + PREFETCH) * TILE, hi, NUM_KV_HEADS, BLOCK_SIZE, HEAD_PAGE_BYTES,
            CODES_OFFSET, NORMS_OFFSET, CODE_BYTES, TILE, WORDS, WORDS_LAYOUT)
        blocks = _tile_blocks(block_table_ptr, table_row, lo + (t + PREFETCH + 1) * TILE, hi, BLOCK_SIZE, TILE,
                              WORDS_LAYOUT)
        stage = t % STAGES
        mbarrier.wait(empty.index(stage), ((t // STAGES) & 1) ^ 1)
        if KEYS and SCALED_KEYS:  # the fp32 norm as an fp16 pair hi + lo, each level rounded once
            high = norms.to(gl.float16)
            low = (norms - high.to(gl.float32)).to(gl.float16)[:, None]
            high = high[:, None]
            levels = gl.inline_asm_elementwise(LUT, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h,h,h,r,r,r,r",
                                               [codes, high, high, low, low, t0, t1, t2, t3],
                                               dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        elif KEYS:
            levels = gl.inline_asm_elementwise(LUT, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", [codes, t0, t1, t2, t3],
                                               dtype=(gl.float16,) * 8, is_pure=True, pack=1)
            kn_bufs.index(stage).store(norms)
        else:
            scale = norms.to(gl.float16)[:, None]
            levels = gl.inline_asm_elementwise(LUT, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h,r,r,r,r",
                                               [codes, scale, scale, t0, t1, t2, t3],
                                               dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        bufs.index(stage).store(_coordinate_order(levels, codes))
        fence_async_shared()
        mbarrier.arrive(ready.index(stage), count=1)
        if PREFETCH == 2:
            codes, norms, codes2, norms2 = codes2, norms2, next_codes, next_norms
        else:
            codes, norms = next_codes, next_norms
    kv_rows = gl.arange(0, TILE, layout=gl.SliceLayout(1, ROWS_LAYOUT))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ROWS_LAYOUT))
    ones = gl.full([TILE], 1.0, gl.float32, layout=gl.SliceLayout(1, ROWS_LAYOUT))
    for t in range(n_prefix, n_tiles):
        positions = chunk_lo + (t - n_prefix) * TILE + kv_rows
        valid = (positions < chunk_hi)[:, None]
        offsets = (query_start + positions) * stride_kv_token + kv_head * stride_kv_head
        fresh = gl.load(fresh_ptr + offsets[:, None] + dims[None, :], mask=valid, other=0.0)
        stage = t % STAGES
        mbarrier.wait(empty.index(stage), ((t // STAGES) & 1) ^ 1)
        bufs.index(stage).store(fresh)
        if KEYS and not SCALED_KEYS:
            kn_bufs.index(stage).store(ones)
        fence_async_shared()
        mbarrier.arrive(ready.index(stage), count=1)


@gluon.jit
def _tile_softmax(n, scores, running_max, running_sum, n_prefix, lo, hi, prefix_len, chunk_lo, chunk_hi, key_start,
                  query_pos, sliding_window, softcap, kn_bufs, columns, TILE: gl.constexpr, STAGES: gl.constexpr,
                  S_LAYOUT: gl.constexpr, P_OPERAND: gl.constexpr, USE_SOFTCAP: gl.constexpr,
                  USE_STARTS: gl.constexpr, USE_WINDOW: gl.constexpr, MASKED: gl.constexpr,
                  SCALED_KEYS: gl.constexpr):
    """Tile n's raw scores → its fp16 probabilities (the value MMA's operand), the correction of what was
    summed before, the new statistics."""
    if not SCALED_KEYS:
        scores = scores * kn_bufs.index(n % STAGES).load(gl.SliceLayout(0, S_LAYOUT))[None, :]
    if USE_SOFTCAP:
        scores = _softcapped_log2(scores, softcap)
    if MASKED:
        start, limit = _tile_bounds(n, n_prefix, lo, hi, prefix_len, chunk_lo, chunk_hi, TILE)
        positions = start + columns
        visible = (positions < limit)[None, :] & (positions[None, :] <= query_pos[:, None])
        if USE_STARTS:
            visible = visible & (positions >= key_start)[None, :]
        if USE_WINDOW:
            visible = visible & (positions[None, :] > query_pos[:, None] - sliding_window)
        scores = gl.where(visible, scores, float("-inf"))
    p, correction, running_max, running_sum = masked_online_softmax_step(scores, running_max, running_sum)
    return gl.convert_layout(p.to(gl.float16), P_OPERAND), correction, running_max, running_sum


@gluon.jit
def _consumer_step(n, query, acc, probs, running_max, running_sum, n_prefix, lo, hi, prefix_len, chunk_lo, chunk_hi,
                   key_start, query_pos, sliding_window, softcap, k_bufs, v_bufs, kn_bufs, ready, empty, s_zero,
                   columns, TILE: gl.constexpr, STAGES: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr,
                   P_OPERAND: gl.constexpr, USE_SOFTCAP: gl.constexpr, USE_STARTS: gl.constexpr,
                   USE_WINDOW: gl.constexpr, MASKED: gl.constexpr, FIRST: gl.constexpr, SCALED_KEYS: gl.constexpr):
    """Tile n ≥ 1, in FlashAttention-3's intra-warpgroup order: its scores and tile n − 1's values go to the
    tensor cores, its softmax follows, then tile n − 1's stage goes back to the producer and what was summed
    is rescaled to tile n's maximum. FIRST: n = 1, nothing summed yet. (ptxas moves the wait for the values
    ahead of the softmax; the other consumer's work fills that time. Pinning the wait after the softmax with a
    shared-memory store was tried in a scratch run and not kept: it was no faster.)"""
    stage = n % STAGES
    mbarrier.wait(ready.index(stage), (n // STAGES) & 1)
    scores = warpgroup_mma(query, k_bufs.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    acc = warpgroup_mma(probs, v_bufs.index((n - 1) % STAGES), acc, use_acc=not FIRST, is_async=True)
    scores = warpgroup_mma_wait(1, deps=(scores,))
    next_probs, correction, running_max, running_sum = _tile_softmax(
        n, scores, running_max, running_sum, n_prefix, lo, hi, prefix_len, chunk_lo, chunk_hi, key_start, query_pos,
        sliding_window, softcap, kn_bufs, columns, TILE, STAGES, S_LAYOUT, P_OPERAND, USE_SOFTCAP, USE_STARTS,
        USE_WINDOW, MASKED, SCALED_KEYS)
    acc, probs = warpgroup_mma_wait(0, deps=(acc, probs))
    mbarrier.arrive(empty.index((n - 1) % STAGES), count=1)
    acc = acc * gl.convert_layout(correction, gl.SliceLayout(1, O_LAYOUT))[:, None]
    return acc, next_probs, running_max, running_sum


@gluon.jit
def _query_rows(first_token, query_len, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, WARPGROUP: gl.constexpr,
                LAYOUT: gl.constexpr):
    """A consumer's 64 query rows (rows 64·WARPGROUP on of the program's; a row is a token × a head of the
    GQA group, padded to GROUP_PAD) in a 1-D LAYOUT: (token, head within the group, whether it exists)."""
    rows = 64 * WARPGROUP + gl.arange(0, 64, layout=LAYOUT)
    token = first_token + rows // GROUP_PAD
    member = rows % GROUP_PAD
    return token, member, (token < query_len) & (member < GROUP)


@gluon.jit
def _consumer(query_ptr, out_ptr, lse_ptr, signs_ptr, stride_query_token, stride_query_head, stride_out_token,
              stride_out_head, scale, softcap, sliding_window, query_start, query_len, first_token, prefix_len,
              key_start, kv_head, split, num_splits, lo, hi, n_prefix, chunk_lo, chunk_hi, n_tiles, q_bufs, k_bufs,
              v_bufs, kn_bufs, s_buf, ready, empty, s_ready, NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr,
              GROUP_PAD: gl.constexpr, HEAD_DIM: gl.constexpr, TILE: gl.constexpr, STAGES: gl.constexpr,
              USE_SOFTCAP: gl.constexpr, USE_WINDOW: gl.constexpr, USE_STARTS: gl.constexpr,
              RETURN_LSE: gl.constexpr, SPLIT: gl.constexpr, WARPGROUP: gl.constexpr, WIDE: gl.constexpr,
              UNROTATE: gl.constexpr, SIGN_SCALE: gl.constexpr):
    """One warpgroup's 64 query rows (rows 64·WARPGROUP on of the program's) over every tile of the ring,
    then their outputs (the fp32 partial and log-sum-exp of a split, or the output: un-rotated here where
    UNROTATE: R = SIGN_SCALE · S, S from signs_ptr, else rotated). WIDE (one of two consumers): the query is
    the score MMA's register operand and the keys come scaled by their norms."""
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, TILE, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    P_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    ROWS_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [256 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])

    token, member, row_valid = _query_rows(first_token, query_len, GROUP, GROUP_PAD, WARPGROUP,
                                           gl.SliceLayout(1, ROWS_LAYOUT))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ROWS_LAYOUT))
    row_offsets = (query_start + token) * stride_query_token + (kv_head * GROUP + member) * stride_query_head
    query = gl.load(query_ptr + row_offsets[:, None] + dims[None, :], mask=row_valid[:, None], other=0.0)
    query = (query * (scale if USE_SOFTCAP else scale * LOG2E)).to(gl.float16)
    if WIDE:
        query = gl.convert_layout(query, gl.DotOperandLayout(operand_index=0, parent=S_LAYOUT, k_width=2))
    else:  # in shared memory (wgmma reads it there), which leaves registers for the softmax
        query_smem = q_bufs.index(WARPGROUP)
        query_smem.store(query)
        fence_async_shared()
        partition_barrier()
        query = query_smem
    query_pos = prefix_len + gl.convert_layout(token, gl.SliceLayout(1, S_LAYOUT))
    if UNROTATE and WARPGROUP == 0:  # S into shared memory once per program, long before the outputs need it
        _store_signs(signs_ptr, s_buf, HEAD_DIM)
        mbarrier.arrive(s_ready, count=1)

    running_max = gl.full([64], float("-inf"), gl.float32, layout=gl.SliceLayout(1, S_LAYOUT))
    running_sum = gl.zeros([64], gl.float32, layout=gl.SliceLayout(1, S_LAYOUT))
    acc = gl.zeros([64, HEAD_DIM], gl.float32, layout=O_LAYOUT)
    s_zero = gl.zeros([64, TILE], gl.float32, layout=S_LAYOUT)
    columns = gl.arange(0, TILE, layout=gl.SliceLayout(0, S_LAYOUT))
    if n_tiles > 0:
        mbarrier.wait(ready.index(0), 0)
        scores = warpgroup_mma(query, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False)
        probs, correction, running_max, running_sum = _tile_softmax(
            0, scores, running_max, running_sum, n_prefix, lo, hi, prefix_len, chunk_lo, chunk_hi, key_start,
            query_pos, sliding_window, softcap, kn_bufs, columns, TILE, STAGES, S_LAYOUT, P_OPERAND, USE_SOFTCAP,
            USE_STARTS, USE_WINDOW, True, WIDE)
        if n_tiles > 1:
            acc, probs, running_max, running_sum = _consumer_step(
                1, query, acc, probs, running_max, running_sum, n_prefix, lo, hi, prefix_len, chunk_lo, chunk_hi,
                key_start, query_pos, sliding_window, softcap, k_bufs, v_bufs, kn_bufs, ready, empty, s_zero, columns,
                TILE, STAGES, S_LAYOUT, O_LAYOUT, P_OPERAND, USE_SOFTCAP, USE_STARTS, USE_WINDOW, True, True,
                WIDE)
        # whole prefix tiles need no mask (key starts and windows mask every tile)
        n_plain = 0 if USE_STARTS or USE_WINDOW else (hi - lo) // TILE
        for n in range(2, gl.minimum(n_plain, n_tiles)):
            acc, probs, running_max, running_sum = _consumer_step(
                n, query, acc, probs, running_max, running_sum, n_prefix, lo, hi, prefix_len, chunk_lo, chunk_hi,
                key_start, query_pos, sliding_window, softcap, k_bufs, v_bufs, kn_bufs, ready, empty, s_zero, columns,
                TILE, STAGES, S_LAYOUT, O_LAYOUT, P_OPERAND, USE_SOFTCAP, USE_STARTS, USE_WINDOW, False, False,
                WIDE)
        for n in range(gl.maximum(n_plain, 2), n_tiles):
            acc, probs, running_max, running_sum = _consumer_step(
                n, query, acc, probs, running_max, running_sum, n_prefix, lo, hi, prefix_len, chunk_lo, chunk_hi,
                key_start, query_pos, sliding_window, softcap, k_bufs, v_bufs, kn_bufs, ready, empty, s_zero, columns,
                TILE, STAGES, S_LAYOUT, O_LAYOUT, P_OPERAND, USE_SOFTCAP, USE_STARTS, USE_WINDOW, True, False,
                WIDE)
        acc = warpgroup_mma(probs, v_bufs.index((n_tiles - 1) % STAGES), acc, use_acc=n_tiles > 1, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, probs))[0]
        mbarrier.arrive(empty.index((n_tiles - 1) % STAGES), count=1)

    # the outputs straight from the MMA's layout
    out_token, out_member, out_valid = _query_rows(first_token, query_len, GROUP, GROUP_PAD, WARPGROUP,
                                                   gl.SliceLayout(1, O_LAYOUT))
    out_dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_LAYOUT))
    running_sum = gl.convert_layout(running_sum, gl.SliceLayout(1, O_LAYOUT))
    running_max = gl.convert_layout(running_max, gl.SliceLayout(1, O_LAYOUT))
    acc = acc / gl.maximum(running_sum, 1e-30)[:, None]
    if UNROTATE:
        mbarrier.wait(s_ready, 0)
        acc = _unrotated(acc, s_buf, SIGN_SCALE, O_LAYOUT)
    lse = gl.where(running_sum > 0, running_max + gl.log2(gl.maximum(running_sum, 1e-30)), float("-inf"))
    if SPLIT:
        partial_rows = (((query_start + out_token) * (NUM_KV_HEADS * GROUP) + kv_head * GROUP + out_member)
                        * num_splits + split)
        gl.store(out_ptr + partial_rows[:, None] * HEAD_DIM + out_dims[None, :], acc, mask=out_valid[:, None])
        gl.store(lse_ptr + partial_rows, lse, mask=out_valid)
    else:
        out_offsets = (query_start + out_token) * stride_out_token + (kv_head * GROUP + out_member) * stride_out_head
        gl.store(out_ptr + out_offsets[:, None] + out_dims[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=out_valid[:, None])
        if RETURN_LSE:
            lse_rows = (query_start + out_token) * (NUM_KV_HEADS * GROUP) + kv_head * GROUP + out_member
            gl.store(lse_ptr + lse_rows, lse * 0.6931471805599453, mask=out_valid)


@gluon.jit
def _store_signs(signs_ptr, s_buf, HEAD_DIM: gl.constexpr):
    """The int8 S of the rotation R = c · S into shared memory as bf16 (exact), the B operand of `_unrotated`."""
    LAYOUT: gl.constexpr = gl.BlockedLayout([1, 16], [512 // HEAD_DIM, HEAD_DIM // 16], [4, 1], [1, 0])
    rows = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, LAYOUT))
    columns = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, LAYOUT))
    s_buf.store(gl.load(signs_ptr + rows[:, None] * HEAD_DIM + columns[None, :]).to(gl.bfloat16))
    fence_async_shared()


@gluon.jit
def _unrotated(x, s_buf, SIGN_SCALE: gl.constexpr, LAYOUT: gl.constexpr):
    """x @ R for fp32 x [64, D] in the MMA's LAYOUT, R = SIGN_SCALE · S with S in s_buf, for a 16-bit output:
    x split into two bf16 parts (16 significant bits: the rest, under 2^-16 of x, is far below the output's
    rounding), each times S on the tensor cores (exact products, fp32 sums). An fp32-accurate third part
    takes registers enough that ptxas serializes every `wgmma` of the kernel (sm_90, Triton 3.6)."""
    A_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=LAYOUT, k_width=2)
    high = x.to(gl.bfloat16)
    low = (x - high.to(gl.float32)).to(gl.bfloat16)
    y = warpgroup_mma(gl.convert_layout(low, A_OPERAND), s_buf, gl.zeros(x.shape, gl.float32, layout=LAYOUT),
                      use_acc=False)
    y = warpgroup_mma(gl.convert_layout(high, A_OPERAND), s_buf, y)
    return y * SIGN_SCALE


@gluon.jit(do_not_specialize_on_alignment=SLICED_METADATA)
def _extend_hopper_kernel(
    query_ptr, keys_ptr, values_ptr, cache_ptr, tables_ptr, block_table_ptr, seq_lens_ptr, query_start_ptr,
    key_starts_ptr, signs_ptr, out_ptr, lse_ptr, stride_query_token, stride_query_head, stride_kv_token,
    stride_kv_head, stride_out_token, stride_out_head, stride_table_seq, scale, softcap, sliding_window, num_splits,
    NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, BLOCK_SIZE: gl.constexpr,
    HEAD_PAGE_BYTES: gl.constexpr, VALUES_OFFSET: gl.constexpr, KEY_NORMS_OFFSET: gl.constexpr,
    VALUE_NORMS_OFFSET: gl.constexpr, HEAD_DIM: gl.constexpr, KEY_BYTES: gl.constexpr, KEY_LUT: gl.constexpr,
    VALUE_BYTES: gl.constexpr, VALUE_LUT: gl.constexpr, USE_SOFTCAP: gl.constexpr, USE_WINDOW: gl.constexpr,
    USE_STARTS: gl.constexpr, RETURN_LSE: gl.constexpr, TILE: gl.constexpr, SPLIT: gl.constexpr,
    CONSUMERS: gl.constexpr, STAGES: gl.constexpr, PREFETCH: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, WIDE: gl.constexpr, UNROTATE: gl.constexpr, SIGN_SCALE: gl.constexpr,
):
    ROWS: gl.constexpr = 64 * CONSUMERS
    QUERY_TOKENS: gl.constexpr = ROWS // GROUP_PAD
    TILE_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    NORMS_SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])

    seq = gl.program_id(0)
    query_block = gl.program_id(1)
    kv_head = gl.program_id(2) // num_splits
    split = gl.program_id(2) % num_splits
    query_start = gl.load(query_start_ptr + seq)
    query_len = gl.load(query_start_ptr + seq + 1) - query_start
    first_token = query_block * QUERY_TOKENS
    if first_token >= query_len:
        return
    seq_len = gl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - query_len
    table_row = seq * stride_table_seq
    key_start = 0
    if USE_STARTS:
        key_start = gl.load(key_starts_ptr + seq)
    lo, hi = extend_tile_range(key_start, prefix_len + first_token, prefix_len, sliding_window, split, num_splits,
                               TILE, USE_WINDOW, SPLIT)
    n_prefix = gl.cdiv(gl.maximum(hi - lo, 0), TILE)
    chunk_lo = 0
    if USE_WINDOW:
        chunk_lo = gl.maximum(first_token - sliding_window + 1, 0) // TILE * TILE
    chunk_hi = gl.minimum(first_token + QUERY_TOKENS, query_len)
    if SPLIT:
        chunk_hi = gl.where(split == num_splits - 1, chunk_hi, chunk_lo)
    n_tiles = n_prefix + gl.cdiv(gl.maximum(chunk_hi - chunk_lo, 0), TILE)

    q_bufs = gl.allocate_shared_memory(gl.float16, [CONSUMERS, 64, HEAD_DIM], TILE_SMEM)
    k_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, TILE, HEAD_DIM], TILE_SMEM)
    v_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, TILE, HEAD_DIM], TILE_SMEM)
    kn_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, TILE], NORMS_SMEM)
    s_buf = gl.allocate_shared_memory(gl.bfloat16, [HEAD_DIM, HEAD_DIM], TILE_SMEM)  # used where UNROTATE
    s_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(s_ready, count=1)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=2)  # the key and the value producer
        mbarrier.init(empty.index(i), count=CONSUMERS)

    # each partition's arguments are a tuple literal: bound to a name, a tuple's constexprs become tensors
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (query_ptr, out_ptr, lse_ptr, signs_ptr, stride_query_token, stride_query_head,
                         stride_out_token, stride_out_head, scale, softcap, sliding_window, query_start, query_len,
                         first_token, prefix_len, key_start, kv_head, split, num_splits, lo, hi, n_prefix, chunk_lo,
                         chunk_hi, n_tiles, q_bufs, k_bufs, v_bufs, kn_bufs, s_buf, ready, empty, s_ready,
                         NUM_KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM, TILE, STAGES, USE_SOFTCAP, USE_WINDOW, USE_STARTS,
                         RETURN_LSE, SPLIT, 0, WIDE, UNROTATE, SIGN_SCALE)),
            (_consumer, (query_ptr, out_ptr, lse_ptr, signs_ptr, stride_query_token, stride_query_head,
                         stride_out_token, stride_out_head, scale, softcap, sliding_window, query_start, query_len,
                         first_token, prefix_len, key_start, kv_head, split, num_splits, lo, hi, n_prefix, chunk_lo,
                         chunk_hi, n_tiles, q_bufs, k_bufs, v_bufs, kn_bufs, s_buf, ready, empty, s_ready,
                         NUM_KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM, TILE, STAGES, USE_SOFTCAP, USE_WINDOW, USE_STARTS,
                         RETURN_LSE, SPLIT, 1, WIDE, UNROTATE, SIGN_SCALE)),
            (_producer, (cache_ptr, tables_ptr, block_table_ptr, table_row, kv_head, keys_ptr, stride_kv_token,
                         stride_kv_head, query_start, lo, hi, n_prefix, chunk_lo, chunk_hi, n_tiles, k_bufs, kn_bufs,
                         ready, empty, NUM_KV_HEADS, BLOCK_SIZE, HEAD_PAGE_BYTES, 0, KEY_NORMS_OFFSET, KEY_BYTES,
                         KEY_LUT, HEAD_DIM, TILE, STAGES, PREFETCH, True, WIDE)),
            (_producer, (cache_ptr, tables_ptr, block_table_ptr, table_row, kv_head, values_ptr, stride_kv_token,
                         stride_kv_head, query_start, lo, hi, n_prefix, chunk_lo, chunk_hi, n_tiles, v_bufs, kn_bufs,
                         ready, empty, NUM_KV_HEADS, BLOCK_SIZE, HEAD_PAGE_BYTES, VALUES_OFFSET, VALUE_NORMS_OFFSET,
                         VALUE_BYTES, VALUE_LUT, HEAD_DIM, TILE, STAGES, PREFETCH, False, False)),
        ], [4, 4, 4], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (query_ptr, out_ptr, lse_ptr, signs_ptr, stride_query_token, stride_query_head,
                         stride_out_token, stride_out_head, scale, softcap, sliding_window, query_start, query_len,
                         first_token, prefix_len, key_start, kv_head, split, num_splits, lo, hi, n_prefix, chunk_lo,
                         chunk_hi, n_tiles, q_bufs, k_bufs, v_bufs, kn_bufs, s_buf, ready, empty, s_ready,
                         NUM_KV_HEADS, GROUP, GROUP_PAD, HEAD_DIM, TILE, STAGES, USE_SOFTCAP, USE_WINDOW, USE_STARTS,
                         RETURN_LSE, SPLIT, 0, WIDE, UNROTATE, SIGN_SCALE)),
            (_producer, (cache_ptr, tables_ptr, block_table_ptr, table_row, kv_head, keys_ptr, stride_kv_token,
                         stride_kv_head, query_start, lo, hi, n_prefix, chunk_lo, chunk_hi, n_tiles, k_bufs, kn_bufs,
                         ready, empty, NUM_KV_HEADS, BLOCK_SIZE, HEAD_PAGE_BYTES, 0, KEY_NORMS_OFFSET, KEY_BYTES,
                         KEY_LUT, HEAD_DIM, TILE, STAGES, PREFETCH, True, WIDE)),
            (_producer, (cache_ptr, tables_ptr, block_table_ptr, table_row, kv_head, values_ptr, stride_kv_token,
                         stride_kv_head, query_start, lo, hi, n_prefix, chunk_lo, chunk_hi, n_tiles, v_bufs, kn_bufs,
                         ready, empty, NUM_KV_HEADS, BLOCK_SIZE, HEAD_PAGE_BYTES, VALUES_OFFSET, VALUE_NORMS_OFFSET,
                         VALUE_BYTES, VALUE_LUT, HEAD_DIM, TILE, STAGES, PREFETCH, False, False)),
        ], [4, 4], [PRODUCER_REGS, PRODUCER_REGS])


def unrotates(codec, num_splits: int, out_dtype: torch.dtype) -> bool:
    """Whether the kernel un-rotates its outputs itself (`_unrotated`): unsplit programs, a rotation with a
    sign form (a randomized Hadamard's), a 16-bit output, head_dim up to 128 (at 256 the signs would take
    128 KB of shared memory beside the ring's 128). Else they come out rotated, for a rotation or a merge
    after it."""
    return (num_splits == 1 and codec.rotation_signs is not None and out_dtype in (torch.float16, torch.bfloat16)
            and codec.layout.head_dim <= 128)


def program_shape(codec, rows: int) -> dict:
    """The kernel's constants and launch options that follow from its program of `rows` query rows (64 per
    consumer warpgroup) and the head_dim: tile, ring, prefetch, registers, and where the query and the key
    norms go (WIDE)."""
    layout = codec.layout
    consumers = rows // 64
    widest = narrow_only(layout.head_dim)
    tile = 64 if layout.head_dim == 128 or consumers == 2 or widest else 128
    wide = consumers == 2  # see WIDE below
    return dict(
        KEY_LUT=codec.key_scaled_lut_asm if wide else codec.key_table_lut_asm,
        # 128-key tiles spill two consumers' registers; one consumer (d=64) has room for them
        TILE=tile, CONSUMERS=consumers, STAGES=2 if widest else STAGES,
        # a single consumer waits on the producers: there they keep 128 keys of codes in flight (at d=256 64,
        # as many bytes; two tiles ahead the producers need registers the consumer does not have to spare)
        PREFETCH=128 // tile if consumers == 1 and not widest else 1,
        PRODUCER_REGS=PRODUCER_REGS if consumers == 2 else WIDEST_PRODUCER_REGS if widest else NARROW_PRODUCER_REGS,
        # Two consumers are short of issue slots: there the query is the score MMA's register operand (no
        # shared-memory read of it per MMA; its buffers are then left unused) and the key producer scales
        # the keys by their fp32 norms (no multiply per score). H200, 16K prefix, scratch runs at d=128,
        # chunk 2048 / 512: the query in shared memory 1.571 / 0.374 ms, in registers 1.541 / 0.361; keys
        # scaled too 1.483 / 0.350 (1.531 / 0.362 without, same run). A single consumer waits on its
        # producers: there keys scaled (by fp16 norms) took chunk 64 from 0.099 to 0.109 ms, and the query
        # in registers d=64 chunk 16 from 0.037 to 0.038.
        CONSUMER_REGS=CONSUMER_REGS, WIDE=wide,
        num_warps=4,  # the default partition: the first consumer
        maxnreg=(65536 // (32 * program_warps(rows))) // 8 * 8)  # the register file over every warp


def launch(rotated_query, rotated_keys, rotated_values, cache, block_table, seq_lens, query_start, key_starts, out,
           lse, codec, group: int, group_pad: int, rows: int, grid: tuple, scale: float, softcap: float | None,
           sliding_window: int | None, num_splits: int, return_lse: bool) -> None:
    """The kernel over `extend._launch`'s rotated operands into its outputs (same grid and output layout as
    `extend._extend_kernel`): `out` the rotated outputs unless `unrotates`, then the output (any 16-bit
    dtype, any token and head strides). `rows`: query rows per program, 64 per consumer warpgroup."""
    layout = codec.layout
    unrotate = unrotates(codec, num_splits, out.dtype)
    _extend_hopper_kernel[grid](
        rotated_query, rotated_keys, rotated_values, cache, codec.lut_lane_tables, block_table, seq_lens, query_start,
        seq_lens if key_starts is None else key_starts, codec.rotation_signs if unrotate else seq_lens, out, lse,
        rotated_query.stride(0), rotated_query.stride(1), rotated_keys.stride(0), rotated_keys.stride(1),
        out.stride(0), out.stride(1), block_table.stride(0), float(scale), float(softcap or 0.0),
        int(sliding_window or 0), num_splits,
        NUM_KV_HEADS=layout.num_kv_heads, GROUP=group, GROUP_PAD=group_pad, BLOCK_SIZE=layout.block_size,
        HEAD_PAGE_BYTES=layout.head_page_bytes, VALUES_OFFSET=layout.values_offset,
        KEY_NORMS_OFFSET=layout.key_norms_offset, VALUE_NORMS_OFFSET=layout.value_norms_offset,
        HEAD_DIM=layout.head_dim, KEY_BYTES=layout.key_bytes, VALUE_BYTES=layout.value_bytes,
        VALUE_LUT=codec.value_scaled_lut_asm, USE_SOFTCAP=softcap is not None, USE_WINDOW=sliding_window is not None,
        USE_STARTS=key_starts is not None, RETURN_LSE=return_lse, SPLIT=num_splits > 1,
        # Un-rotated here, the output saves the rotation a launch and an fp32 round trip (H200, scratch run)
        UNROTATE=unrotate, SIGN_SCALE=codec.rotation_sign_scale if unrotate else 0.0,
        **program_shape(codec, rows))
