"""Small-batch matmul over TurboQuant weight codes (Triton): y = x·Wᵀ without ever building W.

Because the rotation is orthogonal, W·x = Σ_g norm_g · levels(idx_g) · (R·x_g): the input is rotated
once per group (`kernels.rotate`, one launch for the whole batch, written in fp16) and the kernels read
each row's packed codes once. Two kernels, picked by `gemv_launch`:
- FMA (decode, up to FMA_MAX_BATCH input rows; one program per row): a thread looks up a run of eight
  levels by byte permutation and multiplies them with the eight input coordinates in one piece of PTX
  (`lut_asm.dot_asm`: fp16 pairs, four-term sums, then fp32), scales by the group norm and keeps fp32
  sums per row.
- Tensor cores (more rows): a program turns a tile of 64 rows' codes into fp16 levels
  (`packed_tile.code_levels`) and multiplies them with up to 32 batch rows (fp32 accumulation).
Both loops load each step's codes one step ahead. Where the groups are split over several programs, a
last launch adds their fp32 partial sums in a fixed order, with the bias, in x's dtype (otherwise the
kernel writes that itself). On Hopper the launches are chained (programmatic dependent launch): a
kernel reads its first codes while the rotation still runs, and waits for it (`gdc_wait`) only before
reading x. At batch 1 a cuBLAS GEMV over a 4096² bf16 weight takes ~13 µs on an H200; the rotation takes
~3 µs on its own.
The rotated input is fp16: its coordinates (and the FMA kernel's four-term sums) must stay below
65,504, which an input coordinate of some 60,000 or more can break.
Reference: `TQLinear.dequantize`, then `F.linear` (what `codes_linear` runs off the kernel's path).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..core import MSEQuantizer
from ..kernels.codec import rotation_operands
from ..kernels.launch import multiprocessor_count, programmatic_launch, programmatic_launch_available
from ..kernels.lut_asm import LUT_BITS, byte_permute_available, code_levels_fp16, dequant_asm, dot_asm
from ..kernels.packed_tile import (code_levels, load_codes, load_runs, load_runs3_vectors, quarters, run_levels,
                                   runs_levels)
from ..kernels.rotate import rotate
from .linear import TQLinear, kernel_group_size

LOOKUP_BITS = LUT_BITS  # codes turned into levels by byte permutation; 2-bit codes gather from the codebook
MAX_BATCH_TILE = 32  # batch rows per program (64 spills on sm_90); larger batches take more programs
FMA_MAX_BATCH = 2  # at most this many input rows: the FMA kernel (one program per row, codes re-read from L2)


@dataclass(frozen=True, eq=False)
class GroupRotation:
    """A weight quantizer's rotation in the form `kernels.rotate` reads (as it reads a `KernelCodec`)."""

    rotation: torch.Tensor  # [group_size, group_size] float32
    rotation_bf16_parts: torch.Tensor
    rotation_fp16_parts: torch.Tensor
    rotation_signs: torch.Tensor | None
    rotation_sign_scale: float

    @property
    def device(self) -> torch.device:
        return self.rotation.device


@dataclass(frozen=True)
class GemvLaunch:
    """How a call is tiled: output rows per program, groups per loop step, programs per row block along
    the groups (1: no partial sums), Triton's warps and pipeline depth, and which kernel: tensor cores
    (a tile of 16 or 32 batch rows per program) or CUDA-core FMAs (one batch row per program)."""

    rows: int
    step_groups: int
    splits: int
    num_warps: int = 4
    num_stages: int = 2
    tensor_cores: bool = True
    batch_tile: int | None = None  # tensor cores: batch rows per program (None: 16 or 32, whichever holds the batch)


@dataclass(frozen=True, eq=False)
class DeviceCodec:
    """A shared weight quantizer's constants on one device: its rotation, fp16 levels, and (where PTX
    runs) the byte-permute lookup of the tensor-core kernel and the lookup-and-dot of the FMA kernel."""

    rotation: GroupRotation
    levels: torch.Tensor
    lookup: str
    lookup_dot: str


@functools.lru_cache(maxsize=None)
def device_codec(quantizer: MSEQuantizer, device: torch.device) -> DeviceCodec:
    """`DeviceCodec` of a shared weight quantizer, built once per device."""
    levels = code_levels_fp16(quantizer.codebook.centroids)  # a Gaussian's levels: antisymmetric up to rounding
    ptx = quantizer.bits in LOOKUP_BITS and byte_permute_available(device)
    rotation = GroupRotation(**rotation_operands(quantizer.rotation.matrix(), device))
    return DeviceCodec(rotation, levels.to(device), dequant_asm(levels) if ptx else "", dot_asm(levels) if ptx else "")


def gemv_launch(out_features: int, groups: int, group_size: int, batch: int, num_sms: int, *, bits: int,
                tensor_cores: bool | None = None) -> GemvLaunch:
    """Up to FMA_MAX_BATCH input rows (and groups of at least 32 coordinates): the FMA kernel, 4 rows per
    program, 4 warps, 2,048 coordinates per step, the groups split only where there are fewer than about
    eight programs per SM: within ~6% of the fastest tiling that `benchmarks/weights_gemv.py --sweep fma`
    found for each of Llama-3.1-8B's shapes and both bit widths on an H200. Larger batches: the tensor
    cores, 64 rows per program, 4 warps; 4-bit codes one group per step and about four programs per SM;
    3-bit codes of 128-coordinate groups two groups per step (16-byte loads, `vector_codes`), about four
    programs per SM up to 16 rows (`--sweep mma --sweep-batches 8`: fastest at every shape) and about two
    above, where every split's fp32 partial sums are another [batch, out_features] to write and read
    (`--sweep-batches 32`: fastest or within ~5%). The calls are bound by latency: more programs keep
    more loads in flight. `tensor_cores` overrides the choice of kernel."""
    fma = batch <= FMA_MAX_BATCH and group_size >= 32 if tensor_cores is None else not tensor_cores
    if fma:
        step = 1
        while step * 2 * group_size <= 2048 and groups % (step * 2) == 0:
            step *= 2
        row_programs = triton.cdiv(out_features, 4) * batch
        splits = max(1, min(groups // step, 8 * num_sms // row_programs))
        return GemvLaunch(rows=4, step_groups=step, splits=splits, num_warps=4, num_stages=1, tensor_cores=False)
    row_programs = triton.cdiv(out_features, 64) * triton.cdiv(batch, MAX_BATCH_TILE)
    if bits == 3 and groups % 2 == 0 and vector_codes(64, 2 * group_size, num_warps=4):
        per_sm = 4 if batch <= 16 else 2
        splits = max(1, min(groups // 2, round(per_sm * num_sms / row_programs)))
        return GemvLaunch(rows=64, step_groups=2, splits=splits, num_warps=4, num_stages=1)
    splits = max(1, min(groups // 2, triton.cdiv(4 * num_sms, row_programs)))
    return GemvLaunch(rows=64, step_groups=1, splits=splits, num_warps=4, num_stages=1)


def vector_codes(rows: int, step: int, num_warps: int) -> bool:
    """Whether the tensor-core kernel reads a step of 3-bit codes (`rows` × `step` coordinates) in
    16-byte vectors (`packed_tile.load_runs3_vectors`): the step must hold whole 128-coordinate blocks,
    at least two (one block a row compiles to 16-bit shared-memory stores of the levels), and give every
    thread a whole vector (fewer split the vectors between threads, which then trade words through shared
    memory). Otherwise each word is its own 4-byte load."""
    blocks = step // 128
    return step % 128 == 0 and blocks >= 2 and rows * blocks >= 32 * num_warps


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, norms_ptr, centroids_ptr, bias_ptr, out_ptr, out_features, groups, batch,
                 groups_per_split, stride_x_batch, GROUP_SIZE: tl.constexpr, GROUP_BYTES: tl.constexpr,
                 BITS: tl.constexpr, LUT: tl.constexpr, ROWS: tl.constexpr, BATCH_TILE: tl.constexpr,
                 STEP_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                 WAIT_FOR_INPUT: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr, VECTOR_CODES: tl.constexpr):
    """A tile of ROWS output rows × BATCH_TILE batch rows on the tensor cores. Each step's codes, norms
    and input are loaded one step ahead (the loop is bound by their latency, and Triton does not pipeline
    loads that feed inline asm). WAIT_FOR_INPUT: launched programmatically after the rotation, so wait for
    it before reading x; LAUNCH_DEPENDENTS: let the sum of the partial sums launch early."""
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    split = tl.program_id(1)
    batch_rows = tl.program_id(2) * BATCH_TILE + tl.arange(0, BATCH_TILE)
    row_mask, batch_mask = rows < out_features, batch_rows < batch
    row_groups = rows.to(tl.int64) * groups
    x_rows = x_ptr + batch_rows[:, None] * stride_x_batch
    acc = tl.zeros([ROWS, BATCH_TILE], dtype=tl.float32)
    first = split * groups_per_split
    last = tl.minimum(first + groups_per_split, groups)
    codes, norms = _mma_step_codes(packed_ptr, norms_ptr, rows, row_groups, row_mask, first, last, GROUP_SIZE,
                                   GROUP_BYTES, BITS, LUT, STEP_GROUPS, VECTOR_CODES)
    if WAIT_FOR_INPUT:
        gdc_wait()
    x = _mma_step_input(x_rows, batch_mask, first, last, GROUP_SIZE, STEP_GROUPS)
    for group in range(first, last, STEP_GROUPS):
        next_codes, next_norms = _mma_step_codes(packed_ptr, norms_ptr, rows, row_groups, row_mask,
                                                 group + STEP_GROUPS, last, GROUP_SIZE, GROUP_BYTES, BITS, LUT,
                                                 STEP_GROUPS, VECTOR_CODES)
        next_x = _mma_step_input(x_rows, batch_mask, group + STEP_GROUPS, last, GROUP_SIZE, STEP_GROUPS)
        # the codes of STEP_GROUPS consecutive groups of a row are one packed run of STEP coordinates
        if VECTOR_CODES:
            levels = runs_levels(codes, centroids_ptr, BITS, LUT)
        else:
            levels = code_levels(codes, centroids_ptr, BITS, LUT)
        if STEP_GROUPS == 1:
            acc += tl.dot(levels, tl.trans(x)) * norms.to(tl.float32)
        else:  # one dot over several groups: each level scaled by its group's norm first (in fp16)
            scaled = tl.reshape(levels, [ROWS, STEP_GROUPS, GROUP_SIZE]) * norms[:, :, None]
            acc += tl.dot(tl.reshape(scaled, [ROWS, STEP_GROUPS * GROUP_SIZE]), tl.trans(x))
        codes, norms, x = next_codes, next_norms, next_x
    _store_tile(out_ptr, bias_ptr, acc, rows, batch_rows, split, batch, out_features, row_mask, batch_mask, HAS_BIAS,
                PARTIAL)


@triton.jit
def _mma_step_codes(packed_ptr, norms_ptr, rows, row_groups, row_mask, group, last, GROUP_SIZE: tl.constexpr,
                    GROUP_BYTES: tl.constexpr, BITS: tl.constexpr, LUT: tl.constexpr, STEP_GROUPS: tl.constexpr,
                    VECTOR_CODES: tl.constexpr):
    """The codes one step of `_gemv_kernel` reads at `group` (nothing from `last` on), as `load_codes`
    returns them (3-bit codes by `load_runs3_vectors` where `vector_codes` allows), and the norms:
    [ROWS, 1] for one group a step, else [ROWS, STEP_GROUPS]."""
    mask = row_mask & (rows * 0 + group < last)  # a tensor comparison: the interpreter ands a scalar bool as int
    if VECTOR_CODES:
        codes = load_runs3_vectors(packed_ptr + (row_groups + group) * GROUP_BYTES, mask, STEP_GROUPS * GROUP_BYTES,
                                   STEP_GROUPS * GROUP_SIZE)
    else:
        codes = load_codes(packed_ptr + (row_groups + group) * GROUP_BYTES, mask, BITS, STEP_GROUPS * GROUP_BYTES,
                           STEP_GROUPS * GROUP_SIZE, LUT)
    steps = group + tl.arange(0, STEP_GROUPS)
    norms = tl.load(norms_ptr + row_groups[:, None] + steps[None, :], mask=mask[:, None], other=0.0)
    return codes, norms


@triton.jit
def _mma_step_input(x_rows, batch_mask, group, last, GROUP_SIZE: tl.constexpr, STEP_GROUPS: tl.constexpr):
    """The rotated input one step reads at `group`: [BATCH_TILE, STEP] along its contiguous rows (vector
    loads), transposed for the dot by the caller."""
    columns = tl.arange(0, STEP_GROUPS * GROUP_SIZE)
    mask = batch_mask & (batch_mask.to(tl.int32) * 0 + group < last)
    return tl.load(x_rows + group * GROUP_SIZE + columns[None, :], mask=mask[:, None], other=0.0)


@triton.jit
def _fp16_pair(pair, HIGH: tl.constexpr):
    """One fp16 half of int32 words holding two (the low half first in memory), as fp32."""
    half = (pair >> 16) if HIGH else pair
    return (half & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _run_dot(run, pairs, centroids_ptr, BITS: tl.constexpr, LUT_DOT: tl.constexpr):
    """Σ_k level_k · x_k over runs of eight packed indices: run [ROWS, Q], the eight input coordinates as
    four [Q] int32 fp16 pairs → [ROWS, Q] fp32. By `lut_asm.dot_asm`, or without its PTX in fp32."""
    p0, p1, p2, p3 = quarters(pairs)
    if LUT_DOT == "":
        levels = run_levels(run, centroids_ptr, BITS, LUT_DOT)
        total = levels[0].to(tl.float32) * _fp16_pair(p0, False)[None, :]
        total += levels[1].to(tl.float32) * _fp16_pair(p0, True)[None, :]
        total += levels[2].to(tl.float32) * _fp16_pair(p1, False)[None, :]
        total += levels[3].to(tl.float32) * _fp16_pair(p1, True)[None, :]
        total += levels[4].to(tl.float32) * _fp16_pair(p2, False)[None, :]
        total += levels[5].to(tl.float32) * _fp16_pair(p2, True)[None, :]
        total += levels[6].to(tl.float32) * _fp16_pair(p3, False)[None, :]
        total += levels[7].to(tl.float32) * _fp16_pair(p3, True)[None, :]
        return total
    else:
        return tl.inline_asm_elementwise(LUT_DOT, "=r,r,r,r,r,r", [run, p0[None, :], p1[None, :], p2[None, :],
                                                                      p3[None, :]],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _gemv_fma_kernel(x_ptr, packed_ptr, norms_ptr, centroids_ptr, bias_ptr, out_ptr, out_features, groups, batch,
                     groups_per_split, stride_x_batch, GROUP_SIZE: tl.constexpr, GROUP_BYTES: tl.constexpr,
                     BITS: tl.constexpr, LUT: tl.constexpr, ROWS: tl.constexpr, STEP_GROUPS: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                     WAIT_FOR_INPUT: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr):
    """One batch row per program, on the CUDA cores. A step reads the codes of STEP_GROUPS groups as runs of
    eight indices (`load_runs`), in one layout: each thread turns its runs into levels in its registers and
    multiplies them with the matching input coordinates (fp16, `lut_asm.dot_asm`), so the loop changes no
    layout and reduces nothing across threads; the fp32 sums per row are reduced once at the end.
    WAIT_FOR_INPUT: launched programmatically after the rotation, so wait for it before reading x;
    LAUNCH_DEPENDENTS: let the sum of the partial sums launch early."""
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    split = tl.program_id(1)
    batch_rows = tl.program_id(2) + tl.arange(0, 1)
    row_mask, batch_mask = rows < out_features, batch_rows < batch
    QUADS: tl.constexpr = STEP_GROUPS * GROUP_SIZE // 32  # runs of 32 coordinates per row and step
    quads = tl.arange(0, QUADS)
    quad_group = quads // (GROUP_SIZE // 32)
    row_groups = rows.to(tl.int64) * groups
    # the fp16 input read as int32 pairs of coordinates
    x_pairs = (x_ptr + tl.program_id(2).to(tl.int64) * stride_x_batch).to(tl.pointer_type(tl.int32))
    acc = tl.zeros([ROWS, QUADS], dtype=tl.float32)
    first = split * groups_per_split
    last = tl.minimum(first + groups_per_split, groups)
    # each step's loads are issued one step ahead (the loop is bound by their latency); the first codes
    # are read while the kernel before (the input rotation) may still run
    r0, r1, r2, r3, norms = _fma_step_codes(packed_ptr, norms_ptr, rows, row_groups, row_mask, quads, quad_group,
                                            first, last, GROUP_BYTES, BITS, STEP_GROUPS)
    if WAIT_FOR_INPUT:
        gdc_wait()
    pairs = _fma_step_input(x_pairs, quads, first, last, GROUP_SIZE)
    for group in range(first, last, STEP_GROUPS):
        n0, n1, n2, n3, next_norms = _fma_step_codes(packed_ptr, norms_ptr, rows, row_groups, row_mask, quads,
                                                     quad_group, group + STEP_GROUPS, last, GROUP_BYTES, BITS,
                                                     STEP_GROUPS)
        next_pairs = _fma_step_input(x_pairs, quads, group + STEP_GROUPS, last, GROUP_SIZE)
        # [QUADS, 4 runs, 4 pairs] → the pairs of run j = 2a + b as [QUADS, 4]
        even, odd = tl.split(tl.reshape(tl.permute(tl.reshape(pairs, [QUADS, 4, 4]), (0, 2, 1)), [QUADS, 4, 2, 2]))
        pairs0, pairs2 = tl.split(even)
        pairs1, pairs3 = tl.split(odd)
        total = _run_dot(r0, pairs0, centroids_ptr, BITS, LUT) + _run_dot(r1, pairs1, centroids_ptr, BITS, LUT)
        total += _run_dot(r2, pairs2, centroids_ptr, BITS, LUT) + _run_dot(r3, pairs3, centroids_ptr, BITS, LUT)
        acc += total * norms.to(tl.float32)
        r0, r1, r2, r3, pairs, norms = n0, n1, n2, n3, next_pairs, next_norms
    _store_tile(out_ptr, bias_ptr, tl.sum(acc, axis=1)[:, None], rows, batch_rows, split, batch, out_features,
                row_mask, batch_mask, HAS_BIAS, PARTIAL)


@triton.jit
def _fma_step_codes(packed_ptr, norms_ptr, rows, row_groups, row_mask, quads, quad_group, group, last,
                    GROUP_BYTES: tl.constexpr, BITS: tl.constexpr, STEP_GROUPS: tl.constexpr):
    """The codes one step of `_gemv_fma_kernel` reads at `group` (nothing from `last` on): the four runs of
    each quad and the norms [ROWS, QUADS]."""
    mask = row_mask & (rows * 0 + group < last)  # a tensor comparison: the interpreter ands a scalar bool as int
    r0, r1, r2, r3 = load_runs(packed_ptr + (row_groups + group) * GROUP_BYTES, mask, quads, BITS,
                               STEP_GROUPS * GROUP_BYTES)
    norms = tl.load(norms_ptr + row_groups[:, None] + group + quad_group[None, :], mask=mask[:, None], other=0.0)
    return r0, r1, r2, r3, norms


@triton.jit
def _fma_step_input(x_pairs, quads, group, last, GROUP_SIZE: tl.constexpr):
    """The rotated input one step reads at `group`, as [QUADS, 16] int32 pairs of fp16 coordinates."""
    columns = tl.arange(0, 16)
    return tl.load(x_pairs + group * (GROUP_SIZE // 2) + quads[:, None] * 16 + columns[None, :],
                   mask=(quads * 0 + group < last)[:, None], other=0)


@triton.jit
def _store_tile(out_ptr, bias_ptr, acc, rows, batch_rows, split, batch, out_features, row_mask, batch_mask,
                HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    """acc [ROWS, batch rows] → fp32 partial sums [splits, batch, out_features], or (no splits) the
    output, with the bias, in its dtype."""
    mask = row_mask[:, None] & batch_mask[None, :]
    if PARTIAL:
        tl.store(out_ptr + (split * batch + batch_rows[None, :]).to(tl.int64) * out_features + rows[:, None], acc,
                 mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + batch_rows[None, :].to(tl.int64) * out_features + rows[:, None],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, total, out_features, SPLITS: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, WAIT_FOR_INPUT: tl.constexpr):
    """out = Σ_s partial[s] (+ bias), in split order: the same sum whatever ran first. WAIT_FOR_INPUT:
    launched programmatically while the kernel writing the partial sums may still run."""
    if WAIT_FOR_INPUT:
        gdc_wait()
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
    codec = device_codec(quantizer, x.device)
    launch = launch or gemv_launch(out_features, groups, group_size, batch, multiprocessor_count(x.device),
                                   bits=quantizer.bits)
    if launch.batch_tile not in (None, 16, MAX_BATCH_TILE):
        raise ValueError(f"batch_tile must be 16 or {MAX_BATCH_TILE} (a tensor-core tile), got {launch.batch_tile}")
    if not launch.tensor_cores and group_size < 32:
        raise ValueError(f"the FMA kernel reads runs of 32 coordinates of one group; group_size is {group_size}")
    # fp16 operands: the rotated input keeps 11 significant bits (bf16 inputs have 8). Where the device
    # has programmatic launches the three launches are chained: each starts while the one before runs
    # (the kernels read their first codes meanwhile) and waits for it only before reading its output.
    chained = programmatic_launch_available(x.device)
    rotated = rotate(x, codec.rotation, out=torch.empty(x.shape, dtype=torch.float16, device=x.device),
                     launch_dependents=chained)
    step_groups = launch.step_groups if groups % launch.step_groups == 0 else 1
    groups_per_split = triton.cdiv(triton.cdiv(groups, launch.splits), step_groups) * step_groups
    splits = triton.cdiv(groups, groups_per_split)
    partial = torch.empty(splits, batch, out_features, dtype=torch.float32, device=x.device) if splits > 1 else out
    row_blocks = triton.cdiv(out_features, launch.rows)
    arguments = (rotated, packed, norms, codec.levels, bias if bias is not None else norms, partial, out_features,
                 groups, batch, groups_per_split, in_features)
    constants = dict(GROUP_SIZE=group_size, GROUP_BYTES=packed.shape[-1], BITS=quantizer.bits,
                     LUT=codec.lookup if launch.tensor_cores else codec.lookup_dot,
                     ROWS=launch.rows, STEP_GROUPS=step_groups, HAS_BIAS=bias is not None, PARTIAL=splits > 1,
                     WAIT_FOR_INPUT=chained, LAUNCH_DEPENDENTS=chained and splits > 1,
                     num_warps=launch.num_warps, num_stages=launch.num_stages, **programmatic_launch(chained))
    if launch.tensor_cores:
        batch_tile = launch.batch_tile or min(MAX_BATCH_TILE, max(16, triton.next_power_of_2(batch)))
        vectors = quantizer.bits == 3 and vector_codes(launch.rows, step_groups * group_size, launch.num_warps)
        _gemv_kernel[(row_blocks, splits, triton.cdiv(batch, batch_tile))](*arguments, BATCH_TILE=batch_tile,
                                                                           VECTOR_CODES=vectors, **constants)
    else:
        _gemv_fma_kernel[(row_blocks, splits, batch)](*arguments, **constants)
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(out.numel(), block),)](
            partial, bias if bias is not None else partial, out, out.numel(), out_features, SPLITS=splits,
            HAS_BIAS=bias is not None, BLOCK=block, WAIT_FOR_INPUT=chained, **programmatic_launch(chained),
        )
    return out.reshape(*lead, out_features)
