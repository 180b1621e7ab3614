"""Which cached keys a query sees, as the kernels that run the same attention in Triton and in Gluon
(which can call Triton helpers) bound them: the decode split kernels (`decode.py`, `decode_fragments.py`)
and the extend kernels (`extend.py`, `extend_hopper.py`). One definition each, so a pair cannot drift
apart."""

import triton
import triton.language as tl


@triton.jit
def first_visible_key(seq_len, seq, key_starts_ptr, sliding_window, USE_WINDOW: tl.constexpr,
                      USE_STARTS: tl.constexpr):
    """The position of the first key that sequence `seq`'s newest query sees: the start of its sliding
    window and of its own keys (left padding), at most `seq_len` (then it sees none)."""
    first = 0
    if USE_WINDOW:
        first = tl.maximum(seq_len - sliding_window, 0)
    if USE_STARTS:
        first = tl.minimum(tl.maximum(first, tl.load(key_starts_ptr + seq)), seq_len)
    return first


@triton.jit
def extend_tile_range(key_start, first_query_pos, key_limit, sliding_window, split, num_splits,
                      TILE: tl.constexpr, USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr):
    """[lo, hi): the cached keys an extend program reads, below `key_limit`, in whole tiles from the one
    holding the first key its first query (at `first_query_pos`) sees (its key start, its window); with
    SPLIT, split `split`'s share of those tiles out of `num_splits`."""
    lo = key_start // TILE * TILE
    if USE_WINDOW:
        lo = tl.maximum(tl.maximum(first_query_pos - sliding_window + 1, 0) // TILE * TILE, lo)
    hi = key_limit
    if SPLIT:
        span = tl.cdiv(tl.cdiv(tl.maximum(key_limit - lo, 0), TILE), num_splits) * TILE
        lo = lo + split * span
        hi = tl.minimum(lo + span, key_limit)
    return lo, hi
