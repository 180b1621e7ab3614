"""Which cached keys a decode query sees, as both decode split kernels (`decode.py`'s Triton one and
`decode_fragments.py`'s Gluon one, which can call Triton helpers) bound them: one definition, so the two
cannot drift apart."""

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
