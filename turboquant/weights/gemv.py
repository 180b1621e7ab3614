"""Small-batch matmul over TurboQuant weight codes (Triton): y = x·Wᵀ without ever building W.

Because the rotation is orthogonal, W·x = Σ_g norm_g · levels(idx_g) · (R·x_g): the input is rotated
once per group (one small matmul for the whole batch) and each program streams its rows' packed codes
once for a tile of up to 32 batch rows, turns them into fp16 levels (`kernels/packed_tile.load_levels`, by
byte permutation for 4-bit codes), multiplies them with the rotated input on the tensor cores
(fp16 operands, fp32 accumulation) and scales by the group norms. The groups are split over several
programs whose fp32 partial sums are added at the end, so a batch-1 call still fills the GPU.
Reference: `TQLinear.dequantize`, then `F.linear` (what `codes_linear` runs off the kernel's path).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..kernels.launch import multiprocessor_count
from ..kernels.lut_asm import antisymmetric_fp16, byte_permute_available, dequant_asm
from ..kernels.packed_tile import load_levels
from ..core import MSEQuantizer
from .linear import TQLinear, kernel_group_size

ROWS_PER_PROGRAM = 64  # of 16, 32, 64 on an H100 (benchmarks/weights_gemv.py --rows-per-program)
# Codes turned into levels by byte permutation. 3-bit codes gather from the codebook instead: on an H100,
# TQ3 at batch 1 ran at 0.22-0.35x cuBLAS with the 3-bit permute and 0.26-0.46x gathering.
LOOKUP_BITS = (4,)
MAX_BATCH_TILE = 32  # batch rows per program (64 spills on sm_90); larger batches take more programs


@functools.lru_cache(maxsize=None)
def device_codec(quantizer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(rotation fp32, fp16 levels, byte-permute PTX or "") of a shared weight quantizer, built once per device."""
    levels = antisymmetric_fp16(quantizer.codebook.centroids)  # a Gaussian's levels: antisymmetric up to rounding
    lookup = dequant_asm(levels) if quantizer.bits in LOOKUP_BITS and byte_permute_available(device) else ""
    return quantizer.rotation.matrix().to(device), levels.to(device), lookup


def group_splits(row_programs: int, groups: int, num_sms: int) -> int:
    """Programs per row block along the groups: about two per SM in all, at least two groups each."""
    return max(1, min(triton.cdiv(2 * num_sms, row_programs), groups // 2))


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, norms_ptr, centroids_ptr, partial_ptr, out_features, groups, batch,
                 groups_per_split, stride_x_batch, GROUP_SIZE: tl.constexpr, GROUP_BYTES: tl.constexpr,
                 BITS: tl.constexpr, LUT: tl.constexpr, ROWS: tl.constexpr, BATCH_TILE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    split = tl.program_id(1)
    batch_rows = tl.program_id(2) * BATCH_TILE + tl.arange(0, BATCH_TILE)
    row_mask, batch_mask = rows < out_features, batch_rows < batch
    columns = tl.arange(0, GROUP_SIZE)
    acc = tl.zeros([ROWS, BATCH_TILE], dtype=tl.float32)
    first = split * groups_per_split
    for group in range(first, tl.minimum(first + groups_per_split, groups)):
        levels = load_levels(packed_ptr + (rows.to(tl.int64) * groups + group) * GROUP_BYTES, row_mask,
                             centroids_ptr, BITS, GROUP_BYTES, GROUP_SIZE, LUT)
        x = tl.load(x_ptr + batch_rows[None, :] * stride_x_batch + group * GROUP_SIZE + columns[:, None],
                    mask=batch_mask[None, :], other=0.0)
        norms = tl.load(norms_ptr + rows.to(tl.int64) * groups + group, mask=row_mask, other=0.0).to(tl.float32)
        acc += tl.dot(levels, x) * norms[:, None]
    partial = partial_ptr + (split * batch + batch_rows[None, :]).to(tl.int64) * out_features + rows[:, None]
    tl.store(partial, acc, mask=row_mask[:, None] & batch_mask[None, :])


def tq_linear_gemv(x: torch.Tensor, layer: TQLinear) -> torch.Tensor:
    """layer(x) for x [..., in_features] (fp16/bf16/fp32), computed from the codes; same dtype as x."""
    if not isinstance(layer, TQLinear):
        raise TypeError(f"expected a TQLinear, got {type(layer).__name__}")
    return codes_gemv(x, layer.packed, layer.norms, layer.quantizer, layer.bias)


def codes_gemv(x: torch.Tensor, packed: torch.Tensor, norms: torch.Tensor, quantizer: MSEQuantizer,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ (+ bias) from `packed` [out, groups, bytes] codes and fp16 `norms` [out, groups]; x's dtype."""
    group_size = quantizer.dim
    if not kernel_group_size(group_size):
        raise ValueError(f"the GEMV kernel needs a power-of-two group_size of at least 16 (a tensor-core tile), "
                         f"the layer has {group_size}")
    out_features, groups = norms.shape
    in_features = groups * group_size
    if not isinstance(x, torch.Tensor) or x.shape[-1] != in_features or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [..., {in_features}], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device}, the layer on {packed.device}")
    lead = x.shape[:-1]
    rotation, levels, lookup = device_codec(quantizer, x.device)
    # fp16 operands for the tensor cores: the rotated input keeps 11 significant bits (bf16 inputs have 8)
    rotated = (x.reshape(-1, groups, group_size).float() @ rotation.T).reshape(-1, in_features)
    rotated = rotated.to(torch.float16).contiguous()
    batch = rotated.shape[0]
    if batch == 0:
        return torch.empty(*lead, out_features, dtype=x.dtype, device=x.device)
    batch_tile = min(MAX_BATCH_TILE, max(16, triton.next_power_of_2(batch)))
    row_programs = triton.cdiv(out_features, ROWS_PER_PROGRAM)
    splits = group_splits(row_programs, groups, multiprocessor_count(x.device))
    groups_per_split = triton.cdiv(groups, splits)
    splits = triton.cdiv(groups, groups_per_split)
    partial = torch.empty(splits, batch, out_features, dtype=torch.float32, device=x.device)
    _gemv_kernel[(row_programs, splits, triton.cdiv(batch, batch_tile))](
        rotated, packed, norms, levels, partial, out_features, groups, batch, groups_per_split,
        rotated.stride(0), GROUP_SIZE=group_size, GROUP_BYTES=packed.shape[-1], BITS=quantizer.bits,
        LUT=lookup, ROWS=ROWS_PER_PROGRAM, BATCH_TILE=batch_tile,
    )
    out = partial.sum(0) if splits > 1 else partial[0]
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*lead, out_features)
