"""Extend attention on Hopper (sm_90) as a Gluon kernel: the fused extend kernel of `extend.py` with the
unpacking of compressed tiles overlapped with the tensor cores.

Why a second kernel: Triton 3.6 waits for each `wgmma` right after issuing it, so in `extend.py` the
unpacking of codes into fp16 levels and the softmax never run while the tensor cores work; at d=128 that
kernel took 2.4–2.9x the time of bf16 FlashAttention-3 over a 16K prefix. Gluon issues `wgmma`s
asynchronously and waits where the kernel says. Each warpgroup, FlashAttention-3 style:
- scores tile j + 1 on the tensor cores while it runs tile j's softmax;
- accumulates tile j's values while it unpacks tile j + 2's keys and tile j + 1's values (byte-permute
  lookups, `lut_asm.py`) into double-buffered shared-memory operands;
- copies codes and norms three tiles ahead with `cp.async` into a ring of staging slots.
Keys are scaled by their fp32 norms on the scores, values by their fp16 norms in the lookup.

It serves what `serves` says (4-bit keys and values, head_dim 64 or 128, the chunk's fresh K/V:
`extend_attention`, not `cached_attention`); `extend.py` runs everything else and is this kernel's
specification, as `reference.extend_reference` is for both. Gluon does not run in Triton's interpreter:
tests/kernels/test_extend_hopper.py runs it on a Hopper GPU only.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .launch import SLICED_METADATA
from .lut_asm import byte_permute_available
from .softmax import masked_online_softmax_step
from .visible_keys import extend_tile_range

LOG2E = gl.constexpr(1.4426950408889634)
enabled = True  # False: `extend_attention` runs extend.py's kernel everywhere (benchmarks time both)


def serves(layout, device: torch.device, cached_chunk: bool, rows: int) -> bool:
    """Whether `extend_attention` runs this kernel: a Hopper GPU, 4-bit keys and values, head_dim 64 or
    128, fresh K/V, programs of 64 or 128 query rows."""
    return (enabled and not cached_chunk and byte_permute_available(device)
            and torch.cuda.get_device_capability(device)[0] == 9 and layout.key_bits == 4 and layout.value_bits == 4
            and layout.head_dim in (64, 128) and rows in (64, 128))


@gluon.jit
def _coordinate_order(levels, words):
    """The eight [R, W] outputs of a lookup over `words` (level k of each run of 8 indices) → [R, 8W] in
    coordinate order (each join adds a trailing axis, so the outermost join splits the lowest index bit)."""
    o0, o1, o2, o3, o4, o5, o6, o7 = levels
    even = gl.join(gl.join(o0, o4), gl.join(o2, o6))
    odd = gl.join(gl.join(o1, o5), gl.join(o3, o7))
    return gl.reshape(gl.join(even, odd), [words.shape[0], words.shape[1] * 8])


@gluon.jit
def _tile_blocks(block_table_ptr, table_row, start, limit, TILE: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                 LAYOUT: gl.constexpr):
    """Block ids of a tile's positions (0 past `limit`), in a 1-D layout."""
    positions = start + gl.arange(0, TILE, layout=LAYOUT)
    return gl.load(block_table_ptr + table_row + positions // BLOCK_SIZE, mask=positions < limit, other=0)


@gluon.jit
def _copy_tile(cache_ptr, kv_head, start, limit, blocks_w, blocks_n, k_codes, v_codes, k_norms, v_norms,
               NUM_KV_HEADS: gl.constexpr, BLOCK_SIZE: gl.constexpr, HEAD_PAGE_BYTES: gl.constexpr,
               VALUES_OFFSET: gl.constexpr, KEY_NORMS_OFFSET: gl.constexpr, VALUE_NORMS_OFFSET: gl.constexpr,
               KEY_BYTES: gl.constexpr, VALUE_BYTES: gl.constexpr, TILE: gl.constexpr, WORDS: gl.constexpr,
               WORDS_LAYOUT: gl.constexpr, NORMS_LAYOUT: gl.constexpr):
    """cp.async a tile's packed codes and norms into a staging slot (rows past `limit` read zeros)."""
    positions = start + gl.arange(0, TILE, layout=gl.SliceLayout(1, WORDS_LAYOUT))
    valid = (positions < limit)[:, None]
    page = cache_ptr + (blocks_w.to(gl.int64) * NUM_KV_HEADS + kv_head) * HEAD_PAGE_BYTES
    offsets = positions % BLOCK_SIZE
    words = gl.arange(0, WORDS, layout=gl.SliceLayout(0, WORDS_LAYOUT))[None, :]
    async_copy.async_copy_global_to_shared(
        k_codes, (page + offsets * KEY_BYTES).to(gl.pointer_type(gl.int32))[:, None] + words, mask=valid)
    async_copy.async_copy_global_to_shared(
        v_codes, (page + VALUES_OFFSET + offsets * VALUE_BYTES).to(gl.pointer_type(gl.int32))[:, None] + words,
        mask=valid)
    positions = start + gl.arange(0, TILE, layout=NORMS_LAYOUT)
    valid = positions < limit
    norms = (cache_ptr + (blocks_n.to(gl.int64) * NUM_KV_HEADS + kv_head) * HEAD_PAGE_BYTES
             + (positions % BLOCK_SIZE) * 4)
    async_copy.async_copy_global_to_shared(k_norms, (norms + KEY_NORMS_OFFSET).to(gl.pointer_type(gl.float32)),
                                           mask=valid)
    async_copy.async_copy_global_to_shared(v_norms, (norms + VALUE_NORMS_OFFSET).to(gl.pointer_type(gl.float32)),
                                           mask=valid)
    async_copy.commit_group()


@gluon.jit
def _unpack(codes, dst, LUT: gl.constexpr, WORDS_LAYOUT: gl.constexpr):
    """A staged tile of packed key codes → its fp16 levels in a wgmma operand buffer."""
    words = codes.load(WORDS_LAYOUT)
    levels = gl.inline_asm_elementwise(LUT, "=h,=h,=h,=h,=h,=h,=h,=h,r", [words], dtype=(gl.float16,) * 8,
                                       is_pure=True, pack=1)
    dst.store(_coordinate_order(levels, words))


@gluon.jit
def _unpack_values(codes, norms, dst, SCALED_LUT: gl.constexpr, WORDS_LAYOUT: gl.constexpr):
    """`_unpack` for values, each row scaled by its norm in fp16 (by the lookup's PTX, a pair at a time)."""
    words = codes.load(WORDS_LAYOUT)
    scale = norms.load(gl.SliceLayout(1, WORDS_LAYOUT)).to(gl.float16)
    levels = gl.inline_asm_elementwise(SCALED_LUT, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
                                       [words, scale[:, None], scale[:, None]], dtype=(gl.float16,) * 8,
                                       is_pure=True, pack=1)
    dst.store(_coordinate_order(levels, words))


@gluon.jit
def _softcapped_log2(scores, softcap):
    """softcap · tanh(scores / softcap) in log2 units, tanh(x) = 1 − 2 / (exp(2x) + 1)."""
    return softcap * LOG2E * (1.0 - 2.0 / (gl.exp2(scores * (2.0 * LOG2E / softcap)) + 1.0))


@gluon.jit
def _log2_scores(scores, key_norms, softcap, USE_SOFTCAP: gl.constexpr):
    """Raw tile scores (levels · query) → log2-unit scores: keys scaled by their fp32 norms, soft-capped."""
    scores = scores * key_norms[None, :]
    if USE_SOFTCAP:
        scores = _softcapped_log2(scores, softcap)
    return scores


@gluon.jit
def _prefix_visible(start, limit, key_start, query_pos, sliding_window, columns, USE_STARTS: gl.constexpr,
                    USE_WINDOW: gl.constexpr):
    """[rows, TILE] mask of the prefix keys at `start` + columns that each query row sees."""
    positions = start + columns
    visible = (positions < limit)[None, :]
    if USE_STARTS:
        visible = visible & (positions >= key_start)[None, :]
    if USE_WINDOW:
        visible = visible & (positions[None, :] > query_pos[:, None] - sliding_window)
    return visible


@gluon.jit
def _prefix_step(j, lo, query, scores, acc, probs, running_max, running_sum, blocks_w, blocks_n, cache_ptr,
                 block_table_ptr, table_row, kv_head, hi, key_start, query_pos, sliding_window, softcap,
                 k_bufs, v_bufs, k_codes, v_codes, k_norms, v_norms, s_zero, columns,
                 NUM_KV_HEADS: gl.constexpr, BLOCK_SIZE: gl.constexpr, HEAD_PAGE_BYTES: gl.constexpr,
                 VALUES_OFFSET: gl.constexpr, KEY_NORMS_OFFSET: gl.constexpr, VALUE_NORMS_OFFSET: gl.constexpr,
                 KEY_BYTES: gl.constexpr, VALUE_BYTES: gl.constexpr, KEY_LUT: gl.constexpr,
                 VALUE_LUT: gl.constexpr, TILE: gl.constexpr, WORDS: gl.constexpr, WORDS_LAYOUT: gl.constexpr,
                 NORMS_LAYOUT: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr,
                 P_OPERAND: gl.constexpr, USE_SOFTCAP: gl.constexpr, USE_STARTS: gl.constexpr,
                 USE_WINDOW: gl.constexpr, FIRST: gl.constexpr, LAST: gl.constexpr):
    """Prefix tile j (at lo + j·TILE), whose scores are in hand: score tile j + 1 while the softmax of tile j
    runs, then accumulate tile j's values while tile j + 2's keys and tile j + 1's values are unpacked.
    Codes are copied three tiles ahead (a ring of 3 slots holds tile j + 1's values, tile j + 2 and tile
    j + 3 in flight; norms a ring of 4, tile j's key norms too). FIRST: the accumulator starts here;
    LAST: no tile after j. The first and last tiles are masked, every tile with key starts or a window."""
    if not LAST:
        next_scores = warpgroup_mma(query, k_bufs.index((j + 1) % 2).permute((1, 0)), s_zero, use_acc=False,
                                    is_async=True)
        _copy_tile(cache_ptr, kv_head, lo + (j + 3) * TILE, hi, blocks_w, blocks_n, k_codes.index((j + 3) % 3),
                   v_codes.index((j + 3) % 3), k_norms.index((j + 3) % 4), v_norms.index((j + 3) % 4), NUM_KV_HEADS,
                   BLOCK_SIZE, HEAD_PAGE_BYTES, VALUES_OFFSET, KEY_NORMS_OFFSET, VALUE_NORMS_OFFSET, KEY_BYTES,
                   VALUE_BYTES, TILE, WORDS, WORDS_LAYOUT, NORMS_LAYOUT)
        blocks_w = _tile_blocks(block_table_ptr, table_row, lo + (j + 4) * TILE, hi, TILE, BLOCK_SIZE,
                                gl.SliceLayout(1, WORDS_LAYOUT))
        blocks_n = _tile_blocks(block_table_ptr, table_row, lo + (j + 4) * TILE, hi, TILE, BLOCK_SIZE, NORMS_LAYOUT)
    start = lo + j * TILE
    scores = _log2_scores(scores, k_norms.index(j % 4).load(gl.SliceLayout(0, S_LAYOUT)), softcap, USE_SOFTCAP)
    if FIRST or LAST or USE_STARTS or USE_WINDOW:
        scores = gl.where(_prefix_visible(start, hi, key_start, query_pos, sliding_window, columns, USE_STARTS,
                                          USE_WINDOW), scores, float("-inf"))
    p, correction, running_max, running_sum = masked_online_softmax_step(scores, running_max, running_sum)
    probs = gl.convert_layout(p.to(gl.float16), P_OPERAND)
    if FIRST:
        acc = warpgroup_mma(probs, v_bufs.index(j % 2), acc, use_acc=False, is_async=True)
    else:
        correction = gl.convert_layout(correction, gl.SliceLayout(1, O_LAYOUT))
        acc = warpgroup_mma(probs, v_bufs.index(j % 2), acc * correction[:, None], is_async=True)
    if not LAST:
        async_copy.wait_group(1)  # tile j + 2's codes have landed (this thread's copies)
        _unpack(k_codes.index((j + 2) % 3), k_bufs.index(j % 2), KEY_LUT, WORDS_LAYOUT)
        _unpack_values(v_codes.index((j + 1) % 3), v_norms.index((j + 1) % 4), v_bufs.index((j + 1) % 2),
                       VALUE_LUT, WORDS_LAYOUT)
        scores, acc, probs = warpgroup_mma_wait(0, deps=(next_scores, acc, probs))
        fence_async_shared()
        gl.thread_barrier()
    else:
        acc, probs = warpgroup_mma_wait(0, deps=(acc, probs))
    return scores, acc, probs, running_max, running_sum, blocks_w, blocks_n


@gluon.jit(do_not_specialize_on_alignment=SLICED_METADATA)
def _extend_hopper_kernel(
    query_ptr, keys_ptr, values_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, query_start_ptr, key_starts_ptr,
    out_ptr, lse_ptr, stride_query_token, stride_query_head, stride_kv_token, stride_kv_head, stride_table_seq,
    scale, softcap, sliding_window, num_splits,
    NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, BLOCK_SIZE: gl.constexpr,
    HEAD_PAGE_BYTES: gl.constexpr, VALUES_OFFSET: gl.constexpr, KEY_NORMS_OFFSET: gl.constexpr,
    VALUE_NORMS_OFFSET: gl.constexpr, HEAD_DIM: gl.constexpr, KEY_BYTES: gl.constexpr, KEY_LUT: gl.constexpr,
    VALUE_BYTES: gl.constexpr, VALUE_LUT: gl.constexpr, USE_SOFTCAP: gl.constexpr, USE_WINDOW: gl.constexpr,
    USE_STARTS: gl.constexpr, RETURN_LSE: gl.constexpr, TILE: gl.constexpr, SPLIT: gl.constexpr,
    num_warps: gl.constexpr,
):
    ROWS: gl.constexpr = 16 * num_warps  # a warpgroup's wgmma covers 64 rows
    QUERY_TOKENS: gl.constexpr = ROWS // GROUP_PAD
    WORDS: gl.constexpr = HEAD_DIM // 8  # 32-bit words of packed 4-bit indices per row
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, TILE, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    Q_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=S_LAYOUT, k_width=2)
    P_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    WORDS_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [128 // WORDS, WORDS // 4], [num_warps, 1], [1, 0])
    ROWS_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [256 // HEAD_DIM, HEAD_DIM // 8], [num_warps, 1], [1, 0])
    NORMS_LAYOUT: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    TILE_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    CODES_SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
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

    k_bufs = gl.allocate_shared_memory(gl.float16, [2, TILE, HEAD_DIM], TILE_SMEM)
    v_bufs = gl.allocate_shared_memory(gl.float16, [2, TILE, HEAD_DIM], TILE_SMEM)
    k_codes = gl.allocate_shared_memory(gl.int32, [3, TILE, WORDS], CODES_SMEM)
    v_codes = gl.allocate_shared_memory(gl.int32, [3, TILE, WORDS], CODES_SMEM)
    k_norms = gl.allocate_shared_memory(gl.float32, [4, TILE], NORMS_SMEM)
    v_norms = gl.allocate_shared_memory(gl.float32, [4, TILE], NORMS_SMEM)

    # the program's query rows (tokens × heads of one GQA group), in log2 units unless soft-capped
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, ROWS_LAYOUT))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ROWS_LAYOUT))
    token = first_token + rows // GROUP_PAD
    member = rows % GROUP_PAD
    row_valid = (token < query_len) & (member < GROUP)
    row_offsets = (query_start + token) * stride_query_token + (kv_head * GROUP + member) * stride_query_head
    query = gl.load(query_ptr + row_offsets[:, None] + dims[None, :], mask=row_valid[:, None], other=0.0)
    query = gl.convert_layout((query * (scale if USE_SOFTCAP else scale * LOG2E)).to(gl.float16), Q_OPERAND)
    query_pos = prefix_len + gl.convert_layout(token, gl.SliceLayout(1, S_LAYOUT))

    running_max = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, S_LAYOUT))
    running_sum = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, S_LAYOUT))
    out = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=O_LAYOUT)
    s_zero = gl.zeros([ROWS, TILE], gl.float32, layout=S_LAYOUT)
    columns = gl.arange(0, TILE, layout=gl.SliceLayout(0, S_LAYOUT))

    # (a) the compressed prefix, its tiles in [lo, hi)
    # with splits, this program's share of the prefix's tiles; the last split also attends to the chunk
    lo, hi = extend_tile_range(key_start, prefix_len + first_token, prefix_len, sliding_window, split, num_splits,
                               TILE, USE_WINDOW, SPLIT)
    num_tiles = gl.cdiv(gl.maximum(hi - lo, 0), TILE)
    if num_tiles > 0:
        W_ROWS: gl.constexpr = gl.SliceLayout(1, WORDS_LAYOUT)
        for t in gl.static_range(3):  # tiles 0, 1, 2 in flight
            blocks_w = _tile_blocks(block_table_ptr, table_row, lo + t * TILE, hi, TILE, BLOCK_SIZE, W_ROWS)
            blocks_n = _tile_blocks(block_table_ptr, table_row, lo + t * TILE, hi, TILE, BLOCK_SIZE, NORMS_LAYOUT)
            _copy_tile(cache_ptr, kv_head, lo + t * TILE, hi, blocks_w, blocks_n, k_codes.index(t), v_codes.index(t),
                       k_norms.index(t), v_norms.index(t), NUM_KV_HEADS, BLOCK_SIZE, HEAD_PAGE_BYTES, VALUES_OFFSET,
                       KEY_NORMS_OFFSET, VALUE_NORMS_OFFSET, KEY_BYTES, VALUE_BYTES, TILE, WORDS, WORDS_LAYOUT,
                       NORMS_LAYOUT)
        blocks_w = _tile_blocks(block_table_ptr, table_row, lo + 3 * TILE, hi, TILE, BLOCK_SIZE, W_ROWS)
        blocks_n = _tile_blocks(block_table_ptr, table_row, lo + 3 * TILE, hi, TILE, BLOCK_SIZE, NORMS_LAYOUT)
        async_copy.wait_group(1)  # tiles 0 and 1
        gl.thread_barrier()
        _unpack(k_codes.index(0), k_bufs.index(0), KEY_LUT, WORDS_LAYOUT)
        _unpack(k_codes.index(1), k_bufs.index(1), KEY_LUT, WORDS_LAYOUT)
        _unpack_values(v_codes.index(0), v_norms.index(0), v_bufs.index(0), VALUE_LUT, WORDS_LAYOUT)
        fence_async_shared()
        gl.thread_barrier()
        scores = warpgroup_mma(query, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False)
        gl.thread_barrier()  # both warpgroups are done with tile 0's keys before tile 2's overwrite them
        probs = gl.zeros([ROWS, TILE], gl.float16, layout=P_OPERAND)
        # tile 0 peeled: the accumulator entering the loop comes from a wgmma (ptxas serializes every wgmma
        # when a non-wgmma instruction may define an in-flight accumulator). With one tile, its step scores
        # an empty tile 1.
        scores, acc, probs, running_max, running_sum, blocks_w, blocks_n = _prefix_step(
            0, lo, query, scores, out, probs, running_max, running_sum, blocks_w, blocks_n, cache_ptr,
            block_table_ptr, table_row, kv_head, hi, key_start, query_pos, sliding_window, softcap, k_bufs, v_bufs,
            k_codes, v_codes, k_norms, v_norms, s_zero, columns, NUM_KV_HEADS, BLOCK_SIZE, HEAD_PAGE_BYTES,
            VALUES_OFFSET, KEY_NORMS_OFFSET, VALUE_NORMS_OFFSET, KEY_BYTES, VALUE_BYTES, KEY_LUT, VALUE_LUT, TILE,
            WORDS, WORDS_LAYOUT, NORMS_LAYOUT, S_LAYOUT, O_LAYOUT, P_OPERAND, USE_SOFTCAP, USE_STARTS, USE_WINDOW,
            True, False)
        for j in range(1, num_tiles - 1):
            scores, acc, probs, running_max, running_sum, blocks_w, blocks_n = _prefix_step(
                j, lo, query, scores, acc, probs, running_max, running_sum, blocks_w, blocks_n, cache_ptr,
                block_table_ptr, table_row, kv_head, hi, key_start, query_pos, sliding_window, softcap, k_bufs,
                v_bufs, k_codes, v_codes, k_norms, v_norms, s_zero, columns, NUM_KV_HEADS, BLOCK_SIZE,
                HEAD_PAGE_BYTES, VALUES_OFFSET, KEY_NORMS_OFFSET, VALUE_NORMS_OFFSET, KEY_BYTES, VALUE_BYTES, KEY_LUT,
                VALUE_LUT, TILE, WORDS, WORDS_LAYOUT, NORMS_LAYOUT, S_LAYOUT, O_LAYOUT, P_OPERAND, USE_SOFTCAP,
                USE_STARTS, USE_WINDOW, False, False)
        if num_tiles > 1:
            scores, acc, probs, running_max, running_sum, blocks_w, blocks_n = _prefix_step(
                num_tiles - 1, lo, query, scores, acc, probs, running_max, running_sum, blocks_w, blocks_n,
                cache_ptr, block_table_ptr, table_row, kv_head, hi, key_start, query_pos, sliding_window, softcap,
                k_bufs, v_bufs, k_codes, v_codes, k_norms, v_norms, s_zero, columns, NUM_KV_HEADS, BLOCK_SIZE,
                HEAD_PAGE_BYTES, VALUES_OFFSET, KEY_NORMS_OFFSET, VALUE_NORMS_OFFSET, KEY_BYTES, VALUE_BYTES, KEY_LUT,
                VALUE_LUT, TILE, WORDS, WORDS_LAYOUT, NORMS_LAYOUT, S_LAYOUT, O_LAYOUT, P_OPERAND, USE_SOFTCAP,
                USE_STARTS, USE_WINDOW, False, True)
        out = acc
        async_copy.wait_group(0)

    # (b) the chunk itself, causal, from its fresh K/V (rotated, fp16), in the last split
    kv_rows = gl.arange(0, TILE, layout=gl.SliceLayout(1, ROWS_LAYOUT))
    chunk_lo = 0
    if USE_WINDOW:
        chunk_lo = gl.maximum(first_token - sliding_window + 1, 0) // TILE * TILE
    chunk_hi = gl.minimum(first_token + QUERY_TOKENS, query_len)
    if SPLIT:
        chunk_hi = gl.where(split == num_splits - 1, chunk_hi, chunk_lo)
    for start in range(chunk_lo, chunk_hi, TILE):
        positions = start + kv_rows
        valid = positions < chunk_hi
        kv_offsets = (query_start + positions) * stride_kv_token + kv_head * stride_kv_head
        keys = gl.load(keys_ptr + kv_offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        values = gl.load(values_ptr + kv_offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        gl.thread_barrier()  # every warpgroup is done with the buffers
        k_bufs.index(0).store(keys)
        v_bufs.index(0).store(values)
        fence_async_shared()
        gl.thread_barrier()
        scores = warpgroup_mma(query, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False)
        if USE_SOFTCAP:
            scores = _softcapped_log2(scores, softcap)
        cols = prefix_len + start + columns
        visible = (cols[None, :] <= query_pos[:, None]) & (cols < prefix_len + chunk_hi)[None, :]
        if USE_STARTS:
            visible = visible & (cols >= key_start)[None, :]
        if USE_WINDOW:
            visible = visible & (cols[None, :] > query_pos[:, None] - sliding_window)
        p, correction, running_max, running_sum = masked_online_softmax_step(
            gl.where(visible, scores, float("-inf")), running_max, running_sum)
        out = out * gl.convert_layout(correction, gl.SliceLayout(1, O_LAYOUT))[:, None]
        out = warpgroup_mma(gl.convert_layout(p.to(gl.float16), P_OPERAND), v_bufs.index(0), out)

    running_sum = gl.convert_layout(running_sum, gl.SliceLayout(1, ROWS_LAYOUT))
    running_max = gl.convert_layout(running_max, gl.SliceLayout(1, ROWS_LAYOUT))
    out = gl.convert_layout(out, ROWS_LAYOUT) / gl.maximum(running_sum, 1e-30)[:, None]
    lse = gl.where(running_sum > 0, running_max + gl.log2(gl.maximum(running_sum, 1e-30)), float("-inf"))
    if SPLIT:  # partials [tokens, q heads, splits, HEAD_DIM] and their log2-unit log-sum-exps
        partial_rows = ((query_start + token) * (NUM_KV_HEADS * GROUP) + kv_head * GROUP + member) * num_splits + split
        gl.store(out_ptr + partial_rows[:, None] * HEAD_DIM + dims[None, :], out, mask=row_valid[:, None])
        gl.store(lse_ptr + partial_rows, lse, mask=row_valid)
    else:
        gl.store(out_ptr + row_offsets[:, None] + dims[None, :], out, mask=row_valid[:, None])
        if RETURN_LSE:  # natural log; rows are (token, q head)
            lse_rows = (query_start + token) * (NUM_KV_HEADS * GROUP) + kv_head * GROUP + member
            gl.store(lse_ptr + lse_rows, lse * 0.6931471805599453, mask=row_valid)


def launch(rotated_query, rotated_keys, rotated_values, cache, block_table, seq_lens, query_start, key_starts,
           rotated_out, lse, codec, group: int, group_pad: int, rows: int, grid: tuple, scale: float,
           softcap: float | None, sliding_window: int | None, num_splits: int, return_lse: bool) -> None:
    """The kernel over `extend._launch`'s rotated operands and outputs (same grid and output layout as
    `extend._extend_kernel`; `rows`: query rows per program, 16 per warp)."""
    layout = codec.layout
    _extend_hopper_kernel[grid](
        rotated_query, rotated_keys, rotated_values, cache, block_table, seq_lens, query_start,
        seq_lens if key_starts is None else key_starts, rotated_out, lse,
        rotated_query.stride(0), rotated_query.stride(1), rotated_keys.stride(0), rotated_keys.stride(1),
        block_table.stride(0), float(scale), float(softcap or 0.0), int(sliding_window or 0), num_splits,
        NUM_KV_HEADS=layout.num_kv_heads, GROUP=group, GROUP_PAD=group_pad, BLOCK_SIZE=layout.block_size,
        HEAD_PAGE_BYTES=layout.head_page_bytes, VALUES_OFFSET=layout.values_offset,
        KEY_NORMS_OFFSET=layout.key_norms_offset, VALUE_NORMS_OFFSET=layout.value_norms_offset,
        HEAD_DIM=layout.head_dim, KEY_BYTES=layout.key_bytes, KEY_LUT=codec.key_lut_asm,
        VALUE_BYTES=layout.value_bytes, VALUE_LUT=codec.value_scaled_lut_asm, USE_SOFTCAP=softcap is not None,
        USE_WINDOW=sliding_window is not None, USE_STARTS=key_starts is not None, RETURN_LSE=return_lse,
        TILE=64 if layout.head_dim == 128 else 128, SPLIT=num_splits > 1, num_warps=rows // 16)
