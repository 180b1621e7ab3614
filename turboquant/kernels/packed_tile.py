"""Triton helpers that move a tile of b-bit indices between registers and the packed byte layout
of `core/packing.py` (little-endian bit stream: `COORDS` indices share `GROUP_BYTES` bytes).

Rows are addressed by pointer, one per token, so the same helpers serve paged and contiguous caches.
Reads go by 32-bit words: a word holds 8 indices at 4 bits, 16 at 2 and 4 at 8; at 3 bits, three words
hold four groups of 8 indices (3 bytes each), which are cut out of them by shifts.
"""

import triton
import triton.language as tl


@triton.jit
def _load_words(row_ptrs, row_mask, words, ROW_BYTES: tl.constexpr, ALL_IN_ROW: tl.constexpr):
    """[ROWS, len(words)] int32: words `words` of each row; words past the row read 0. ALL_IN_ROW says
    none is past it, so the mask stays constant along the row and the loads can vectorize. Rows whose
    length is not a multiple of 4 bytes (3-bit codes of head_dim 80) are assembled from bytes."""
    if ROW_BYTES % 4 != 0:
        word = tl.zeros([row_ptrs.shape[0], words.shape[0]], dtype=tl.int32)
        for j in tl.static_range(4):
            mask = row_mask[:, None] & (words * 4 + j < ROW_BYTES)[None, :]
            byte = tl.load(row_ptrs[:, None] + words[None, :] * 4 + j, mask=mask, other=0)
            word = word | (byte.to(tl.int32) << (8 * j))
        return word
    else:
        if ALL_IN_ROW:
            mask = row_mask[:, None]
        else:
            mask = row_mask[:, None] & (words < ROW_BYTES // 4)[None, :]
        return tl.load(row_ptrs.to(tl.pointer_type(tl.int32))[:, None] + words[None, :], mask=mask, other=0)


@triton.jit
def _leading_words(row_ptrs, row_mask, ROW_BYTES: tl.constexpr, WORDS: tl.constexpr):
    """[ROWS, WORDS] int32: the first WORDS words of each row."""
    return _load_words(row_ptrs, row_mask, tl.arange(0, WORDS), ROW_BYTES, WORDS <= ROW_BYTES // 4)


@triton.jit
def _fields(word, BITS: tl.constexpr, COUNT: tl.constexpr):
    """[ROWS, N] words → [ROWS, N, COUNT] int32: the COUNT fields of BITS bits of each word, lowest first."""
    shifts = tl.arange(0, COUNT) * BITS
    return (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)


@triton.jit
def _interleave8(o0, o1, o2, o3, o4, o5, o6, o7):
    """Eight [..., N] tensors → [..., N, 8] with o_k at index k (each join adds a trailing axis, so the
    outermost join splits the lowest index bit)."""
    even = tl.join(tl.join(o0, o4), tl.join(o2, o6))
    odd = tl.join(tl.join(o1, o5), tl.join(o3, o7))
    return tl.join(even, odd)


@triton.jit
def _groups3(row_ptrs, row_mask, ROW_BYTES: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """[ROWS, HEAD_DIM_PAD // 8] int32: each 3-byte group of eight 3-bit indices in the low 24 bits of a
    value (the high 8 bits, where they are not 0, hold the next group's: its readers ignore them).
    Four groups fill three words exactly, so each word is loaded once and the groups are cut out of
    them by shifts (rows of fewer than 32 coordinates: out of the two words each group touches)."""
    if HEAD_DIM_PAD < 32:
        groups = tl.arange(0, HEAD_DIM_PAD // 8)
        words = groups * 3 // 4
        low = _load_words(row_ptrs, row_mask, words, ROW_BYTES, False).to(tl.uint32, bitcast=True)
        high = _load_words(row_ptrs, row_mask, words + 1, ROW_BYTES, False).to(tl.uint32, bitcast=True)
        shift = ((groups * 3) % 4 * 8)[None, :].to(tl.uint32)  # 0, 24, 16, 8: the group's first bit
        high = tl.where(shift == 0, 0, high << (32 - shift))
        return (((low >> shift) | high) & 0xFFFFFF).to(tl.int32, bitcast=True)
    else:
        ROWS: tl.constexpr = row_ptrs.shape[0]
        # words 3j, 3j+1, 3j+2 hold groups 4j .. 4j+3 (`load_runs`' runs of quad j)
        g0, g1, g2, g3 = load_runs(row_ptrs, row_mask, tl.arange(0, HEAD_DIM_PAD // 32), 3, ROW_BYTES)
        # join(join(g0, g2), join(g1, g3))[..., k, i] is g_(2k + i): flattened, g0 g1 g2 g3 in order
        return tl.reshape(tl.join(tl.join(g0, g2), tl.join(g1, g3)), [ROWS, HEAD_DIM_PAD // 8])


@triton.jit
def quarters(t):
    """[..., 4] → its four [...] slices in index order (free when a thread holds the last axis)."""
    even, odd = tl.split(tl.reshape(t, t.shape[:-1] + [2, 2]))  # the lowest index bit first
    q0, q2 = tl.split(even)
    q1, q3 = tl.split(odd)
    return q0, q1, q2, q3


@triton.jit
def _quad_runs(w0, w1, w2):
    """The four runs of 8 indices in a quad's three words (uint32), each in the low 24 bits of a word
    whose high 8 bits hold the next run's first indices: every reader of runs (`_fields`, `run_levels`,
    the `lut_asm` lookups) ignores them, so no masks are spent on them."""
    return w0, (w0 >> 24) | (w1 << 8), (w1 >> 16) | (w2 << 16), w2 >> 8


@triton.jit
def _loaded_quarters(words, mask):
    """Load [BLOCKS, ROWS, 4] words, then the four [ROWS, BLOCKS] uint32 words of each vector."""
    return quarters(tl.permute(tl.load(words, mask=mask, other=0), (1, 0, 2)).to(tl.uint32, bitcast=True))


@triton.jit
def load_runs3_vectors(row_ptrs, row_mask, ROW_BYTES: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """What `_groups3` returns, for rows of whole blocks of 128 3-bit indices (48 bytes, 16-byte aligned
    in rows of a multiple of 48 bytes): each block is read as three 16-byte vectors, a quarter of its 12
    words each, and its 16 runs are cut out of them by shifts (`_groups3` reads a word per load).
    The vectors are loaded as a [blocks, rows] tile and transposed in registers: Triton then runs a
    warp's lanes along the blocks before the rows, so the levels of a row's runs are consecutive for the
    copy that feeds `tl.dot` (stored 16 bytes at a time; as a [rows, blocks] tile the copy went rows
    first, one level per store)."""
    ROWS: tl.constexpr = row_ptrs.shape[0]
    BLOCKS: tl.constexpr = HEAD_DIM_PAD // 128
    tl.static_assert(ROW_BYTES % 48 == 0, "rows of whole 48-byte blocks")
    words = (row_ptrs.to(tl.pointer_type(tl.int32))[None, :, None] + (tl.arange(0, BLOCKS) * 12)[:, None, None]
             + tl.arange(0, 4)[None, None, :])
    mask = row_mask[None, :, None]
    a0, a1, a2, a3 = _loaded_quarters(words, mask)
    b0, b1, b2, b3 = _loaded_quarters(words + 4, mask)
    c0, c1, c2, c3 = _loaded_quarters(words + 8, mask)
    r0, r1, r2, r3 = _quad_runs(a0, a1, a2)
    r4, r5, r6, r7 = _quad_runs(a3, b0, b1)
    r8, r9, r10, r11 = _quad_runs(b2, b3, c0)
    r12, r13, r14, r15 = _quad_runs(c1, c2, c3)
    even = _interleave8(r0, r2, r4, r6, r8, r10, r12, r14)
    odd = _interleave8(r1, r3, r5, r7, r9, r11, r13, r15)
    # [ROWS, BLOCKS, 8, 2][..., k, i] is run 2k + i: flattened, each block's runs in order
    return tl.reshape(tl.join(even, odd), [ROWS, HEAD_DIM_PAD // 8]).to(tl.int32, bitcast=True)


@triton.jit
def load_indices(row_ptrs, row_mask, BITS: tl.constexpr, ROW_BYTES: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """[ROWS, HEAD_DIM_PAD] int32 indices of the packed rows at `row_ptrs` (uint8*); coordinates past
    the row, and masked rows, read index 0."""
    ROWS: tl.constexpr = row_ptrs.shape[0]
    if BITS == 3:
        fields = _fields(_groups3(row_ptrs, row_mask, ROW_BYTES, HEAD_DIM_PAD), 3, 8)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        words = _leading_words(row_ptrs, row_mask, ROW_BYTES, HEAD_DIM_PAD // PER_WORD)
        fields = _fields(words, BITS, PER_WORD)
    return tl.reshape(fields, [ROWS, HEAD_DIM_PAD])


@triton.jit
def load_codes(row_ptrs, row_mask, BITS: tl.constexpr, ROW_BYTES: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               LUT_ASM: tl.constexpr):
    """The packed rows at `row_ptrs` as `code_levels` reads them: with the codec's PTX, runs of eight
    indices [ROWS, HEAD_DIM_PAD // 8] int32, else the indices [ROWS, HEAD_DIM_PAD]. Apart from
    `code_levels` so a loop can issue the next tile's loads before it turns this tile into levels."""
    if LUT_ASM == "":
        return load_indices(row_ptrs, row_mask, BITS, ROW_BYTES, HEAD_DIM_PAD)
    elif BITS == 3:
        return _groups3(row_ptrs, row_mask, ROW_BYTES, HEAD_DIM_PAD)
    else:
        return _leading_words(row_ptrs, row_mask, ROW_BYTES, HEAD_DIM_PAD // 8)


@triton.jit
def code_levels(codes, centroids_ptr, BITS: tl.constexpr, LUT_ASM: tl.constexpr, tables=None):
    """`load_codes`' tile → [ROWS, HEAD_DIM_PAD] fp16 codebook levels: by byte permutation when the
    wrapper passes the codec's PTX (`lut_asm.py`), else by gathering from `centroids_ptr` (fp16).
    `tables`: the lookup's four table words, for PTX that takes them as inputs (`run_levels`)."""
    if LUT_ASM == "":
        return tl.load(centroids_ptr + codes)
    else:
        return runs_levels(codes, centroids_ptr, BITS, LUT_ASM, tables)


@triton.jit
def runs_levels(runs, centroids_ptr, BITS: tl.constexpr, LUT_ASM: tl.constexpr, tables=None):
    """[ROWS, N] runs of eight packed indices → their [ROWS, 8N] fp16 levels in coordinate order."""
    return tl.reshape(_interleave8(*run_levels(runs, centroids_ptr, BITS, LUT_ASM, tables)),
                      [runs.shape[0], runs.shape[1] * 8])


@triton.jit
def load_levels(row_ptrs, row_mask, centroids_ptr, BITS: tl.constexpr, ROW_BYTES: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr, LUT_ASM: tl.constexpr, tables=None):
    """[ROWS, HEAD_DIM_PAD] fp16 codebook levels of the packed rows (`load_codes`, then `code_levels`)."""
    return code_levels(load_codes(row_ptrs, row_mask, BITS, ROW_BYTES, HEAD_DIM_PAD, LUT_ASM), centroids_ptr, BITS,
                       LUT_ASM, tables)


@triton.jit
def load_runs(row_ptrs, row_mask, quads, BITS: tl.constexpr, ROW_BYTES: tl.constexpr):
    """The packed indices of coordinates 32q .. 32q + 31 of each row, q in `quads`, as four [ROWS, len(quads)]
    int32 runs: run j holds the eight indices of coordinates 32q + 8j .. 32q + 8j + 7 (4 bits each, or 3, or 2,
    lowest first). Each tensor has the same layout, so no lookup or product needs a layout change."""
    if BITS == 3:  # a quad is three words, each loaded once; the four runs are cut out by shifts (`_quad_runs`)
        w0 = _load_words(row_ptrs, row_mask, quads * 3, ROW_BYTES, False).to(tl.uint32, bitcast=True)
        w1 = _load_words(row_ptrs, row_mask, quads * 3 + 1, ROW_BYTES, False).to(tl.uint32, bitcast=True)
        w2 = _load_words(row_ptrs, row_mask, quads * 3 + 2, ROW_BYTES, False).to(tl.uint32, bitcast=True)
        r0, r1, r2, r3 = _quad_runs(w0, w1, w2)
        return (r0.to(tl.int32, bitcast=True), r1.to(tl.int32, bitcast=True), r2.to(tl.int32, bitcast=True),
                r3.to(tl.int32, bitcast=True))
    elif BITS == 4:
        return (_load_words(row_ptrs, row_mask, quads * 4, ROW_BYTES, False),
                _load_words(row_ptrs, row_mask, quads * 4 + 1, ROW_BYTES, False),
                _load_words(row_ptrs, row_mask, quads * 4 + 2, ROW_BYTES, False),
                _load_words(row_ptrs, row_mask, quads * 4 + 3, ROW_BYTES, False))
    else:
        tl.static_assert(BITS == 2, "runs of 8 indices are read for 2-, 3- and 4-bit codes")
        w0 = _load_words(row_ptrs, row_mask, quads * 2, ROW_BYTES, False)
        w1 = _load_words(row_ptrs, row_mask, quads * 2 + 1, ROW_BYTES, False)
        return w0 & 0xFFFF, (w0 >> 16) & 0xFFFF, w1 & 0xFFFF, (w1 >> 16) & 0xFFFF


@triton.jit
def run_levels(run, centroids_ptr, BITS: tl.constexpr, LUT_ASM: tl.constexpr, tables=None):
    """A tensor of runs of eight packed indices → the eight fp16 levels of each, as eight tensors of its
    shape and layout: by byte permutation (`lut_asm.py`, one word in, eight levels out, elementwise), or
    without the PTX by gathering from `centroids_ptr`. `tables` (four scalars, `lane_lookup_tables`):
    the table words, for PTX built with `dequant_asm(..., table_inputs=True)`."""
    if LUT_ASM == "":
        MASK: tl.constexpr = (1 << BITS) - 1
        return (tl.load(centroids_ptr + (run & MASK)), tl.load(centroids_ptr + ((run >> BITS) & MASK)),
                tl.load(centroids_ptr + ((run >> 2 * BITS) & MASK)), tl.load(centroids_ptr + ((run >> 3 * BITS) & MASK)),
                tl.load(centroids_ptr + ((run >> 4 * BITS) & MASK)), tl.load(centroids_ptr + ((run >> 5 * BITS) & MASK)),
                tl.load(centroids_ptr + ((run >> 6 * BITS) & MASK)), tl.load(centroids_ptr + ((run >> 7 * BITS) & MASK)))
    elif tables is None:
        return tl.inline_asm_elementwise(LUT_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r", [run], dtype=(tl.float16,) * 8,
                                         is_pure=True, pack=1)
    else:
        t0, t1, t2, t3 = tables
        words = [run, tl.broadcast_to(t0, run.shape), tl.broadcast_to(t1, run.shape), tl.broadcast_to(t2, run.shape),
                 tl.broadcast_to(t3, run.shape)]
        return tl.inline_asm_elementwise(LUT_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", words,
                                         dtype=(tl.float16,) * 8, is_pure=True, pack=1)


@triton.jit
def lane_lookup_tables(lane_tables_ptr, FIRST_ROW: tl.constexpr):
    """The four table words at rows FIRST_ROW.. of `KernelCodec.lut_lane_tables` ([10, 32] int32), each
    thread reading its lane's copy: a value the compiler knows every lane shares lives in a uniform
    register, which is copied into a register before every byte permute; these stay in registers."""
    # the asm reads no input; FIRST_ROW stands in for the operand inline_asm_elementwise requires
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [FIRST_ROW], dtype=tl.int32, is_pure=True,
                                     pack=1)
    ptrs = lane_tables_ptr + FIRST_ROW * 32 + lane
    return tl.load(ptrs), tl.load(ptrs + 32), tl.load(ptrs + 64), tl.load(ptrs + 96)


@triton.jit
def store_codes(row_ptrs, row_mask, codes, BITS: tl.constexpr, COORDS: tl.constexpr,
                GROUP_BYTES: tl.constexpr, HEAD_DIM, HEAD_DIM_PAD: tl.constexpr, ROWS: tl.constexpr):
    """Pack int32 codes [ROWS, HEAD_DIM_PAD] (< 2**BITS) into the rows at `row_ptrs`; only the first
    HEAD_DIM codes of a row are written (HEAD_DIM may be a runtime value: a block of a wider row)."""
    GROUPS_PAD: tl.constexpr = HEAD_DIM_PAD // COORDS
    grouped = tl.reshape(codes, [ROWS, GROUPS_PAD, COORDS])
    shifts = tl.arange(0, COORDS) * BITS
    word = tl.sum(grouped << shifts[None, None, :], axis=2)  # the fields are disjoint, so sum == or
    groups = tl.arange(0, GROUPS_PAD)
    mask = row_mask[:, None] & (groups < HEAD_DIM // COORDS)[None, :]
    for j in tl.static_range(GROUP_BYTES):
        tl.store(row_ptrs[:, None] + groups[None, :] * GROUP_BYTES + j, ((word >> (8 * j)) & 255).to(tl.uint8),
                 mask=mask)


@triton.jit
def load_norms(ptrs, mask):
    """fp32 norms stored in the uint8 cache at 4-byte-aligned addresses `ptrs`."""
    return tl.load(ptrs.to(tl.pointer_type(tl.float32)), mask=mask, other=0.0)
