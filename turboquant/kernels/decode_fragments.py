"""Decode attention's split kernel for 4-bit keys and values, with the codes looked up straight into
tensor-core fragments (Gluon, Triton's layout-explicit dialect).

`decode._decode_split_kernel` turns a tile of codes into fp16 levels in a blocked layout, and Triton
moves them through shared memory into the layout that `mma.sync` reads (stores, barriers, `ldmatrix`).
Here each lane loads exactly the codes whose levels its fragment registers hold, so levels go from the
byte permute (`lut_asm`) to the MMA in registers: no shared memory, no barrier, and fewer instructions
per token (sm_90 SASS, Triton 3.6, d=128: 496 per 16 tokens in one warp with window, softcap and key
starts compiled in, against 647 per 64 tokens in each of 4 warps of the Triton kernel's wgmma form; 31
against 40 warp instructions per token; `benchmarks/decode_sass.py` and `split_sass.py` count them).

Scores are an int8 MMA (m16n8k32): 4-bit keys are levels s · (L + 1/2) of a byte grid (`core.byte_grid`,
the key codebook of `KernelCodec`), looked up as int8 L (`lut_asm.SIGNED_BYTE_LOOKUP`: 9 integer
instructions per 8 codes, where fp16 pairs took 15; the byte permutes fill the integer ALU pipe), and the
query row is rounded to 16-bit integers (a 2^-15 step of its largest coordinate, finer than fp16) in two
int8 parts. H200 against fp16 key levels (`decode-ab-h200-int8-keys.md`): 0.97–0.98x the time at d=128,
0.95x at d=64, 0.92x at d=256. Values stay fp16: their weights, the probabilities, need its range.

That works because the order of the coordinates inside the MMA is free: a score sums over them, so
the query's columns are permuted once (`_key_byte_order`) to match the keys as each lane reads them,
a run of D/4 coordinates per lane; the output is computed transposed (O^T = V^T P^T, the group's heads
as the 8 columns) so a lane's value codes are a run of D/8 coordinates of two adjacent tokens, and its
rows are stored back to their coordinates (`value_coordinate`). The cache layout is `PagedLayout`'s.

A program is one warp over one split of one (sequence, kv head): its heads (GROUP ≤ 8) are the rows of
the score MMA, the softmax stays in the MMA's registers, and the sum is rescaled only in tiles where a
maximum rose. Each step issues the next tile's loads before computing on the current one (H200, b32 ×
32K: 0.637 → 0.595 ms). Only a split's first and last tiles can hold keys it must not see, so only they
are masked: the tiles between skip its comparisons and selects, which take slots of the integer ALU pipe
that the lookups keep busy (`benchmarks/decode_profile.py`). Its partial outputs and log-sum-exps are
`_decode_split_kernel`'s, for the same reduction.
"""

from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    from triton.runtime.jit import constexpr_function
except ImportError:  # a Triton without Gluon: `unsupported_reason` says so and decode uses its Triton kernel
    gluon = None

from .codec import KEY_BYTE_TABLE_ROW, VALUE_TABLE_ROW, KernelCodec
from .launch import page_constants, programmatic_launch
from .lut_asm import SIGNED_BYTE_LOOKUP
from .visible_keys import first_visible_key

HEAD_DIMS = (64, 128, 256)
MAX_GROUP = 8  # query heads per kv head: the columns of the transposed output MMA
TILE = 16  # tokens per step: one k-step of the value MMA, and a divisor of every page size
LOG2E = 1.4426950408889634


def unsupported_reason(codec: KernelCodec, group: int, device: torch.device) -> str | None:
    """Why the fragment kernel cannot serve this layer on `device` (None when it can)."""
    layout = codec.layout
    if gluon is None:
        return "this Triton has no Gluon"
    if device.type != "cuda" or not codec.value_pairs_lut_asm:
        return "it runs on CUDA devices with the byte-permute lookups (not in the Triton interpreter)"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "mma.sync needs compute capability 8.0 or newer"
    if (layout.key_bits, layout.value_bits) != (4, 4):
        return f"it reads 4-bit keys and values, not k{layout.key_bits}v{layout.value_bits}"
    if layout.head_dim not in HEAD_DIMS:
        return f"head_dim must be one of {HEAD_DIMS}, got {layout.head_dim}"
    if group > MAX_GROUP:
        return f"at most {MAX_GROUP} query heads per kv head, got {group}"
    if layout.block_size % TILE:
        return f"the page size must be a multiple of {TILE}, got {layout.block_size}"
    return None


# Splits of at most about this many keys, where the device holds fewer programs than that makes.
MAX_SPLIT_TOKENS = 4096


def default_num_splits(pairs: int, max_tokens: int, num_sms: int, head_dim: int) -> int:
    """About as many one-warp programs as the device holds at once, for one wave of them: 8 per SM at
    head_dim 128 and 256 (161 and 255 registers a thread: 12 and 8 warps per SM), 16 at 64 (126: 16
    warps); more where a split of the longest sequence the block table holds would exceed
    MAX_SPLIT_TOKENS keys; a power of two, no split shorter than 128 tokens. H200, d=128, fixed split
    counts (`decode-splits-h200-fine.md`): one wave of longer programs beats a second, partial wave of
    shorter ones (b8 × 16K 0.098 ms at 16 splits against 0.107 at 32; b16 × 6K 0.079 at 8 against 0.089 at
    16; b32 × 4K 0.099 at 4 against 0.106 at 8), but splits of 8K+ keys lose (b64 × 32K 1.14 ms at 4
    splits, 1.09 at 8). Every sequence takes all the splits (down to `min_split_tokens`): a variant in
    which each sequence took fewer splits of a larger grid measured slower wherever the grid's trailing
    programs were left empty (H200; not kept). Re-swept once the query was read in whole sectors
    (`decode-splits-h200-sectors.md`, `-long.md`, `-long2.md`): one wave still wins at batch 8 (16K: 0.080
    ms at 16 splits, 0.084 at 32), and in block tables as wide as the context b16-b64 at 16K-32K ran 2-5%
    faster in splits of about 2048 keys (b64 × 16K 0.480 ms at 8 splits against 0.502-0.503 at 4, b32 ×
    32K 0.477-0.478 at 16 against 0.497-0.500 at 8). Kept at 4096: the count follows the table's width,
    and in vLLM's, as wide as the model's maximum length, every sequence would take twice the splits (b8 ×
    16K 0.131 ms at 64 against 0.111 at 32, `decode-splits-h200.md`)."""
    per_sm = 16 if head_dim <= 64 else 8
    wanted = max(1, per_sm * num_sms // max(1, pairs), max_tokens // MAX_SPLIT_TOKENS)
    longest = max(1, max_tokens // 128)
    return int(min(1 << (wanted.bit_length() - 1), 1 << (longest.bit_length() - 1), 128))


def min_split_tokens(pairs: int) -> int:
    """The shortest split the kernel cuts from a sequence's length. The split count is fixed by the block
    table's width (a CUDA graph replays it), which in vLLM is the model's maximum length, so a short
    sequence would otherwise be cut into many splits of a few tiles each. Fastest per H200 sweep
    (`decode-splits-h200.md`): 128 tokens at batch 8 × 1K, 256 at batch 32 and 64 × 1K (8 kv heads)."""
    return 128 if pairs < 128 else 256


if gluon is not None:
    _TILE = gl.constexpr(TILE)
    _SIGNED_BYTE_LOOKUP = gl.constexpr(SIGNED_BYTE_LOOKUP)
    _LOG2E = gl.constexpr(LOG2E)
    _VALUE_TABLE_ROW = gl.constexpr(VALUE_TABLE_ROW)
    _KEY_BYTE_TABLE_ROW = gl.constexpr(KEY_BYTE_TABLE_ROW)

    @constexpr_function
    def _mma_layout():
        """One warp's mma.sync m16n8k16 accumulator: both products' layout."""
        return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])

    @constexpr_function
    def _query_layout(D):
        """[16 rows, D coordinates]: lane 4g + t holds rows g and g + 8, coordinates t·D/4 .. t·D/4 + D/4 − 1,
        four adjacent ones per register group (one 16-byte load): the int8 A operand's share of that lane
        once its columns are reordered (`_key_byte_order`), so the query is read in whole sectors."""
        reg = [[0, 1], [0, 2], [8, 0]] + [[0, 4 << i] for i in range((D // 16).bit_length() - 1)]
        return gl.DistributedLinearLayout(reg, [[0, D // 4], [0, D // 2], [1, 0], [2, 0], [4, 0]], [], [], [16, D])

    @gluon.jit
    def _key_byte_order(query):
        """[16, D] coordinates → the int8 MMA's columns in the order a lane reads its key bytes
        (`_lookup_bytes`): column 32i + 16h + 4t + e holds coordinate t·D/4 + 8i + 4h + e."""
        D: gl.constexpr = query.shape[1]
        query = gl.permute(gl.reshape(query, [16, 4, D // 32, 2, 4]), (0, 2, 3, 1, 4))
        return gl.reshape(query, [16, D])

    @constexpr_function
    def _key_codes_layout(D):
        """[4·TILE rows r = t + 4n, D/32 words]: lane 4g + t holds words of token n = g + 8i, chunk t."""
        reg = [[0, 1 << i] for i in range((D // 32).bit_length() - 1)] + [[32, 0]]
        return gl.DistributedLinearLayout(reg, [[1, 0], [2, 0], [4, 0], [8, 0], [16, 0]], [], [], [4 * TILE, D // 32])

    @constexpr_function
    def _value_codes_layout(D):
        """[8·TILE rows r = e + 2g + 16t + 64h, D/64 words]: lane 4g + t holds chunk g of tokens 2t + e + 8h."""
        reg = [[0, 1 << i] for i in range((D // 64).bit_length() - 1)] + [[1, 0], [64, 0]]
        return gl.DistributedLinearLayout(reg, [[16, 0], [32, 0], [2, 0], [4, 0], [8, 0]], [], [], [8 * TILE, D // 64])

    @constexpr_function
    def _value_pairs_layout(D):
        """`_value_codes_layout` with the token-pair axis split off, as a layout of its own: as a slice of the
        split's parent, a join would not put its new axis in the fastest register (`_lookup_pairs` needs it)."""
        reg = [[0, 1 << i] for i in range((D // 64).bit_length() - 1)] + [[32, 0]]
        return gl.DistributedLinearLayout(reg, [[8, 0], [16, 0], [1, 0], [2, 0], [4, 0]], [], [], [4 * TILE, D // 64])

    @gluon.jit
    def _lookup_pairs(words, tables, LUT: gl.constexpr):
        """Words of eight 4-bit indices → four [.., 2] fp16 tensors, pair k = levels 2k, 2k + 1 (one register)."""
        return gl.inline_asm_elementwise(
            LUT, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
            [gl.join(words, words), gl.join(tables[0], tables[0]), gl.join(tables[1], tables[1]),
             gl.join(tables[2], tables[2]), gl.join(tables[3], tables[3])],
            dtype=(gl.float16,) * 4, is_pure=True, pack=2)

    @gluon.jit
    def _lookup_bytes(words, tables):
        """Words of eight 4-bit codes → two [.., 2, 2] int8 tensors of grid levels (`lut_asm.SIGNED_BYTE_LOOKUP`):
        codes 2a + b and 4 + 2a + b at [.., a, b] (a register each)."""
        words = gl.join(gl.join(words, words), gl.join(words, words))
        low = gl.join(gl.join(tables[0], tables[0]), gl.join(tables[0], tables[0]))
        high = gl.join(gl.join(tables[1], tables[1]), gl.join(tables[1], tables[1]))
        return gl.inline_asm_elementwise(_SIGNED_BYTE_LOOKUP, "=r,=r,r,r,r,r,r,r,r,r,r,r,r,r", [words, low, high],
                                         dtype=(gl.int8, gl.int8), is_pure=True, pack=4)

    @gluon.jit
    def _join_pairs(p0, p1, p2, p3):
        """Four [.., 2] level pairs → [.., 2, 2, 2]: level 2k + e of a word at [.., e, k % 2, k // 2]."""
        return gl.join(gl.join(p0, p1), gl.join(p2, p3))

    @gluon.jit
    def _token_pairs(words):
        """[2R, W] words, rows alternating between tokens 2i and 2i + 1 → the two [R, W] halves."""
        return gl.split(gl.permute(gl.reshape(words, [words.shape[0] // 2, 2, words.shape[1]]), (0, 2, 1)))

    @gluon.jit
    def _group_rows(scores):
        """[16, T] scores in the MMA layout → rows 0..7 (the group's heads; a split of registers)."""
        rows, _ = gl.split(gl.permute(gl.reshape(scores, [2, 8, scores.shape[1]]), (1, 2, 0)))
        return rows

    @gluon.jit
    def _lane_tables(tables_ptr, lanes, TABLE_ROW: gl.constexpr):
        """Four table words from rows TABLE_ROW.. of `KernelCodec.lut_lane_tables`, at `lanes` (each lane's
        own copy: a value equal in every lane would live in a uniform register, to be copied into a
        register before every byte permute)."""
        ptrs = tables_ptr + TABLE_ROW * 32 + lanes
        return gl.load(ptrs), gl.load(ptrs + 32), gl.load(ptrs + 64), gl.load(ptrs + 96)

    @gluon.jit
    def _lane_byte_tables(tables_ptr, lanes):
        """The two table words of the key's signed byte lookup (`KernelCodec.lut_lane_tables`)."""
        ptrs = tables_ptr + _KEY_BYTE_TABLE_ROW * 32 + lanes
        return gl.load(ptrs), gl.load(ptrs + 32)

    @gluon.jit
    def _tile_block(table_ptr, start, hi, BLOCK_SIZE: gl.constexpr):
        """The page of the tile from `start` (0 at or past `hi`)."""
        return gl.load(table_ptr + start // BLOCK_SIZE, mask=start < hi, other=0)

    @gluon.jit
    def _load_tile(cache_ptr, block, kv_head, start, hi, key_token, key_chunk, key_words, tokens, value_token,
                   value_chunk, value_words, NUM_KV_HEADS: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                   HEAD_PAGE_BYTES: gl.constexpr, VALUES_OFFSET: gl.constexpr, KEY_NORMS_OFFSET: gl.constexpr,
                   VALUE_NORMS_OFFSET: gl.constexpr, KEY_BYTES: gl.constexpr, VALUE_BYTES: gl.constexpr,
                   BEFORE_HI: gl.constexpr = False):
        """The tile of tokens start .. start + TILE − 1 on page `block` (`_tile_block`; each lane's share: key
        words, key and value norms, value words), whole: a tile lies in one page, so its tokens outside the
        visible keys are read too (any bytes; `_attend_tile` masks them). A tile at or past `hi` reads no
        memory. BEFORE_HI: the caller knows it starts before `hi`, and the loads take no mask: a masked load's
        registers are zeroed first, 16 of a loop step's 538 instructions at d=128 (9 of 363 at d=64, 23 of 885
        at d=256). H200, the same outputs bit for bit in 0.951-0.973x the time (`decode-ab-h200-unmasked.md`)."""
        page = cache_ptr + (block.to(gl.int64) * NUM_KV_HEADS + kv_head) * HEAD_PAGE_BYTES
        offset = start % BLOCK_SIZE
        key_ptrs = (page + (offset + key_token) * KEY_BYTES + key_chunk).to(gl.pointer_type(gl.int32))[:, None] \
            + key_words[None, :]
        norms = page + (offset + tokens) * 4
        key_norm_ptrs = (norms + KEY_NORMS_OFFSET).to(gl.pointer_type(gl.float32))
        value_norm_ptrs = (norms + VALUE_NORMS_OFFSET).to(gl.pointer_type(gl.float32))
        value_ptrs = (page + VALUES_OFFSET + (offset + value_token) * VALUE_BYTES + value_chunk) \
            .to(gl.pointer_type(gl.int32))[:, None] + value_words[None, :]
        if BEFORE_HI:
            key_codes = gl.load(key_ptrs)
            key_norms = gl.load(key_norm_ptrs)
            value_norms = gl.load(value_norm_ptrs)
            value_codes = gl.load(value_ptrs)
        else:
            present = start < hi
            key_codes = gl.load(key_ptrs, mask=present, other=0)
            key_norms = gl.load(key_norm_ptrs, mask=present, other=0.0)
            value_norms = gl.load(value_norm_ptrs, mask=present, other=0.0)
            value_codes = gl.load(value_ptrs, mask=present, other=0)
        return key_codes, key_norms, value_norms, value_codes

    @gluon.jit
    def _tanh(x):
        return 1 - 2 / (gl.exp(2 * x) + 1)

    @gluon.jit
    def _attend_tile(tile, start, first, hi, query_high, query_low, score_base, row_scale, key_tables, value_tables,
                     acc, running_max, running_sum, softcap, VALUE_LUT: gl.constexpr, USE_SOFTCAP: gl.constexpr,
                     MASKED: gl.constexpr):
        """One step of the online softmax over the tile of tokens start .. start + TILE − 1 (`_load_tile`):
        the updated (acc, running_max, running_sum). MASKED: some of its tokens lie outside the visible keys
        [first, hi), and their scores and value norms are masked (only a split's first and last tiles)."""
        D: gl.constexpr = acc.shape[0]
        mma: gl.constexpr = _mma_layout()
        a_layout: gl.constexpr = gl.DotOperandLayout(0, mma, 2)
        b_layout: gl.constexpr = gl.DotOperandLayout(1, mma, 2)
        b_bytes: gl.constexpr = gl.DotOperandLayout(1, mma, 4)
        pairs_layout: gl.constexpr = _value_pairs_layout(D)
        heads_layout: gl.constexpr = gl.SliceLayout(0, mma)
        key_codes, key_norms, value_norms, value_codes = tile

        # keys, as the int8 MMA's B operand [D, _TILE]: lane 4g + t holds chunk t of tokens g and g + 8
        low, high = _lookup_bytes(key_codes, key_tables)  # [4T, W, a, b] each
        levels = gl.reshape(gl.join(low, high), [_TILE, 4, D // 32, 2, 2, 2])  # n, t, i, a, b, h
        levels = gl.permute(levels, (2, 5, 1, 3, 4, 0))  # column 32i + 16h + 4t + 2a + b, token n
        keys = gl.convert_layout(gl.reshape(levels, [D, _TILE]), b_bytes, assert_trivial=True)
        high_part = _group_rows(mma_v2(query_high, keys, gl.zeros([16, _TILE], gl.int32, layout=mma)))
        low_part = _group_rows(mma_v2(query_low, keys, score_base))
        scores = (high_part * 256 + low_part).to(gl.float32) * (row_scale * key_norms[None, :])
        if USE_SOFTCAP:  # softcap · tanh(s / softcap) on natural-unit scores, back in log2 units
            scores = (softcap * _LOG2E) * _tanh(scores * (1 / (_LOG2E * softcap)))
        if MASKED:  # a masked token's bytes are any: its score and its value norm (NaN × 0 is NaN) are set
            tokens = start + gl.arange(0, _TILE, layout=key_norms.type.layout)
            visible = (tokens < hi) & (tokens >= first)
            scores = gl.where(visible[None, :], scores, float("-inf"))
            value_norms = gl.where(visible, value_norms, 0.0)
        new_max = gl.maximum(running_max, gl.max(scores, axis=1))
        grew = gl.max(new_max - running_max, axis=0) > 0  # NaN (−inf − −inf) is not growth
        correction = gl.exp2(running_max - new_max)
        probs = gl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + gl.sum(probs, axis=1)
        running_max = new_max
        if grew:  # rescale the sum only when some head's maximum rose (after the first tiles, rarely)
            acc = acc * gl.convert_layout(correction, heads_layout)[None, :]
        probs = gl.permute((probs * value_norms[None, :]).to(gl.float16), (1, 0))
        probs = gl.convert_layout(probs, b_layout, assert_trivial=True)

        # values, as the A operand [D, _TILE] of O^T = V^T P^T: lane 4g + t holds chunk g of tokens 2t, 2t + 1,
        # 2t + 8, 2t + 9; a register pairs one coordinate of two tokens, so their indices are interleaved
        # nibble by nibble before the lookup
        token_a, token_b = _token_pairs(value_codes.to(gl.uint32, bitcast=True))
        token_a = gl.convert_layout(token_a, pairs_layout, assert_trivial=True)
        token_b = gl.convert_layout(token_b, pairs_layout, assert_trivial=True)
        even = (token_a & 0x0F0F0F0F) | ((token_b << 4) & 0xF0F0F0F0)  # nibbles a0 b0 a2 b2 ...
        odd = ((token_a >> 4) & 0x0F0F0F0F) | (token_b & 0xF0F0F0F0)  # a1 b1 a3 b3 ...
        levels = gl.join(_join_pairs(*_lookup_pairs(even, value_tables, VALUE_LUT)),
                         _join_pairs(*_lookup_pairs(odd, value_tables, VALUE_LUT)))  # [4T, W, e, p % 2, p // 2, s]
        levels = gl.reshape(levels, [2, 4, 8, D // 64, 2, 2, 2, 2])  # h t g w e p%2 p//2 s
        levels = gl.permute(levels, (3, 6, 5, 7, 2, 0, 1, 4))  # rows w p//2 p%2 s g, columns h t e
        values = gl.convert_layout(gl.reshape(levels, [D, _TILE]), a_layout, assert_trivial=True)
        acc = mma_v2(values, probs, acc)
        return acc, running_max, running_sum

    # a variant per split count only, as CUDA graphs compiled them
    @gluon.jit(do_not_specialize=["min_split", "min_span"])
    def _fragment_split_kernel(
        query_ptr, cache_ptr, tables_ptr, block_table_ptr, seq_lens_ptr, key_starts_ptr, partial_out_ptr,
        partial_lse_ptr, stride_query_seq, stride_query_head, stride_table_seq, scale, softcap, sliding_window,
        min_split, min_span, NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, NUM_SPLITS: gl.constexpr,
        BLOCK_SIZE: gl.constexpr,
        HEAD_PAGE_BYTES: gl.constexpr, VALUES_OFFSET: gl.constexpr, KEY_NORMS_OFFSET: gl.constexpr,
        VALUE_NORMS_OFFSET: gl.constexpr, HEAD_DIM: gl.constexpr, KEY_BYTES: gl.constexpr, VALUE_BYTES: gl.constexpr,
        VALUE_LUT: gl.constexpr, USE_SOFTCAP: gl.constexpr, USE_WINDOW: gl.constexpr,
        USE_STARTS: gl.constexpr, AFTER_SPLIT: gl.constexpr, REDUCTION_NEXT: gl.constexpr,
        KEY_LEVEL_SCALE: gl.constexpr,
    ):
        D: gl.constexpr = HEAD_DIM
        mma: gl.constexpr = _mma_layout()
        a_bytes: gl.constexpr = gl.DotOperandLayout(0, mma, 4)
        keys_layout: gl.constexpr = _key_codes_layout(D)
        values_layout: gl.constexpr = _value_codes_layout(D)
        pairs_layout: gl.constexpr = _value_pairs_layout(D)
        heads_layout: gl.constexpr = gl.SliceLayout(0, mma)  # columns of the transposed output

        seq = gl.program_id(0)
        kv_head = gl.program_id(1)
        split = gl.program_id(2)
        # Launched programmatically while the Triton split kernel runs (it writes other partials): the first
        # program waits for it, so this grid ends after that one and the reduction launched next reads both.
        if REDUCTION_NEXT:  # the reduction, launched programmatically next, waits for this grid to end
            gdc_launch_dependents()
        if AFTER_SPLIT:
            if (seq == 0) & (kv_head == 0) & (split == 0):
                gdc_wait()
        seq_len = gl.load(seq_lens_ptr + seq)
        first = first_visible_key(seq_len, seq, key_starts_ptr, sliding_window, USE_WINDOW, USE_STARTS)
        if seq_len - first < min_span:  # the Triton split kernel's sequence
            return
        # tiles start at multiples of _TILE, so each lies in one page; keys before `first` are masked
        aligned = first // _TILE * _TILE
        per_split = gl.maximum(gl.cdiv(gl.cdiv(seq_len - aligned, NUM_SPLITS), _TILE), min_split // _TILE) * _TILE
        lo = aligned + split * per_split
        hi = gl.minimum(lo + per_split, seq_len)
        if first >= seq_len:  # no visible key
            hi = lo
        if lo >= hi:  # past the sequence's keys: an empty partial, which the reduction reads as its −inf alone
            empty = gl.arange(0, 8, layout=gl.BlockedLayout([1], [32], [1], [0]))
            partial = (seq * NUM_KV_HEADS * GROUP + kv_head * GROUP + empty) * NUM_SPLITS + split
            gl.store(partial_lse_ptr + partial, gl.full([8], float("-inf"), gl.float32, layout=empty.type.layout),
                     mask=empty < GROUP)
            return

        # Query rows are the group's heads; rows past it hold the next heads' queries, discarded (rows of
        # zeros or of copies would be copied into every MMA's operand registers). Its columns are put in
        # the order of the key levels in a lane's fragment (`_key_byte_order`) after a load in whole 16-byte runs:
        # read straight into the fragment's order, scattered 4-byte reads took 7-10 us of each program's
        # start when a wave's programs all read at once (H200, b8 x 16K).
        query_layout: gl.constexpr = _query_layout(D)
        m = gl.arange(0, 16, layout=gl.SliceLayout(1, query_layout))
        coordinates = gl.arange(0, D, layout=gl.SliceLayout(0, query_layout))
        heads_in_rows = (kv_head * GROUP + m) % (NUM_KV_HEADS * GROUP)
        query = gl.load(query_ptr + seq * stride_query_seq + heads_in_rows[:, None] * stride_query_head
                        + coordinates[None, :])
        query = query * (scale * _LOG2E)  # scores in log2 units
        # Each row as 16-bit integers (a 2^-15 step of its largest coordinate: finer than fp16), in two int8
        # parts for the int8 MMA: q = step · (256 · high + low). The keys are levels s · (L + 1/2)
        # (`core.byte_grid`): a score is step · s · (Σ q·L + Σ q / 2), the second term the MMA's
        # initial value (rounded down by half a unit at most).
        peak = gl.maximum(gl.max(gl.abs(query), axis=1), 1e-30)
        whole = gl.floor(query * (32512.0 / peak)[:, None] + 0.5).to(gl.int32)  # |whole| <= 127 * 256
        high = (whole + 128) >> 8
        low = whole - high * 256
        query_high = gl.convert_layout(_key_byte_order(high.to(gl.int8)), a_bytes, assert_trivial=True)
        query_low = gl.convert_layout(_key_byte_order(low.to(gl.int8)), a_bytes, assert_trivial=True)
        rows_layout: gl.constexpr = gl.SliceLayout(1, mma)
        score_base = gl.convert_layout(gl.sum(whole, axis=1) >> 1, rows_layout)[:, None] \
            + gl.zeros([16, _TILE], gl.int32, layout=mma)
        row_scale = _group_rows(gl.convert_layout(peak * (KEY_LEVEL_SCALE / 32512.0), rows_layout)[:, None]
                                + gl.zeros([16, _TILE], gl.float32, layout=mma))

        acc = gl.zeros([D, 8], gl.float32, layout=mma)  # the group's output, transposed
        group_scores = _group_rows(gl.full([16, _TILE], float("-inf"), gl.float32, layout=mma))
        running_max = gl.max(group_scores, axis=1)
        running_sum = gl.zeros_like(running_max)
        tokens = gl.arange(0, _TILE, layout=gl.SliceLayout(0, group_scores.type.layout))

        key_rows = gl.arange(0, 4 * _TILE, layout=gl.SliceLayout(1, keys_layout))
        key_words = gl.arange(0, D // 32, layout=gl.SliceLayout(0, keys_layout))
        key_token = key_rows >> 2
        key_chunk = (key_rows & 3) * (D // 8)  # D/4 coordinates of 4 bits
        value_rows = gl.arange(0, 8 * _TILE, layout=gl.SliceLayout(1, values_layout))
        value_words = gl.arange(0, D // 64, layout=gl.SliceLayout(0, values_layout))
        value_token = ((value_rows >> 6) & 1) * 8 + ((value_rows >> 4) & 3) * 2 + (value_rows & 1)
        value_chunk = ((value_rows >> 1) & 7) * (D // 16)  # D/8 coordinates of 4 bits
        key_lanes = (key_rows & 31)[:, None] + gl.zeros([4 * _TILE, D // 32], gl.int32, layout=keys_layout)
        key_tables = _lane_byte_tables(tables_ptr, key_lanes)
        value_lanes = ((value_rows >> 1) & 31)[:, None] + gl.zeros([8 * _TILE, D // 64], gl.int32, layout=values_layout)
        value_lanes = gl.convert_layout(_token_pairs(value_lanes)[0], pairs_layout, assert_trivial=True)
        value_tables = _lane_tables(tables_ptr, value_lanes, _VALUE_TABLE_ROW)

        table_ptr = block_table_ptr + seq * stride_table_seq
        # each step issues the next tile's loads before it computes on the tile loaded the step before, and
        # reads the page of the tile after that (read right before the codes it locates, it would hold them up)
        tile = _load_tile(cache_ptr, _tile_block(table_ptr, lo, hi, BLOCK_SIZE), kv_head, lo, hi, key_token,
                          key_chunk, key_words, tokens, value_token, value_chunk, value_words, NUM_KV_HEADS,
                          BLOCK_SIZE, HEAD_PAGE_BYTES, VALUES_OFFSET, KEY_NORMS_OFFSET, VALUE_NORMS_OFFSET, KEY_BYTES,
                          VALUE_BYTES)
        block = _tile_block(table_ptr, lo + _TILE, hi, BLOCK_SIZE)
        following = _load_tile(cache_ptr, block, kv_head, lo + _TILE, hi, key_token, key_chunk, key_words, tokens,
                               value_token, value_chunk, value_words, NUM_KV_HEADS, BLOCK_SIZE, HEAD_PAGE_BYTES,
                               VALUES_OFFSET, KEY_NORMS_OFFSET, VALUE_NORMS_OFFSET, KEY_BYTES, VALUE_BYTES)
        block = _tile_block(table_ptr, lo + 2 * _TILE, hi, BLOCK_SIZE)
        # keys before `first` lie in the split's first tile only (tiles start at `aligned`), keys from `hi` in
        # its last: the tiles between are attended unmasked
        acc, running_max, running_sum = _attend_tile(tile, lo, first, hi, query_high, query_low, score_base, row_scale,
                                                     key_tables, value_tables, acc, running_max, running_sum, softcap,
                                                     VALUE_LUT, USE_SOFTCAP, True)
        tile = following
        last = (hi - 1) // _TILE * _TILE
        # start + _TILE <= last < hi: unmasked loads. Two tiles per step, so that no tile is copied from one
        # register set to another, measured slower (`decode-ab-h200-unmasked.md`).
        for start in range(lo + _TILE, last, _TILE):
            following = _load_tile(cache_ptr, block, kv_head, start + _TILE, hi, key_token, key_chunk, key_words,
                                   tokens, value_token, value_chunk, value_words, NUM_KV_HEADS, BLOCK_SIZE,
                                   HEAD_PAGE_BYTES, VALUES_OFFSET, KEY_NORMS_OFFSET, VALUE_NORMS_OFFSET, KEY_BYTES,
                                   VALUE_BYTES, True)
            block = _tile_block(table_ptr, start + 2 * _TILE, hi, BLOCK_SIZE)
            acc, running_max, running_sum = _attend_tile(tile, start, first, hi, query_high, query_low, score_base,
                                                         row_scale, key_tables, value_tables, acc, running_max,
                                                         running_sum, softcap, VALUE_LUT, USE_SOFTCAP, False)
            tile = following
        if last > lo:
            acc, running_max, running_sum = _attend_tile(tile, last, first, hi, query_high, query_low, score_base,
                                                         row_scale, key_tables, value_tables, acc, running_max,
                                                         running_sum, softcap, VALUE_LUT, USE_SOFTCAP, True)

        heads = gl.arange(0, 8, layout=heads_layout)
        d = gl.arange(0, D, layout=gl.SliceLayout(1, mma))
        value_coordinate = (d % 8) * (D // 8) + (d >> 6) * 8 + ((d >> 5) & 1) * 4 + ((d >> 4) & 1) * 2 + ((d >> 3) & 1)
        partial = (seq * NUM_KV_HEADS * GROUP + kv_head * GROUP + heads) * NUM_SPLITS + split
        out = acc / gl.convert_layout(gl.maximum(running_sum, 1e-30), heads_layout)[None, :]
        gl.store(partial_out_ptr + partial[None, :] * D + value_coordinate[:, None], out, mask=(heads < GROUP)[None, :])
        lse = gl.where(running_sum > 0, running_max + gl.log2(gl.maximum(running_sum, 1e-30)), float("-inf"))
        gl.store(partial_lse_ptr + partial, gl.convert_layout(lse, heads_layout), mask=heads < GROUP)


def launch_split(rotated_query: torch.Tensor, cache: torch.Tensor, codec: KernelCodec, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, key_starts: torch.Tensor | None, partial_out: torch.Tensor,
                 partial_lse: torch.Tensor, scale: float, softcap: float | None, sliding_window: int | None,
                 min_span: int = 0, after_split: bool = False, reduction_next: bool = False) -> None:
    """Fill `partial_out` [batch, Hq, splits, D] fp32 and `partial_lse` [batch, Hq, splits] as
    `decode._decode_split_kernel` does (the caller checked `unsupported_reason`), for the sequences with at
    least `min_span` visible keys. `after_split`: launched programmatically after the Triton split kernel
    (`launch_triton_split(..., readers_next=True)`), which serves the others. `reduction_next`: the
    reduction is launched programmatically next (`reduce_splits(..., chained=True)`)."""
    layout = codec.layout
    batch, num_q_heads, num_splits = partial_lse.shape
    constants = page_constants(layout)
    _fragment_split_kernel[(batch, layout.num_kv_heads, num_splits)](
        rotated_query, cache, codec.lut_lane_tables, block_table, seq_lens,
        seq_lens if key_starts is None else key_starts, partial_out, partial_lse,
        rotated_query.stride(0), rotated_query.stride(1), block_table.stride(0), float(scale), float(softcap or 1.0),
        int(sliding_window or 0), min_split_tokens(batch * layout.num_kv_heads), int(min_span),
        NUM_KV_HEADS=layout.num_kv_heads,
        GROUP=num_q_heads // layout.num_kv_heads,
        NUM_SPLITS=num_splits, BLOCK_SIZE=layout.block_size, HEAD_PAGE_BYTES=constants["HEAD_PAGE_BYTES"],
        VALUES_OFFSET=constants["VALUES_OFFSET"], KEY_NORMS_OFFSET=constants["KEY_NORMS_OFFSET"],
        VALUE_NORMS_OFFSET=constants["VALUE_NORMS_OFFSET"], HEAD_DIM=layout.head_dim, KEY_BYTES=constants["KEY_BYTES"],
        VALUE_BYTES=constants["VALUE_BYTES"], KEY_LEVEL_SCALE=codec.key_byte_scale,
        VALUE_LUT=codec.value_pairs_lut_asm,
        USE_SOFTCAP=softcap is not None, USE_WINDOW=sliding_window is not None, USE_STARTS=key_starts is not None,
        AFTER_SPLIT=after_split, REDUCTION_NEXT=reduction_next, num_warps=1, **programmatic_launch(after_split),
    )
