"""The query rows of one GQA group, as the decode kernels read them: every query head of a kv head shares
one read of its keys and values, so one program holds the group's rows (padded for tl.dot)."""

import triton
import triton.language as tl

from .rotate import rotated_columns


@triton.jit
def load_group_query(query_ptr, seq, kv_head, stride_query_seq, stride_query_head, scale, GROUP: tl.constexpr,
                     GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                     rotation_ptr=None, PART_SCALE: tl.constexpr = 0.0, SIGN_SCALE: tl.constexpr = 0.0,
                     ROTATE: tl.constexpr = False):
    """(the group's query rows × scale, fp16 [GROUP_PAD, HEAD_DIM_PAD], zero-padded; their row index in
    the group; their query heads). ROTATE: the rows are read unrotated and rotated here (x @ Rᵀ,
    `rotate.rotated_columns` with `rotation_operand`'s tensor and scales), in fp32 before the scale."""
    group = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group
    dims = tl.arange(0, HEAD_DIM_PAD)
    query = tl.load(query_ptr + seq * stride_query_seq + heads[:, None] * stride_query_head + dims[None, :],
                    mask=(group < GROUP)[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    if ROTATE:
        query = rotated_columns(query, rotation_ptr, dims, dims, HEAD_DIM, PART_SCALE, SIGN_SCALE, False)
    return (query * scale).to(tl.float16), group, heads
