"""Small-batch GEMV over a `TQLinear`'s codes (Triton): y = W·x without ever building W.

Because the rotation is orthogonal, W·x = Σ_g norm_g · levels(idx_g) · (R·x_g): the input is rotated
once per group (one small matmul for the whole batch) and each program streams its rows' packed codes,
turns them into fp16 levels (`kernels/packed_tile.load_levels`), dots them with the rotated input in
fp32 and scales by the group norms. Reference: `TQLinear.forward` (dequantize, then `F.linear`).
Each program reads its rows' codes once per batch row: meant for decode batches, not prefill.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..kernels.packed_tile import load_levels
from .linear import TQLinear

ROWS_PER_PROGRAM = 16  # of 16, 32, 64 on an H100 (benchmarks/weights_gemv.py): fastest for TQ3 at batch 1


@functools.lru_cache(maxsize=None)
def _device_codec(quantizer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotation fp32, fp16 levels) of a shared weight quantizer on `device`, built once."""
    return (quantizer.rotation.matrix().to(device),
            quantizer.codebook.centroids.to(device=device, dtype=torch.float16))


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, norms_ptr, centroids_ptr, bias_ptr, out_ptr, out_features, groups,
                 stride_x_batch, stride_out_batch, GROUP_SIZE: tl.constexpr, GROUP_BYTES: tl.constexpr,
                 BITS: tl.constexpr, ROWS: tl.constexpr, HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    batch = tl.program_id(1)
    row_mask = rows < out_features
    columns = tl.arange(0, GROUP_SIZE)
    acc = tl.zeros([ROWS], dtype=tl.float32)
    for group in range(0, groups):
        row_ptrs = packed_ptr + (rows.to(tl.int64) * groups + group) * GROUP_BYTES
        levels = load_levels(row_ptrs, row_mask, centroids_ptr, BITS, GROUP_BYTES, GROUP_SIZE, "")
        x = tl.load(x_ptr + batch * stride_x_batch + group * GROUP_SIZE + columns)
        norms = tl.load(norms_ptr + rows.to(tl.int64) * groups + group, mask=row_mask, other=0.0).to(tl.float32)
        acc += norms * tl.sum(levels.to(tl.float32) * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + batch * stride_out_batch + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


def tq_linear_gemv(x: torch.Tensor, layer: TQLinear) -> torch.Tensor:
    """layer(x) for x [..., in_features] (fp16/bf16/fp32), computed from the codes; same dtype as x."""
    if not isinstance(layer, TQLinear):
        raise TypeError(f"expected a TQLinear, got {type(layer).__name__}")
    group_size = layer.group_size
    if group_size & (group_size - 1):
        raise ValueError(f"the GEMV kernel needs a power-of-two group_size, the layer has {group_size}")
    if not isinstance(x, torch.Tensor) or x.shape[-1] != layer.in_features or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [..., {layer.in_features}], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.device != layer.packed.device:
        raise ValueError(f"x is on {x.device}, the layer on {layer.packed.device}")
    lead, groups = x.shape[:-1], layer.in_features // group_size
    rotation, centroids = _device_codec(layer.quantizer, x.device)
    rotated = (x.reshape(-1, groups, group_size).float() @ rotation.T).reshape(-1, layer.in_features).contiguous()
    batch = rotated.shape[0]
    out = torch.empty(batch, layer.out_features, dtype=x.dtype, device=x.device)
    if batch == 0:
        return out.reshape(*lead, layer.out_features)
    bias = layer.bias if layer.bias is not None else out  # not read without HAS_BIAS
    _gemv_kernel[(triton.cdiv(layer.out_features, ROWS_PER_PROGRAM), batch)](
        rotated, layer.packed, layer.norms, centroids, bias, out, layer.out_features, groups,
        rotated.stride(0), out.stride(0), GROUP_SIZE=group_size, GROUP_BYTES=layer.packed.shape[-1],
        BITS=layer.bits, ROWS=ROWS_PER_PROGRAM, HAS_BIAS=layer.bias is not None,
    )
    return out.reshape(*lead, layer.out_features)
