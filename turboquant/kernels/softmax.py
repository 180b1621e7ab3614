"""The online-softmax steps and soft-capping the attention kernels share (fp32 statistics, log2-unit scores)."""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def online_softmax_step(scores, running_max, running_sum, AXIS: tl.constexpr = 1):
    """One tile of an fp32 online softmax over log2-unit scores, the tile's keys along `AXIS` ([rows, tile]
    by default) → (probabilities, the factor that rescales what was summed before, the new running max,
    the new running sum)."""
    new_max = tl.maximum(running_max, tl.max(scores, axis=AXIS))
    correction = tl.exp2(running_max - new_max)
    probs = tl.exp2(scores - tl.expand_dims(new_max, AXIS))
    return probs, correction, new_max, running_sum * correction + tl.sum(probs, axis=AXIS)


@triton.jit
def masked_online_softmax_step(scores, running_max, running_sum):
    """`online_softmax_step` over [rows, tile] log2-unit scores that are −inf where a key is not visible,
    safe for a row that has seen no key yet (its probabilities and correction stay 0, not NaN). Gluon
    kernels call it too (`extend_hopper.py`)."""
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row that sees nothing yet
    correction = tl.exp2(running_max - shift)
    probs = tl.exp2(scores - shift[:, None])
    return probs, correction, new_max, running_sum * correction + tl.sum(probs, axis=1)


@triton.jit
def masked_softmax_step(scores, visible, running_max, running_sum, acc, values, value_scales):
    """One flash-attention update with fp32 statistics; `scores` are in log2 units, `values` fp16 rows
    that count `value_scales` times (their norms; folded into the probabilities, not the rows)."""
    probs, correction, new_max, running_sum = masked_online_softmax_step(tl.where(visible, scores, float("-inf")),
                                                                         running_max, running_sum)
    acc = acc * correction[:, None] + tl.dot((probs * value_scales[None, :]).to(tl.float16), values)
    return new_max, running_sum, acc


@triton.jit
def empty_softmax_state(ROWS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """(running max −inf, running sum 0, accumulator 0 [ROWS, HEAD_DIM_PAD]): no key seen yet."""
    return (tl.full([ROWS], float("-inf"), dtype=tl.float32), tl.zeros([ROWS], dtype=tl.float32),
            tl.zeros([ROWS, HEAD_DIM_PAD], dtype=tl.float32))
