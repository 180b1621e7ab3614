"""Extend (chunked prefill) attention: a chunk of new queries attends to (a) the compressed prefix in
the paged cache, unpacked tile by tile in registers, and (b) causally to the chunk's own fresh
full-precision K/V — what chunked prefill and prefix caching need. One program owns a block of query
tokens times all query heads of one GQA group, so each compressed tile is unpacked once for the group;
where such programs would not fill the device (short chunks), each takes a share of the prefix and
decode's reduction merges the shares.
Everything runs in the rotated space (q and the fresh K/V are rotated once); the output is un-rotated
once. Reference: `reference.extend_reference`. On Hopper, `extend_attention` runs the Gluon kernel of
`extend_hopper.py` instead where it serves (4-bit codes, d=64/128/256): the same grid, outputs and reference,
with the unpacking done by warps of its own beside the attention.

`cached_attention` is the same kernel for chunks already stored: every query reads every key, its own
chunk's included, from the cache, causally. A query's result then depends only on its position and
the cache, not on how the sequence was cut into chunks or batched with others: each query row meets
the same absolute tiles in the same order whatever the chunk (a tile it cannot see leaves its softmax
state bit for bit unchanged) in programs of a fixed shape. Decode steps run it too (one-token chunks),
which is what vLLM's batch-invariant mode asks. Reference: `reference.cached_attention_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import extend_hopper
from .codec import KernelCodec
from .decode import default_num_splits, merge_splits
from .launch import (FLOAT_DTYPES, SLICED_METADATA, check_attention_options, check_block_table, check_codec_device,
                     check_device_tensor, check_kv, head_dim_pad, lookup_constants, multiprocessor_count,
                     page_constants)
from .packed_tile import load_levels, load_norms
from .rotate import rotate
from .softmax import masked_softmax_step, tanh
from .visible_keys import extend_tile_range


WIDE_ROWS = 128  # query rows per program (tokens × heads of one group) where there are enough of them


def extend_launch(head_dim: int, wide: bool) -> dict:
    """Query rows per program, key tokens per tile, and Triton's warps/pipeline depth, from sweeps on an
    H200 (16K prefix, chunks 16–2048, d=64/128/256; benchmarks/results/extend-launch-h200.md). `wide`
    (programs of WIDE_ROWS rows about fill the SMs): two warpgroups share each unpacked tile, half the
    unpacking per query row; else 64 rows per program, which makes more programs."""
    if head_dim > 128:
        return dict(ROWS=WIDE_ROWS, TILE=64, num_warps=8, num_stages=2) if wide else \
            dict(ROWS=64, TILE=64, num_warps=8, num_stages=1)
    return dict(ROWS=WIDE_ROWS, TILE=128, num_warps=8, num_stages=2) if wide else \
        dict(ROWS=64, TILE=128, num_warps=4, num_stages=2)


def program_plan(layout, num_q_heads: int, batch: int, max_query_len: int, table_tokens: int, cached_chunk: bool,
                 multiprocessors: int, narrow: bool = False) -> tuple[dict, int, int]:
    """`extend_attention`'s programs for `batch` chunks of at most `max_query_len` tokens in block tables of
    `table_tokens` keys: (Triton launch options with TILE, query tokens per program, splits per query
    block). Few programs (short chunks) split each one's prefix, as decode does. A cached chunk
    (`cached_attention`) keeps one program shape and no splits whatever the batch: its results must not
    depend on it. `narrow`: programs of 64 rows whatever the batch (`narrow_programs`)."""
    group_pad = triton.next_power_of_2(num_q_heads // layout.num_kv_heads)
    blocks = triton.cdiv(max(max_query_len, 1), max(1, WIDE_ROWS // group_pad))
    wide = not narrow and not cached_chunk and batch * blocks * layout.num_kv_heads >= 0.9 * multiprocessors
    launch = extend_launch(layout.head_dim, wide)
    query_tokens = max(1, launch.pop("ROWS") // group_pad)
    if cached_chunk or wide:
        return launch, query_tokens, 1
    query_blocks = triton.cdiv(max(max_query_len, 1), query_tokens)
    return launch, query_tokens, default_num_splits(batch * query_blocks, layout.num_kv_heads, table_tokens,
                                                    launch["TILE"], multiprocessors)


def narrow_programs(layout, device: torch.device, cached_chunk: bool) -> bool:
    """`program_plan`'s `narrow` for `extend_attention`: where the Hopper kernel serves only programs of 64
    rows (`extend_hopper.narrow_only`: d=256), it gets those whatever the batch."""
    return extend_hopper.serves(layout, device, cached_chunk, 64) and extend_hopper.narrow_only(layout.head_dim)


def split_counts(head_dim: int, num_kv_heads: int, max_tokens: int, multiprocessors: int) -> list[int]:
    """Every `num_splits` `extend_attention` may pick by default for block tables of `max_tokens` keys
    (one reduction to compile ahead per count)."""
    tile = extend_launch(head_dim, False)["TILE"]
    most = default_num_splits(1, num_kv_heads, max_tokens, tile, multiprocessors)
    return [1 << i for i in range(most.bit_length())]


@triton.jit
def _row_mask(rows, dims, HEAD_DIM: tl.constexpr):
    """[rows, dims] mask of a tile of head vectors; without padding it is constant along a row, which
    lets Triton load and store rows as vectors."""
    if HEAD_DIM == dims.shape[0]:
        return tl.broadcast_to(rows[:, None], (rows.shape[0], dims.shape[0]))
    return rows[:, None] & (dims < HEAD_DIM)[None, :]


@triton.jit(do_not_specialize_on_alignment=SLICED_METADATA)
def _extend_kernel(
    query_ptr, keys_ptr, values_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, query_start_ptr, key_starts_ptr,
    key_centroids_ptr, value_centroids_ptr, out_ptr, lse_ptr,
    stride_query_token, stride_query_head, stride_kv_token, stride_kv_head, stride_table_seq,
    scale, softcap, sliding_window, num_splits,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, QUERY_TOKENS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_PAGE_BYTES: tl.constexpr, VALUES_OFFSET: tl.constexpr,
    KEY_NORMS_OFFSET: tl.constexpr, VALUE_NORMS_OFFSET: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    KEY_BITS: tl.constexpr, KEY_BYTES: tl.constexpr, KEY_LUT: tl.constexpr, VALUE_BITS: tl.constexpr,
    VALUE_BYTES: tl.constexpr, VALUE_LUT: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_STARTS: tl.constexpr, RETURN_LSE: tl.constexpr, CACHED_CHUNK: tl.constexpr, TILE: tl.constexpr,
    SPLIT: tl.constexpr,
):
    seq, query_block = tl.program_id(0), tl.program_id(1)
    kv_head, split = tl.program_id(2) // num_splits, tl.program_id(2) % num_splits
    query_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_start
    first_token = query_block * QUERY_TOKENS
    if first_token >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - query_len
    cached_len = seq_len if CACHED_CHUNK else prefix_len  # keys read from the cache
    key_start = 0
    if USE_STARTS:
        key_start = tl.load(key_starts_ptr + seq)

    ROWS: tl.constexpr = QUERY_TOKENS * GROUP_PAD
    rows = tl.arange(0, ROWS)
    token = first_token + rows // GROUP_PAD  # chunk-relative position of each row
    member = rows % GROUP_PAD
    row_valid = (token < query_len) & (member < GROUP)
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_offsets = (query_start + token) * stride_query_token + (kv_head * GROUP + member) * stride_query_head
    query = tl.load(query_ptr + row_offsets[:, None] + dims[None, :], mask=_row_mask(row_valid, dims, HEAD_DIM),
                    other=0.0)
    # scores come out in log2 units (the softmax's exp2) unless soft-capping needs them natural first
    query = (query * (scale if USE_SOFTCAP else scale * 1.4426950408889634)).to(tl.float16)
    query_pos = prefix_len + token

    running_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_PAD], dtype=tl.float32)

    # (a) the compressed prefix (and, for a cached chunk, the chunk)
    # with splits, this program's share of the prefix's tiles; the last split also attends to the chunk
    lo, hi = extend_tile_range(key_start, prefix_len + first_token, cached_len, sliding_window, split, num_splits,
                               TILE, USE_WINDOW, SPLIT)
    for start in range(lo, hi, TILE):
        positions = start + tl.arange(0, TILE)
        valid = positions < cached_len
        blocks = tl.load(block_table_ptr + seq * stride_table_seq + positions // BLOCK_SIZE, mask=valid, other=0)
        page_ptrs = cache_ptr + (blocks.to(tl.int64) * NUM_KV_HEADS + kv_head) * HEAD_PAGE_BYTES
        offsets = positions % BLOCK_SIZE
        keys = load_levels(page_ptrs + offsets * KEY_BYTES, valid, key_centroids_ptr, KEY_BITS, KEY_BYTES,
                           HEAD_DIM_PAD, KEY_LUT)
        # each key scaled by its norm in fp32 and rounded once: an fp16 norm's rounding, shared by the whole
        # key, moved scores enough to double the error against the reference (a value's only scales it)
        keys = (keys.to(tl.float32) * load_norms(page_ptrs + KEY_NORMS_OFFSET + offsets * 4, valid)[:, None]).to(
            tl.float16)
        scores = tl.dot(query, tl.trans(keys))
        if USE_SOFTCAP:
            scores = softcap * tanh(scores / softcap) * 1.4426950408889634
        visible = valid[None, :] & (positions[None, :] >= key_start)
        if CACHED_CHUNK:
            visible = visible & (positions[None, :] <= query_pos[:, None])
        if USE_WINDOW:
            visible = visible & (positions[None, :] > query_pos[:, None] - sliding_window)
        values = load_levels(page_ptrs + VALUES_OFFSET + offsets * VALUE_BYTES, valid, value_centroids_ptr,
                             VALUE_BITS, VALUE_BYTES, HEAD_DIM_PAD, VALUE_LUT)
        values = values * load_norms(page_ptrs + VALUE_NORMS_OFFSET + offsets * 4, valid).to(tl.float16)[:, None]
        running_max, running_sum, acc = masked_softmax_step(scores, visible, running_max, running_sum, acc, values,
                                                             tl.full([TILE], 1.0, tl.float32))

    # (b) the chunk itself, causal, from its fresh K/V
    if not CACHED_CHUNK:
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(first_token - sliding_window + 1, 0) // TILE * TILE
        hi = tl.where(split == num_splits - 1, tl.minimum(first_token + QUERY_TOKENS, query_len), lo)
        for start in range(lo, hi, TILE):
            positions = start + tl.arange(0, TILE)  # chunk-relative
            valid = positions < hi
            kv_offsets = (query_start + positions) * stride_kv_token + kv_head * stride_kv_head
            kv_mask = _row_mask(valid, dims, HEAD_DIM)
            keys = tl.load(keys_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(query, tl.trans(keys))
            if USE_SOFTCAP:
                scores = softcap * tanh(scores / softcap) * 1.4426950408889634
            visible = valid[None, :] & (positions[None, :] <= token[:, None])
            visible = visible & (prefix_len + positions[None, :] >= key_start)
            if USE_WINDOW:
                visible = visible & (positions[None, :] > token[:, None] - sliding_window)
            values = tl.load(values_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            ones = tl.full([TILE], 1.0, tl.float32)
            running_max, running_sum, acc = masked_softmax_step(scores, visible, running_max, running_sum, acc, values,
                                                                 ones)

    out = acc / tl.maximum(running_sum, 1e-30)[:, None]
    if SPLIT:  # partials [tokens, q heads, splits, HEAD_DIM_PAD] and their log2-unit log-sum-exps
        partial_rows = ((query_start + token) * (NUM_KV_HEADS * GROUP) + kv_head * GROUP + member) * num_splits + split
        tl.store(out_ptr + partial_rows[:, None] * HEAD_DIM_PAD + dims[None, :], out, mask=row_valid[:, None])
        lse = tl.where(running_sum > 0, running_max + tl.log2(tl.maximum(running_sum, 1e-30)), float("-inf"))
        tl.store(lse_ptr + partial_rows, lse, mask=row_valid)
    else:
        out_offsets = (query_start + token) * stride_query_token + (kv_head * GROUP + member) * stride_query_head
        tl.store(out_ptr + out_offsets[:, None] + dims[None, :], out, mask=_row_mask(row_valid, dims, HEAD_DIM))
        if RETURN_LSE:  # natural log, like torch.logsumexp; rows are (token, q head) of out
            lse = tl.where(running_sum > 0,
                           (running_max + tl.log2(tl.maximum(running_sum, 1e-30))) * 0.6931471805599453, float("-inf"))
            lse_rows = (query_start + token) * (NUM_KV_HEADS * GROUP) + kv_head * GROUP + member
            tl.store(lse_ptr + lse_rows, lse, mask=row_valid)


def extend_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_start: torch.Tensor,
                     seq_lens: torch.Tensor, cache: torch.Tensor, codec: KernelCodec, block_table: torch.Tensor,
                     scale: float, max_query_len: int, sliding_window: int | None = None,
                     softcap: float | None = None, key_starts: torch.Tensor | None = None,
                     return_lse: bool = False, out: torch.Tensor | None = None,
                     num_splits: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """query [tokens, num_q_heads, d] and the chunk's fresh keys/values [tokens, num_kv_heads, d];
    sequence i owns rows query_start[i]:query_start[i+1] (int32 [batch + 1]) and has seq_lens[i]
    tokens in total, the compressed prefix first. `max_query_len` bounds the chunk lengths (the grid).
    `key_starts`, `return_lse` and `out` as in `paged_decode_attention` (lse: [tokens, num_q_heads]); rows
    past query_start[batch] (padding) are no sequence's: the Hopper kernel leaves them as they were.
    `num_splits`: programs per query block and kv head, each over its share of the prefix, merged after
    (None: more than one only where the programs would not fill the device, `decode.default_num_splits`
    from the block table's width; fixed by the shapes alone, so a CUDA graph can capture the call)."""
    check_kv(keys, values, codec.layout, cache.device)
    if not isinstance(query, torch.Tensor) or query.shape[0] != keys.shape[0]:
        raise ValueError(f"query must be [{keys.shape[0]}, num_q_heads, {codec.layout.head_dim}] (a row per fresh "
                         f"key), got {tuple(getattr(query, 'shape', ()))}")
    return _launch(query, keys, values, query_start, seq_lens, cache, codec, block_table, scale, max_query_len,
                   sliding_window, softcap, key_starts, return_lse, out, num_splits)


def cached_attention(query: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor, cache: torch.Tensor,
                     codec: KernelCodec, block_table: torch.Tensor, scale: float, max_query_len: int,
                     sliding_window: int | None = None, softcap: float | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of query [tokens, num_q_heads, d] to the cache alone: sequence i's rows
    query_start[i]:query_start[i+1] are its last tokens of seq_lens[i], all already stored (decode steps
    and prefill chunks alike). Invariant to chunking and batching (module docstring)."""
    return _launch(query, None, None, query_start, seq_lens, cache, codec, block_table, scale, max_query_len,
                   sliding_window, softcap, None, False, out)


def _launch(query, keys, values, query_start, seq_lens, cache, codec, block_table, scale, max_query_len,
            sliding_window, softcap, key_starts, return_lse, out, num_splits=1):
    """Checks, then the kernel; keys/values None: the chunk is read from the cache (`cached_attention`)."""
    layout = codec.layout
    layout.check_cache(cache)
    check_codec_device(codec, cache)
    if not isinstance(query, torch.Tensor) or query.ndim != 3 or query.shape[-1] != layout.head_dim \
            or query.shape[1] % layout.num_kv_heads:
        raise ValueError(f"query must be [tokens, num_q_heads, {layout.head_dim}] with num_q_heads a multiple "
                         f"of {layout.num_kv_heads}, got {tuple(getattr(query, 'shape', ()))}")
    check_device_tensor(query, "query", FLOAT_DTYPES, None, cache.device)
    num_tokens = query.shape[0]
    batch = seq_lens.shape[0] if isinstance(seq_lens, torch.Tensor) else 0
    check_block_table(block_table, seq_lens, batch, cache.device)
    check_device_tensor(query_start, "query_start", (torch.int32,), (batch + 1,), cache.device)
    check_attention_options(sliding_window, softcap, key_starts, out, batch, query.shape, cache.device)

    num_q_heads = query.shape[1]
    group = num_q_heads // layout.num_kv_heads
    cached_chunk = keys is None
    launch, query_tokens, default_splits = program_plan(layout, num_q_heads, batch, max_query_len,
                                                        block_table.shape[1] * layout.block_size, cached_chunk,
                                                        multiprocessor_count(cache.device),
                                                        narrow_programs(layout, cache.device, cached_chunk))
    num_splits = default_splits if num_splits is None else num_splits
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    group_pad = triton.next_power_of_2(group)
    rows = query_tokens * group_pad
    hopper = extend_hopper.serves(layout, cache.device, cached_chunk, rows)
    rotated_query = rotate(query, codec, fixed_tile=cached_chunk)
    # a cached chunk has no fresh K/V: the kernel never reads these pointers (its part (b) is compiled out)
    rotated_keys = rotated_values = rotated_query
    if not cached_chunk:  # views of one [tokens, 2 · kv heads, D] buffer (the kernels read both at one stride)
        kv_heads = layout.num_kv_heads
        rotated_kv = torch.empty(keys.shape[0], 2 * kv_heads, layout.head_dim, dtype=torch.float16,
                                 device=keys.device)
        rotated_keys, rotated_values = rotated_kv[:, :kv_heads], rotated_kv[:, kv_heads:]
        if keys.dtype == values.dtype:  # one launch (H200, chunk 16, d=128 / 64: 0.049 → 0.047 / 0.038 → 0.036 ms)
            rotate(keys, codec, second=values, out=rotated_kv)
        else:
            rotate(keys, codec, out=rotated_keys)
            rotate(values, codec, out=rotated_values)
    pad = head_dim_pad(layout.head_dim)
    out = torch.empty_like(query) if out is None else out
    unrotated = hopper and extend_hopper.unrotates(codec, num_splits, out.dtype)  # by the kernel, into `out`
    if num_splits > 1:
        rotated_out = torch.empty(num_tokens, num_q_heads, num_splits, pad, device=cache.device, dtype=torch.float32)
        lse = torch.empty(num_tokens, num_q_heads, num_splits, device=cache.device, dtype=torch.float32)
    else:
        rotated_out = out if unrotated else torch.zeros(num_tokens, num_q_heads, layout.head_dim, device=cache.device,
                                                        dtype=torch.float32)
        lse = torch.full((num_tokens, num_q_heads), float("-inf"), device=cache.device) if return_lse else rotated_out
    grid = (batch, triton.cdiv(max(max_query_len, 1), query_tokens), layout.num_kv_heads * num_splits)
    if hopper:
        extend_hopper.launch(rotated_query, rotated_keys, rotated_values, cache, block_table, seq_lens, query_start,
                             key_starts, rotated_out, lse, codec, group, group_pad, rows, grid, scale, softcap,
                             sliding_window, num_splits, return_lse)
    else:
        _extend_kernel[grid](
            rotated_query, rotated_keys, rotated_values, cache, block_table, seq_lens, query_start,
            seq_lens if key_starts is None else key_starts, codec.key_centroids_fp16, codec.value_centroids_fp16,
            rotated_out, lse,
            rotated_query.stride(0), rotated_query.stride(1), rotated_keys.stride(0), rotated_keys.stride(1),
            block_table.stride(0), float(scale), float(softcap or 0.0), int(sliding_window or 0), num_splits,
            GROUP=group, GROUP_PAD=group_pad, QUERY_TOKENS=query_tokens, **page_constants(layout),
            **lookup_constants(codec, bits=(4,)),  # 3-bit byte permutes into wgmma tiles: Triton 3.6 fails to compile
            USE_SOFTCAP=softcap is not None, USE_WINDOW=sliding_window is not None, USE_STARTS=key_starts is not None,
            RETURN_LSE=return_lse, CACHED_CHUNK=cached_chunk, SPLIT=num_splits > 1, **launch,
        )
    if num_splits > 1:  # merged and un-rotated by decode's reduction
        partial_lse, lse = lse, (torch.empty(num_tokens, num_q_heads, device=cache.device, dtype=torch.float32)
                                 if return_lse else None)
        merge_splits(rotated_out, partial_lse, out, lse, codec)
    elif not unrotated:
        rotate(rotated_out, codec, inverse=True, out=out, fixed_tile=cached_chunk)
    return (out, lse) if return_lse else out
