"""Small-batch matmul over TurboQuant weight codes (Triton): y = x·Wᵀ without ever building W.

Because the rotation is orthogonal, W·x = Σ_g norm_g · levels(idx_g) · (R·x_g): the input is rotated
once per group (`kernels.rotate`, one launch for the whole batch) and each program streams its rows'
packed codes once for a tile of up to 32 batch rows, turns them into fp16 levels
(`kernels/packed_tile.load_levels`, by byte permutation for 3- and 4-bit codes), multiplies them with the
rotated input on the tensor cores (fp16 operands, fp32 accumulation) and scales by the group norms.
A call is three launches: the rotation, the kernel (its groups split over several programs) and a
second kernel that adds their fp32 partial sums in a fixed order, with the bias, in x's dtype (a launch
tiled without splits writes that itself). At batch 1 a cuBLAS GEMV over a 4096² bf16 weight takes
~13 µs on an H200, so the ~3 µs input rotation alone is a fifth of that budget.
Reference: `TQLinear.dequantize`, then `F.linear` (what `codes_linear` runs off the kernel's path).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..core import MSEQuantizer
from ..kernels.codec import rotation_parts
from ..kernels.launch import multiprocessor_count
from ..kernels.lut_asm import LUT_BITS, antisymmetric_fp16, byte_permute_available, dequant_asm
from ..kernels.packed_tile import load_levels
from ..kernels.rotate import rotate
from .linear import TQLinear, kernel_group_size

LOOKUP_BITS = LUT_BITS  # codes turned into levels by byte permutation; 2-bit codes gather from the codebook
MAX_BATCH_TILE = 32  # batch rows per program (64 spills on sm_90); larger batches take more programs


@dataclass(frozen=True, eq=False)
class GroupRotation:
    """A weight quantizer's rotation in the form `kernels.rotate` reads (as it reads a `KernelCodec`)."""

    rotation: torch.Tensor  # [group_size, group_size] float32
    rotation_bf16_parts: torch.Tensor
    rotation_fp16_parts: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.rotation.device


@dataclass(frozen=True)
class GemvLaunch:
    """How a call is tiled: output rows per program, groups per loop step, programs per row block along
    the groups (1: no partial sums), Triton's warps and pipeline depth."""

    rows: int
    step_groups: int
    splits: int
    num_warps: int = 4
    num_stages: int = 2


@functools.lru_cache(maxsize=None)
def device_codec(quantizer: MSEQuantizer, device: torch.device) -> tuple[GroupRotation, torch.Tensor, str]:
    """(rotation, fp16 levels, byte-permute PTX or "") of a shared weight quantizer, built once per device."""
    levels = antisymmetric_fp16(quantizer.codebook.centroids)  # a Gaussian's levels: antisymmetric up to rounding
    lookup = dequant_asm(levels) if quantizer.bits in LOOKUP_BITS and byte_permute_available(device) else ""
    matrix = quantizer.rotation.matrix()
    rotation = GroupRotation(matrix.to(device), rotation_parts(matrix, torch.bfloat16).to(device),
                             rotation_parts(matrix, torch.float16).to(device))
    return rotation, levels.to(device), lookup


def gemv_launch(out_features: int, groups: int, batch_programs: int, num_sms: int) -> GemvLaunch:
    """64 rows per program, one group per step, no software pipelining, and the groups split so that
    there are about four programs per SM: within ~8% of the fastest tiling that
    `benchmarks/weights_gemv.py --sweep` found on an H200 for each of Llama-3.1-8B's shapes at batch 1
    (the call is bound by latency, not bandwidth: more programs keep more loads in flight)."""
    rows = 64
    row_programs = triton.cdiv(out_features, rows) * batch_programs
    splits = max(1, min(groups // 2, triton.cdiv(4 * num_sms, row_programs)))
    return GemvLaunch(rows=rows, step_groups=1, splits=splits, num_warps=4, num_stages=1)


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, norms_ptr, centroids_ptr, bias_ptr, out_ptr, out_features, groups, batch,
                 groups_per_split, stride_x_batch, GROUP_SIZE: tl.constexpr, GROUP_BYTES: tl.constexpr,
                 BITS: tl.constexpr, LUT: tl.constexpr, ROWS: tl.constexpr, BATCH_TILE: tl.constexpr,
                 STEP_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    split = tl.program_id(1)
    batch_rows = tl.program_id(2) * BATCH_TILE + tl.arange(0, BATCH_TILE)
    row_mask, batch_mask = rows < out_features, batch_rows < batch
    STEP: tl.constexpr = STEP_GROUPS * GROUP_SIZE
    columns = tl.arange(0, STEP)
    row_groups = rows.to(tl.int64) * groups
    acc = tl.zeros([ROWS, BATCH_TILE], dtype=tl.float32)
    first = split * groups_per_split
    for group in range(first, tl.minimum(first + groups_per_split, groups), STEP_GROUPS):
        # the codes of STEP_GROUPS consecutive groups of a row are one packed run of STEP coordinates
        levels = load_levels(packed_ptr + (row_groups + group) * GROUP_BYTES, row_mask, centroids_ptr, BITS,
                             STEP_GROUPS * GROUP_BYTES, STEP, LUT)
        # [BATCH_TILE, STEP], loaded along the input's contiguous rows (vector loads), transposed for the dot
        x = tl.load(x_ptr + batch_rows[:, None] * stride_x_batch + group * GROUP_SIZE + columns[None, :],
                    mask=batch_mask[:, None], other=0.0)
        if STEP_GROUPS == 1:
            norms = tl.load(norms_ptr + row_groups + group, mask=row_mask, other=0.0).to(tl.float32)
            acc += tl.dot(levels, tl.trans(x)) * norms[:, None]
        else:  # one dot over several groups: each level scaled by its group's norm first (in fp16)
            step = group + tl.arange(0, STEP_GROUPS)
            norms = tl.load(norms_ptr + row_groups[:, None] + step[None, :], mask=row_mask[:, None], other=0.0)
            scaled = tl.reshape(levels, [ROWS, STEP_GROUPS, GROUP_SIZE]) * norms[:, :, None]
            acc += tl.dot(tl.reshape(scaled, [ROWS, STEP]), tl.trans(x))
    mask = row_mask[:, None] & batch_mask[None, :]
    if PARTIAL:  # fp32 [splits, batch, out_features]
        tl.store(out_ptr + (split * batch + batch_rows[None, :]).to(tl.int64) * out_features + rows[:, None], acc,
                 mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + batch_rows[None, :].to(tl.int64) * out_features + rows[:, None],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, total, out_features, SPLITS: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out = Σ_s partial[s] (+ bias), in split order: the same sum whatever ran first."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        acc += tl.load(partial_ptr + split * total + offsets, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offsets % out_features, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def tq_linear_gemv(x: torch.Tensor, layer: TQLinear) -> torch.Tensor:
    """layer(x) for x [..., in_features] (fp16/bf16/fp32), computed from the codes; same dtype as x."""
    if not isinstance(layer, TQLinear):
        raise TypeError(f"expected a TQLinear, got {type(layer).__name__}")
    return codes_gemv(x, layer.packed, layer.norms, layer.quantizer, layer.bias)


def codes_gemv(x: torch.Tensor, packed: torch.Tensor, norms: torch.Tensor, quantizer: MSEQuantizer,
               bias: torch.Tensor | None = None, launch: GemvLaunch | None = None) -> torch.Tensor:
    """x·Wᵀ (+ bias) from `packed` [out, groups, bytes] codes and fp16 `norms` [out, groups]; x's dtype.
    `launch` overrides `gemv_launch` (a benchmark's sweep)."""
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
    x = x.reshape(-1, groups, group_size)
    batch = x.shape[0]
    out = torch.empty(batch, out_features, dtype=x.dtype, device=x.device)
    if batch == 0:
        return out.reshape(*lead, out_features)
    rotation, levels, lookup = device_codec(quantizer, x.device)
    # fp16 operands for the tensor cores: the rotated input keeps 11 significant bits (bf16 inputs have 8)
    rotated = rotate(x, rotation, out=torch.empty(x.shape, dtype=torch.float16, device=x.device))
    batch_tile = min(MAX_BATCH_TILE, max(16, triton.next_power_of_2(batch)))
    batch_programs = triton.cdiv(batch, batch_tile)
    launch = launch or gemv_launch(out_features, groups, batch_programs, multiprocessor_count(x.device))
    step_groups = launch.step_groups if groups % launch.step_groups == 0 else 1
    groups_per_split = triton.cdiv(triton.cdiv(groups, launch.splits), step_groups) * step_groups
    splits = triton.cdiv(groups, groups_per_split)
    partial = torch.empty(splits, batch, out_features, dtype=torch.float32, device=x.device) if splits > 1 else out
    _gemv_kernel[(triton.cdiv(out_features, launch.rows), splits, batch_programs)](
        rotated, packed, norms, levels, bias if bias is not None else norms, partial, out_features, groups, batch,
        groups_per_split, in_features, GROUP_SIZE=group_size, GROUP_BYTES=packed.shape[-1], BITS=quantizer.bits,
        LUT=lookup, ROWS=launch.rows, BATCH_TILE=batch_tile, STEP_GROUPS=step_groups, HAS_BIAS=bias is not None,
        PARTIAL=splits > 1, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(out.numel(), block),)](
            partial, bias if bias is not None else partial, out, out.numel(), out_features, SPLITS=splits,
            HAS_BIAS=bias is not None, BLOCK=block,
        )
    return out.reshape(*lead, out_features)
