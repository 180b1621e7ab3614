"""Triton helpers that move a tile of b-bit indices between registers and the packed byte layout
of `core/packing.py` (little-endian bit stream: `COORDS` indices share `GROUP_BYTES` bytes).

Rows are addressed by pointer, one per token, so the same helpers serve paged and contiguous caches.
"""

import triton
import triton.language as tl


@triton.jit
def load_indices(row_ptrs, row_mask, BITS: tl.constexpr, COORDS: tl.constexpr, GROUP_BYTES: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, ROWS: tl.constexpr):
    """[ROWS, HEAD_DIM_PAD] int32 indices of the packed rows at `row_ptrs` (uint8*); padding reads as 0."""
    GROUPS_PAD: tl.constexpr = HEAD_DIM_PAD // COORDS
    groups = tl.arange(0, GROUPS_PAD)
    mask = row_mask[:, None] & (groups < HEAD_DIM // COORDS)[None, :]
    word = tl.zeros([ROWS, GROUPS_PAD], dtype=tl.int32)
    for j in tl.static_range(GROUP_BYTES):
        byte = tl.load(row_ptrs[:, None] + groups[None, :] * GROUP_BYTES + j, mask=mask, other=0)
        word = word | (byte.to(tl.int32) << (8 * j))
    shifts = tl.arange(0, COORDS) * BITS
    indices = (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(indices, [ROWS, HEAD_DIM_PAD])


@triton.jit
def store_indices(row_ptrs, row_mask, indices, BITS: tl.constexpr, COORDS: tl.constexpr,
                  GROUP_BYTES: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                  ROWS: tl.constexpr):
    """Pack int32 indices [ROWS, HEAD_DIM_PAD] (< 2**BITS) into the rows at `row_ptrs`; only the first
    HEAD_DIM indices of a row are written."""
    GROUPS_PAD: tl.constexpr = HEAD_DIM_PAD // COORDS
    grouped = tl.reshape(indices, [ROWS, GROUPS_PAD, COORDS])
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
