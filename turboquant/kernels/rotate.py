"""The layer's rotation on the tensor cores at fp32 accuracy: rotate queries (and fresh keys/values)
into the codes' space, and un-rotate the attention output, one launch each.

A 16-bit x is exact in its own dtype, so x @ Rᵀ is computed from three 16-bit parts of R,
R = P0 + P1/s + P2/s² (s = 2^8 for bf16, 2^11 for fp16): every product is exact and the sums are
fp32, so the result matches an fp32 matmul (within 2e-6 of its largest entry, tested) while running
as 16-bit MMAs. A randomized Hadamard R is c · S with S of ±1 (`codec.sign_form`): one dot with S,
exact in the 16-bit dtype, then the multiply by c; an fp32 x (attention outputs on their way back) is
split exactly into three bf16 parts, three dots with S (H200, scratch run, d=128: un-rotating 512 × 32
rows 0.018 → 0.009 ms against tf32x3, 2048 × 32 0.069 → 0.028; 1–64 rows even). With a dense R an
fp32 x takes Triton's tf32x3 dots with fp32 R, as does every fp32 x in the interpreter (it multiplies
bf16 tiles wrongly). A plain tf32 or bf16 rotation would move coordinates across the quantizer's
decision boundaries that the PyTorch reference keeps.

Reference: `x.float() @ rotation.T` (and `@ rotation` for the inverse).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .codec import PART_SCALES
from .launch import FLOAT_DTYPES, check_device_tensor, head_dim_pad, programmatic_launch


def rotation_columns(head_dim_pad: int, part_scale: float) -> int:
    """Rotated coordinates per dot: a whole 256-wide R tile spills, and fp32 (tf32x3) tiles take twice the
    registers of 16-bit ones."""
    return 32 if part_scale == 0 and head_dim_pad >= 256 else min(64, head_dim_pad)


@triton.jit
def rotated_columns(x, rotation_ptr, columns, dims, HEAD_DIM: tl.constexpr, PART_SCALE: tl.constexpr,
                    SIGN_SCALE: tl.constexpr, INVERSE: tl.constexpr):
    """fp32 columns `columns` of x @ Rᵀ (x @ R when INVERSE) for x [rows, HEAD_DIM_PAD], zero-padded.
    SIGN_SCALE > 0: rotation_ptr holds the int8 S of R = SIGN_SCALE · S (x of any float dtype);
    else PART_SCALE > 0: x is 16-bit and rotation_ptr holds R's three parts; PART_SCALE == 0: fp32 R
    (tf32x3)."""
    if INVERSE:
        offsets = dims[None, :] * HEAD_DIM + columns[:, None]
    else:
        offsets = columns[:, None] * HEAD_DIM + dims[None, :]
    mask = (columns[:, None] < HEAD_DIM) & (dims[None, :] < HEAD_DIM)
    if SIGN_SCALE > 0:
        signs = tl.trans(tl.load(rotation_ptr + offsets, mask=mask, other=0))
        if x.dtype == tl.float32:  # x = high + middle + low exactly (8 significant bits each), smallest summed first
            high = x.to(tl.bfloat16)
            rest = x - high.to(tl.float32)
            middle = rest.to(tl.bfloat16)
            low = (rest - middle.to(tl.float32)).to(tl.bfloat16)
            signs = signs.to(tl.bfloat16)
            y = tl.dot(high, signs, tl.dot(middle, signs, tl.dot(low, signs)))
        else:
            y = tl.dot(x, signs.to(x.dtype))
        y = y * SIGN_SCALE
    elif PART_SCALE == 0:
        y = tl.dot(x.to(tl.float32), tl.trans(tl.load(rotation_ptr + offsets, mask=mask, other=0.0)),
                   input_precision="tf32x3")
    else:
        size: tl.constexpr = HEAD_DIM * HEAD_DIM
        y = tl.dot(x, tl.trans(tl.load(rotation_ptr + 2 * size + offsets, mask=mask, other=0.0)))
        y = tl.dot(x, tl.trans(tl.load(rotation_ptr + size + offsets, mask=mask, other=0.0)), y * (1.0 / PART_SCALE))
        y = tl.dot(x, tl.trans(tl.load(rotation_ptr + offsets, mask=mask, other=0.0)), y * (1.0 / PART_SCALE))
    return y


@triton.jit
def load_head_rows(x_ptr, stride_token, stride_head, tokens, rows_valid, head, HEAD_DIM: tl.constexpr,
                   HEAD_DIM_PAD: tl.constexpr):
    """x[tokens, head, :] as [rows, HEAD_DIM_PAD], zero-padded; rows not valid read 0."""
    dims = tl.arange(0, HEAD_DIM_PAD)
    return tl.load(x_ptr + tokens[:, None] * stride_token + head * stride_head + dims[None, :],
                   mask=rows_valid[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def store_rotated_block(x, block, rotation_ptr, out_ptr, stride_out_token, stride_out_head, tokens, rows_valid, head,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PART_SCALE: tl.constexpr,
                        SIGN_SCALE: tl.constexpr, INVERSE: tl.constexpr, COLUMNS: tl.constexpr):
    """out[tokens, head, block·COLUMNS …] ← those columns of x @ Rᵀ (x @ R when INVERSE), cast to out's dtype."""
    columns = block * COLUMNS + tl.arange(0, COLUMNS)
    y = rotated_columns(x, rotation_ptr, columns, tl.arange(0, HEAD_DIM_PAD), HEAD_DIM, PART_SCALE, SIGN_SCALE,
                        INVERSE)
    tl.store(out_ptr + tokens[:, None] * stride_out_token + head * stride_out_head + columns[None, :],
             y.to(out_ptr.dtype.element_ty), mask=rows_valid[:, None] & (columns < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["num_tokens"])  # num_tokens changes every step: one variant for all
def _rotate_kernel(x_ptr, second_ptr, rotation_ptr, out_ptr, num_tokens, x_heads, stride_x_token, stride_x_head,
                   stride_second_token, stride_second_head, stride_out_token, stride_out_head,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PART_SCALE: tl.constexpr,
                   SIGN_SCALE: tl.constexpr, INVERSE: tl.constexpr, COLUMNS: tl.constexpr, ROWS: tl.constexpr,
                   LAUNCH_DEPENDENTS: tl.constexpr, WAIT_FOR_INPUT: tl.constexpr):
    """Output heads from x_heads on are the rows of second_ptr's heads (`rotate`'s `second`)."""
    if LAUNCH_DEPENDENTS:  # the next kernel may start now; it waits for this one before reading its output
        gdc_launch_dependents()
    if WAIT_FOR_INPUT:  # launched while the kernel that writes x may still run
        gdc_wait()
    # one block of output columns per program: a few tokens (decode) still spread over the device
    tokens = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    head = tl.program_id(1)
    rows_valid = tokens < num_tokens
    in_second = head >= x_heads
    x = load_head_rows(tl.where(in_second, second_ptr, x_ptr),
                       tl.where(in_second, stride_second_token, stride_x_token),
                       tl.where(in_second, stride_second_head, stride_x_head), tokens, rows_valid,
                       tl.where(in_second, head - x_heads, head), HEAD_DIM, HEAD_DIM_PAD)
    store_rotated_block(x, tl.program_id(2), rotation_ptr, out_ptr, stride_out_token, stride_out_head, tokens,
                        rows_valid, head, HEAD_DIM, HEAD_DIM_PAD, PART_SCALE, SIGN_SCALE, INVERSE, COLUMNS)


def rotation_operand(codec, dtype: torch.dtype) -> tuple[torch.Tensor, float, float]:
    """(the tensor `rotated_columns` reads, its PART_SCALE, its SIGN_SCALE) for an x of `dtype`, either
    direction."""
    # Triton's CPU interpreter multiplies bf16 tiles as raw integers; there a bf16 x (exact in tf32), and an
    # fp32 x, which the sign form splits into bf16 parts, take the tf32x3 path: the same fp32-accurate result.
    no_bf16_dots = dtype != torch.float16 and codec.device.type != "cuda"
    if codec.rotation_signs is not None and not no_bf16_dots:
        return codec.rotation_signs, PART_SCALES.get(dtype, 0.0), codec.rotation_sign_scale
    if dtype == torch.float32 or no_bf16_dots:
        return codec.rotation, 0.0, 0.0
    parts = codec.rotation_bf16_parts if dtype == torch.bfloat16 else codec.rotation_fp16_parts
    return parts, PART_SCALES[dtype], 0.0


# Up to this many tokens a program rotates 16 rows (more programs for a few tokens); above it 64.
SHORT_TILE_MAX_TOKENS = 256


def rotate(x: torch.Tensor, codec, inverse: bool = False, out: torch.Tensor | None = None,
           fixed_tile: bool = False, launch_dependents: bool = False, after_previous: bool = False,
           second: torch.Tensor | None = None) -> torch.Tensor:
    """x [tokens, heads, head_dim] (fp16/bf16/fp32, any token and head strides) → x @ Rᵀ (x @ R when
    `inverse`) as fp32, or written into `out` (same shape, any float dtype, cast on store). `fixed_tile`:
    the same tile shape whatever the token count, so that a row's result does not depend on how many
    rows came with it (`cached_attention`). `codec` is anything with the fields `rotation_operand` reads
    (a `KernelCodec`, or a weight layer's `GroupRotation`). Programmatic dependent launch (see
    `launch.programmatic_launch_available`): `launch_dependents` lets a next kernel launched that way
    start at once (it must `gdc_wait` before reading `out`); `after_previous` launches this one that way
    (it waits for the kernel before it, which writes x, before reading x). `second`: a tensor of x's shape
    and dtype rotated in the same launch (a chunk's keys and values), its heads after x's in `out`, which is
    then [tokens, 2 · heads, head_dim]."""
    head_dim = codec.rotation.shape[-1]
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != head_dim or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a float tensor [tokens, heads, {head_dim}], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.device != codec.device:
        raise ValueError(f"x is on {x.device}, the codec on {codec.device}")
    if second is not None:
        check_device_tensor(second, "second", (x.dtype,), x.shape, x.device)
    tokens, heads = x.shape[:2]
    out_shape = (tokens, heads * (1 if second is None else 2), head_dim)
    if out is None:
        out = torch.empty(out_shape, dtype=torch.float32, device=x.device)
    check_device_tensor(out, "out", FLOAT_DTYPES, out_shape, x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    second = x if second is None else second
    if tokens == 0 or heads == 0:
        return out
    operand, part_scale, sign_scale = rotation_operand(codec, x.dtype)
    rows = 16 if tokens <= SHORT_TILE_MAX_TOKENS or fixed_tile else 64
    pad = head_dim_pad(head_dim)
    columns = rotation_columns(pad, part_scale)
    _rotate_kernel[(triton.cdiv(tokens, rows), out_shape[1], pad // columns)](
        x, second, operand, out, tokens, heads, x.stride(0), x.stride(1), second.stride(0), second.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, PART_SCALE=part_scale, SIGN_SCALE=sign_scale, INVERSE=inverse,
        COLUMNS=columns, ROWS=rows,
        LAUNCH_DEPENDENTS=launch_dependents, WAIT_FOR_INPUT=after_previous,
        **programmatic_launch(after_previous),
    )
    return out
