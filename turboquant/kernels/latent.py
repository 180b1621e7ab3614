"""An MLA latent cache (DeepSeek-V2/V3): per token the latent kv_c, TurboQuant-compressed, and the shared
RoPE key k_pe, kept exact. A paged cache is uint8 [num_blocks, page_bytes]; a page holds `block_size`
tokens as three contiguous regions:

    kv_c codes  [block_size, code_bytes]   packed b-bit indices of the rotated, normalized kv_c
    kv_c norms  [block_size] float32
    k_pe        [block_size, rope_dim]     in `rope_dtype`

Absorbed MLA decode reads kv_c twice, as the key of the no-RoPE part and as the value, so one read of
its codes serves both: scores = scale · (q_latent · kv_c + q_pe · k_pe), output = Σ p · kv_c (latent
space; the caller applies W_UV). As for per-head caches (`decode.py`), q_latent is rotated once, kv_c
is never un-rotated, and the weighted sum is un-rotated once per head.
Prefill attends to a compressed context through `latent_gather`, which writes kv_c (dequantized,
un-rotated) and k_pe contiguous, the form MLA's up-projection and FlashAttention read.
References: `reference.latent_store_reference`, `reference.latent_decode_reference`,
`reference.latent_gather_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..core import MSEQuantizer, TurboQuantConfig
from ..core.config import NORM_BYTES
from ..core.packing import code_order, packed_bytes
from .codec import PackedBits, rotation_operands
from .decode import default_num_splits, reduce_splits
from .gather import GATHER_COLUMNS, GATHER_ROWS, _gather_rows
from .launch import (FLOAT_DTYPES, check_block_table, check_codec_device, check_device_tensor, head_dim_pad,
                     multiprocessor_count)
from .lut_asm import LUT_BITS, byte_permute_available, code_levels_fp16, dequant_asm
from .packed_tile import load_levels, load_norms
from .rotate import rotate, rotation_columns, rotation_operand
from .softmax import online_softmax_step
from .store import _load_rows, _quantize_block, _safe_divide, _slots

HEADS_PER_PROGRAM = 16  # query heads that share one read of a latent tile (tl.dot needs 16 rows)


def latent_token_bytes(latent_dim: int, rope_dim: int, bits: int) -> int:
    """Bytes one token takes in a latent page: its kv_c codes, fp32 norm and 16-bit k_pe."""
    return packed_bytes(latent_dim, bits) + NORM_BYTES + 2 * rope_dim


@dataclass(frozen=True)
class LatentLayout:
    latent_dim: int
    rope_dim: int
    bits: int
    block_size: int
    rope_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("latent_dim", "rope_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.block_size % NORM_BYTES:
            raise ValueError(f"block_size must be a multiple of {NORM_BYTES}, got {self.block_size}")
        if self.rope_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"rope_dtype must be float16 or bfloat16, got {self.rope_dtype}")
        PackedBits.of(self.bits)
        packed_bytes(self.latent_dim, self.bits)  # raises when the latent does not pack

    @property
    def head_dim(self) -> int:  # the rotated vector: what `rotate` reads
        return self.latent_dim

    @property
    def code_bytes(self) -> int:
        return packed_bytes(self.latent_dim, self.bits)

    @property
    def norms_offset(self) -> int:
        return self.block_size * self.code_bytes

    @property
    def rope_offset(self) -> int:
        return self.norms_offset + self.block_size * NORM_BYTES

    @property
    def bytes_per_token(self) -> int:
        return latent_token_bytes(self.latent_dim, self.rope_dim, self.bits)

    @property
    def page_bytes(self) -> int:
        return self.block_size * self.bytes_per_token

    def allocate(self, num_blocks: int, device) -> torch.Tensor:
        return torch.zeros(num_blocks, self.page_bytes, dtype=torch.uint8, device=device)

    def check_cache(self, cache: torch.Tensor) -> None:
        if (not isinstance(cache, torch.Tensor) or cache.dtype != torch.uint8 or cache.ndim != 2
                or cache.shape[1] != self.page_bytes or not cache.is_contiguous()):
            raise ValueError(f"cache must be a contiguous uint8 tensor [num_blocks, {self.page_bytes}], got "
                             f"{getattr(cache, 'dtype', type(cache).__name__)} {tuple(getattr(cache, 'shape', ()))}")

    def kernel_constants(self) -> dict:
        """The constexpr arguments every latent kernel takes to address a page."""
        return dict(BLOCK_SIZE=self.block_size, PAGE_BYTES=self.page_bytes, NORMS_OFFSET=self.norms_offset,
                    ROPE_OFFSET=self.rope_offset, CODE_BYTES=self.code_bytes, LATENT_DIM=self.latent_dim,
                    LATENT_PAD=head_dim_pad(self.latent_dim), ROPE_DIM=self.rope_dim,
                    ROPE_PAD=triton.next_power_of_2(self.rope_dim), ROPE_BF16=self.rope_dtype == torch.bfloat16,
                    BITS=self.bits)

    def views(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [blocks, block_size, code_bytes], norms [blocks, block_size], k_pe [blocks, block_size, rope_dim])."""
        codes = cache[:, :self.norms_offset].view(-1, self.block_size, self.code_bytes)
        norms = cache[:, self.norms_offset:self.rope_offset].view(torch.float32)
        k_pe = cache[:, self.rope_offset:].view(self.rope_dtype).view(-1, self.block_size, self.rope_dim)
        return codes, norms, k_pe


@dataclass(frozen=True, eq=False)
class LatentCodec:
    """One layer's latent codec as the device tensors the kernels read (the attribute names `rotate`
    shares with `KernelCodec`)."""

    layout: LatentLayout
    quantizer: MSEQuantizer  # the PyTorch definition the kernels are tested against
    rotation: torch.Tensor
    rotation_bf16_parts: torch.Tensor
    rotation_fp16_parts: torch.Tensor
    rotation_signs: torch.Tensor | None
    rotation_sign_scale: float
    centroids: torch.Tensor  # indexed by stored code (`core.packing.code_order`), as centroids_fp16
    boundaries: torch.Tensor
    centroids_fp16: torch.Tensor
    lut_asm: str

    @property
    def device(self) -> torch.device:
        return self.rotation.device

    @classmethod
    def from_config(cls, config: TurboQuantConfig, latent_dim: int, rope_dim: int, block_size: int,
                    rope_dtype: torch.dtype = torch.bfloat16, layer_idx: int = 0,
                    device: torch.device | str = "cpu") -> "LatentCodec":
        """kv_c takes the config's key bits (MLA's latent is what the scores read)."""
        if config.key_quantizer != "mse":
            raise ValueError("the latent kernels implement the mse quantizer only")
        layout = LatentLayout(latent_dim, rope_dim, config.key_bits, block_size, rope_dtype)
        quantizer = config.make_quantizer("key", latent_dim, layer_idx)
        levels = code_levels_fp16(quantizer.codebook.centroids)
        return cls(layout, quantizer, **rotation_operands(quantizer.rotation.matrix(), device),
                   centroids=quantizer.codebook.centroids[code_order(layout.bits)].to(device),
                   boundaries=quantizer.codebook.boundaries.to(device), centroids_fp16=levels.to(device),
                   lut_asm=dequant_asm(levels) if layout.bits in LUT_BITS else "")


@triton.jit
def _rope_ptrs(page_ptrs, offsets, ROPE_OFFSET: tl.constexpr, ROPE_DIM: tl.constexpr, ROPE_BF16: tl.constexpr):
    """Typed pointers to the k_pe row of each token at `offsets` of its page."""
    ptrs = page_ptrs + ROPE_OFFSET + offsets * (2 * ROPE_DIM)
    if ROPE_BF16:
        return ptrs.to(tl.pointer_type(tl.bfloat16))
    else:
        return ptrs.to(tl.pointer_type(tl.float16))


@triton.jit(do_not_specialize=["num_tokens"])
def _latent_store_kernel(kv_c_ptr, k_pe_ptr, slot_mapping_ptr, rotation_ptr, cache_ptr, centroids_ptr,
                         boundaries_ptr, levels_sq_ptr, num_tokens, stride_kv_c, stride_k_pe,
                         BLOCK_SIZE: tl.constexpr, PAGE_BYTES: tl.constexpr, NORMS_OFFSET: tl.constexpr,
                         ROPE_OFFSET: tl.constexpr, CODE_BYTES: tl.constexpr, LATENT_DIM: tl.constexpr,
                         LATENT_PAD: tl.constexpr, ROPE_DIM: tl.constexpr, ROPE_PAD: tl.constexpr,
                         ROPE_BF16: tl.constexpr, NORM_CORRECTION: tl.constexpr, BITS: tl.constexpr,
                         COORDS: tl.constexpr, GROUP_BYTES: tl.constexpr, PART_SCALE: tl.constexpr,
                         SIGN_SCALE: tl.constexpr, COLUMNS: tl.constexpr, ROWS: tl.constexpr):
    """One block of COLUMNS rotated coordinates of ROWS tokens per program, so the few tokens of a decode
    step still spread over the device (one program per 16 tokens took 57 µs for a 512-wide latent: 16
    column blocks in sequence). Program column 0 also stores the raw norm and k_pe; with norm correction
    each program leaves its Σ level² for `_latent_norms_kernel`."""
    tokens = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    block = tl.program_id(1)
    rows_valid, blocks, offsets = _slots(slot_mapping_ptr, tokens, num_tokens, BLOCK_SIZE)
    page_ptrs = cache_ptr + blocks * PAGE_BYTES
    x, norms, inverse_norms = _load_rows(kv_c_ptr, stride_kv_c, 0, tokens, rows_valid, 0, LATENT_DIM, LATENT_PAD)
    levels_sq = _quantize_block(x, inverse_norms, block, rotation_ptr, centroids_ptr, boundaries_ptr,
                                page_ptrs + offsets * CODE_BYTES, rows_valid, page_ptrs, rows_valid, NORM_CORRECTION,
                                BITS, COORDS, GROUP_BYTES, LATENT_DIM, LATENT_PAD, PART_SCALE, SIGN_SCALE, COLUMNS,
                                ROWS, False)  # no exact ring: its pointers are never written
    if NORM_CORRECTION:
        tl.store(levels_sq_ptr + tokens * (LATENT_PAD // COLUMNS) + block, levels_sq, mask=tokens < num_tokens)
    if block == 0:
        tl.store((page_ptrs + NORMS_OFFSET + offsets * 4).to(tl.pointer_type(tl.float32)), norms, mask=rows_valid)
        dims = tl.arange(0, ROPE_PAD)
        mask = rows_valid[:, None] & (dims < ROPE_DIM)[None, :]
        k_pe = tl.load(k_pe_ptr + tokens[:, None] * stride_k_pe + dims[None, :], mask=mask)
        rope_ptrs = _rope_ptrs(page_ptrs, offsets, ROPE_OFFSET, ROPE_DIM, ROPE_BF16)
        tl.store(rope_ptrs[:, None] + dims[None, :], k_pe, mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _latent_norms_kernel(slot_mapping_ptr, cache_ptr, levels_sq_ptr, num_tokens, BLOCK_SIZE: tl.constexpr,
                         PAGE_BYTES: tl.constexpr, NORMS_OFFSET: tl.constexpr, BLOCKS: tl.constexpr,
                         ROWS: tl.constexpr):
    """Norm correction: stored norm = ‖x‖ / ‖levels‖, the column blocks' Σ level² summed in a fixed order."""
    tokens = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rows_valid, blocks, offsets = _slots(slot_mapping_ptr, tokens, num_tokens, BLOCK_SIZE)
    columns = tl.arange(0, BLOCKS)
    levels_sq = tl.sum(tl.load(levels_sq_ptr + tokens[:, None] * BLOCKS + columns[None, :],
                               mask=rows_valid[:, None], other=1.0), axis=1)
    norm_ptrs = (cache_ptr + blocks * PAGE_BYTES + NORMS_OFFSET + offsets * 4).to(tl.pointer_type(tl.float32))
    norms = tl.load(norm_ptrs, mask=rows_valid, other=0.0)
    tl.store(norm_ptrs, _safe_divide(norms, tl.sqrt(levels_sq)), mask=rows_valid)


def latent_store(kv_c: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor, cache: torch.Tensor,
                 codec: LatentCodec) -> None:
    """Write kv_c [tokens, latent_dim] (any float dtype) compressed and k_pe [tokens, rope_dim] (in the
    layout's rope_dtype) exact into `cache` at slot_mapping[i] (block · block_size + offset; negative = skip)."""
    layout = codec.layout
    layout.check_cache(cache)
    num_tokens = kv_c.shape[0] if isinstance(kv_c, torch.Tensor) else 0
    check_device_tensor(kv_c, "kv_c", FLOAT_DTYPES, (num_tokens, layout.latent_dim), cache.device)
    check_device_tensor(k_pe, "k_pe", (layout.rope_dtype,), (num_tokens, layout.rope_dim), cache.device)
    check_device_tensor(slot_mapping, "slot_mapping", (torch.int32, torch.int64), (num_tokens,), cache.device)
    check_codec_device(codec, cache)
    if num_tokens == 0:
        return
    rows = 16
    packing = PackedBits.of(layout.bits)
    rotation, part_scale, sign_scale = rotation_operand(codec, kv_c.dtype)
    pad = head_dim_pad(layout.latent_dim)
    # a 512-wide latent: narrower rotation tiles over 8 warps (wider ones spill, checked with ptxas for sm_90)
    columns = 32 if pad >= 512 else rotation_columns(pad, part_scale)
    norm_correction = codec.quantizer.norm_correction
    levels_sq = torch.empty(num_tokens, pad // columns, device=cache.device, dtype=torch.float32)
    _latent_store_kernel[(triton.cdiv(num_tokens, rows), pad // columns)](
        kv_c, k_pe, slot_mapping, rotation, cache, codec.centroids, codec.boundaries, levels_sq, num_tokens,
        kv_c.stride(0), k_pe.stride(0), **layout.kernel_constants(), NORM_CORRECTION=norm_correction,
        COORDS=packing.coords, GROUP_BYTES=packing.group_bytes, PART_SCALE=part_scale, SIGN_SCALE=sign_scale,
        COLUMNS=columns, ROWS=rows,
        num_warps=8 if pad >= 512 else 4,
    )
    if norm_correction:
        _latent_norms_kernel[(triton.cdiv(num_tokens, 64),)](
            slot_mapping, cache, levels_sq, num_tokens, BLOCK_SIZE=layout.block_size, PAGE_BYTES=layout.page_bytes,
            NORMS_OFFSET=layout.norms_offset, BLOCKS=pad // columns, ROWS=64)


@triton.jit
def _load_rope(page_ptrs, offsets, valid, ROPE_OFFSET: tl.constexpr, ROPE_DIM: tl.constexpr, ROPE_PAD: tl.constexpr,
               ROPE_BF16: tl.constexpr):
    """[rows, ROPE_PAD] k_pe of the tokens at `offsets` of their pages, in the stored dtype (0 past ROPE_DIM)."""
    rope_dims = tl.arange(0, ROPE_PAD)
    rope_ptrs = _rope_ptrs(page_ptrs, offsets, ROPE_OFFSET, ROPE_DIM, ROPE_BF16)
    return tl.load(rope_ptrs[:, None] + rope_dims[None, :], mask=valid[:, None] & (rope_dims < ROPE_DIM)[None, :],
                   other=0.0)


@triton.jit(do_not_specialize_on_alignment=("block_table_ptr", "seq_lens_ptr"))
def _latent_decode_split_kernel(
    q_latent_ptr, q_pe_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, centroids_ptr, partial_out_ptr,
    partial_lse_ptr, stride_latent_seq, stride_latent_head, stride_pe_seq, stride_pe_head, stride_table_seq, scale,
    NUM_HEADS: tl.constexpr, HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PAGE_BYTES: tl.constexpr, NORMS_OFFSET: tl.constexpr, ROPE_OFFSET: tl.constexpr, CODE_BYTES: tl.constexpr,
    LATENT_DIM: tl.constexpr, LATENT_PAD: tl.constexpr, ROPE_DIM: tl.constexpr, ROPE_PAD: tl.constexpr,
    ROPE_BF16: tl.constexpr, BITS: tl.constexpr, LUT: tl.constexpr, TILE: tl.constexpr,
):
    seq, head_block, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), TILE) * TILE
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    heads = head_block * HEADS + tl.arange(0, HEADS)
    head_mask = heads < NUM_HEADS
    dims = tl.arange(0, LATENT_PAD)
    rope_dims = tl.arange(0, ROPE_PAD)
    q_latent = tl.load(q_latent_ptr + seq * stride_latent_seq + heads[:, None] * stride_latent_head + dims[None, :],
                       mask=head_mask[:, None] & (dims < LATENT_DIM)[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + seq * stride_pe_seq + heads[:, None] * stride_pe_head + rope_dims[None, :],
                   mask=head_mask[:, None] & (rope_dims < ROPE_DIM)[None, :], other=0.0)
    q_latent = (q_latent.to(tl.float32) * scale).to(tl.float16)
    q_pe = (q_pe.to(tl.float32) * scale).to(tl.float16)

    running_max = tl.full([HEADS], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([HEADS], dtype=tl.float32)
    acc = tl.zeros([HEADS, LATENT_PAD], dtype=tl.float32)
    table_ptr = block_table_ptr + seq * stride_table_seq
    for start in range(lo, hi, TILE):
        tokens = start + tl.arange(0, TILE)
        valid = tokens < hi
        blocks = tl.load(table_ptr + tokens // BLOCK_SIZE, mask=valid, other=0)
        page_ptrs = cache_ptr + blocks.to(tl.int64) * PAGE_BYTES
        offsets = tokens % BLOCK_SIZE
        latent = load_levels(page_ptrs + offsets * CODE_BYTES, valid, centroids_ptr, BITS, CODE_BYTES, LATENT_PAD,
                             LUT)
        norms = load_norms(page_ptrs + NORMS_OFFSET + offsets * 4, valid)
        k_pe = _load_rope(page_ptrs, offsets, valid, ROPE_OFFSET, ROPE_DIM, ROPE_PAD, ROPE_BF16)
        scores = tl.dot(q_latent, tl.trans(latent)) * norms[None, :] + tl.dot(q_pe, tl.trans(k_pe.to(tl.float16)))
        scores = tl.where(valid[None, :], scores * 1.4426950408889634, float("-inf"))  # log2 units
        probs, correction, new_max, running_sum = online_softmax_step(scores, running_max, running_sum)
        acc = acc * correction[:, None] + tl.dot((probs * norms[None, :]).to(tl.float16), latent)
        running_max = new_max

    partial = (seq * NUM_HEADS + heads) * NUM_SPLITS + split
    out = acc / tl.maximum(running_sum, 1e-30)[:, None]
    tl.store(partial_out_ptr + partial[:, None] * LATENT_PAD + dims[None, :], out, mask=head_mask[:, None])
    lse = tl.where(running_sum > 0, running_max + tl.log2(tl.maximum(running_sum, 1e-30)), float("-inf"))
    tl.store(partial_lse_ptr + partial, lse, mask=head_mask)


def latent_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, codec: LatentCodec,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                  return_lse: bool = False, rotated: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode: q_latent [batch, heads, latent_dim] and q_pe [batch, heads, rope_dim] (the
    token at position seq_len − 1) → the attention-weighted kv_c [batch, heads, latent_dim] in q_latent's
    dtype (and the fp32 log-sum-exp [batch, heads]). block_table int32 [batch, max_blocks], seq_lens int32
    [batch]; a CUDA graph must fix `num_splits`. `rotated`: q_latent is already in the codes' space
    (q_latent · Rᵀ) and the result stays there, for a caller that folded R into its projections."""
    layout = codec.layout
    layout.check_cache(cache)
    check_codec_device(codec, cache)
    if not isinstance(q_latent, torch.Tensor) or q_latent.ndim != 3 or q_latent.shape[-1] != layout.latent_dim:
        raise ValueError(f"q_latent must be [batch, heads, {layout.latent_dim}], got "
                         f"{tuple(getattr(q_latent, 'shape', ())) or type(q_latent).__name__}")
    check_device_tensor(q_latent, "q_latent", FLOAT_DTYPES, None, cache.device)
    batch, num_heads = q_latent.shape[:2]
    check_device_tensor(q_pe, "q_pe", FLOAT_DTYPES, (batch, num_heads, layout.rope_dim), cache.device)
    check_block_table(block_table, seq_lens, batch, cache.device)
    pad = head_dim_pad(layout.latent_dim)
    tile = 16 if pad >= 512 else 32
    head_blocks = triton.cdiv(num_heads, HEADS_PER_PROGRAM)
    if num_splits is None:
        num_splits = default_num_splits(batch, head_blocks, block_table.shape[1] * layout.block_size, tile,
                                        multiprocessor_count(cache.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits!r}")
    rotated_query = q_latent if rotated else rotate(q_latent, codec)  # kv_c stays in the rotated space
    partial_out = torch.empty(batch, num_heads, num_splits, pad, device=cache.device, dtype=torch.float32)
    partial_lse = torch.empty(batch, num_heads, num_splits, device=cache.device, dtype=torch.float32)
    _latent_decode_split_kernel[(batch, head_blocks, num_splits)](
        rotated_query, q_pe, cache, block_table, seq_lens, codec.centroids_fp16, partial_out, partial_lse,
        rotated_query.stride(0), rotated_query.stride(1), q_pe.stride(0), q_pe.stride(1), block_table.stride(0),
        float(scale), NUM_HEADS=num_heads, HEADS=HEADS_PER_PROGRAM, NUM_SPLITS=num_splits,
        **layout.kernel_constants(), LUT=codec.lut_asm if byte_permute_available(cache.device) else "", TILE=tile,
        # 512 wide: one stage (116 registers, not 230) ran 1.0–1.5x faster on an H100
        num_warps=8 if pad >= 512 else 4, num_stages=1 if pad >= 512 else 3,
    )
    out_dtype = q_latent.dtype if rotated else torch.float32  # un-rotating an fp32 sum keeps its accuracy
    rotated_out = torch.empty(batch, num_heads, layout.latent_dim, device=cache.device, dtype=out_dtype)
    lse = torch.empty(batch, num_heads, device=cache.device, dtype=torch.float32) if return_lse else None
    # a 512-wide rotation is too large to un-rotate inside the reduction's programs: its own launch below
    reduce_splits(partial_out, partial_lse, rotated_out, lse)
    out = rotated_out if rotated else rotate(rotated_out, codec, inverse=True, out=torch.empty_like(q_latent))
    return (out, lse) if return_lse else out


@triton.jit(do_not_specialize_on_alignment=("block_table_ptr", "cu_seq_lens_ptr", "seq_starts_ptr"))
def _latent_gather_kernel(cache_ptr, block_table_ptr, cu_seq_lens_ptr, seq_starts_ptr, rotation_ptr, centroids_ptr,
                          out_kv_c_ptr, out_k_pe_ptr, stride_table_seq, stride_out_kv_c, stride_out_k_pe,
                          BLOCK_SIZE: tl.constexpr, PAGE_BYTES: tl.constexpr, NORMS_OFFSET: tl.constexpr,
                          ROPE_OFFSET: tl.constexpr, CODE_BYTES: tl.constexpr, LATENT_DIM: tl.constexpr,
                          LATENT_PAD: tl.constexpr, ROPE_DIM: tl.constexpr, ROPE_PAD: tl.constexpr,
                          ROPE_BF16: tl.constexpr, BITS: tl.constexpr, LUT: tl.constexpr, USE_STARTS: tl.constexpr,
                          COLUMNS: tl.constexpr, ROWS: tl.constexpr):
    seq, tile = tl.program_id(0), tl.program_id(1)
    first_row = tl.load(cu_seq_lens_ptr + seq)
    length = tl.load(cu_seq_lens_ptr + seq + 1) - first_row
    if tile * ROWS < length:
        positions = tile * ROWS + tl.arange(0, ROWS)
        valid = positions < length
        tokens = positions
        if USE_STARTS:
            tokens = positions + tl.load(seq_starts_ptr + seq)
        blocks = tl.load(block_table_ptr + seq * stride_table_seq + tokens // BLOCK_SIZE, mask=valid, other=0)
        page_ptrs = cache_ptr + blocks.to(tl.int64) * PAGE_BYTES
        offsets = tokens % BLOCK_SIZE
        rows = (first_row + positions).to(tl.int64)
        kv_c_ptrs = out_kv_c_ptr + rows * stride_out_kv_c
        _gather_rows(page_ptrs + offsets * CODE_BYTES, valid, centroids_ptr, page_ptrs + NORMS_OFFSET + offsets * 4,
                     kv_c_ptrs, positions < 0, kv_c_ptrs, valid, rotation_ptr, kv_c_ptrs, kv_c_ptrs, positions < 0,
                     BITS, CODE_BYTES, LUT, LATENT_DIM, LATENT_PAD, COLUMNS, False)  # no exact ring
        k_pe = _load_rope(page_ptrs, offsets, valid, ROPE_OFFSET, ROPE_DIM, ROPE_PAD, ROPE_BF16)
        rope_dims = tl.arange(0, ROPE_PAD)
        mask = valid[:, None] & (rope_dims < ROPE_DIM)[None, :]
        tl.store(out_k_pe_ptr + rows[:, None] * stride_out_k_pe + rope_dims[None, :],
                 k_pe.to(out_k_pe_ptr.dtype.element_ty), mask=mask)


def latent_gather(cache: torch.Tensor, codec: LatentCodec, block_table: torch.Tensor, cu_seq_lens: torch.Tensor,
                  max_len: int, out_kv_c: torch.Tensor, out_k_pe: torch.Tensor,
                  seq_starts: torch.Tensor | None = None) -> None:
    """Sequence i's cached tokens seq_starts[i] (0 without `seq_starts`) onward, cu_seq_lens[i + 1] −
    cu_seq_lens[i] of them, are written to rows cu_seq_lens[i]: of out_kv_c [rows, latent_dim] (kv_c
    dequantized and un-rotated, any float dtype) and out_k_pe [rows, rope_dim] (as stored, cast).
    cu_seq_lens int32 [batch + 1], seq_starts int32 [batch]; `max_len` bounds the lengths (the grid)."""
    layout = codec.layout
    layout.check_cache(cache)
    check_codec_device(codec, cache)
    batch = block_table.shape[0] if isinstance(block_table, torch.Tensor) and block_table.ndim == 2 else -1
    if batch < 0:
        raise ValueError("block_table must be an int32 tensor [batch, max_blocks_per_seq]")
    check_device_tensor(block_table, "block_table", (torch.int32,), None, cache.device)
    check_device_tensor(cu_seq_lens, "cu_seq_lens", (torch.int32,), (batch + 1,), cache.device)
    if seq_starts is not None:
        check_device_tensor(seq_starts, "seq_starts", (torch.int32,), (batch,), cache.device)
    num_rows = out_kv_c.shape[0] if isinstance(out_kv_c, torch.Tensor) else 0
    check_device_tensor(out_kv_c, "out_kv_c", FLOAT_DTYPES, (num_rows, layout.latent_dim), cache.device)
    check_device_tensor(out_k_pe, "out_k_pe", FLOAT_DTYPES, (num_rows, layout.rope_dim), cache.device)
    if batch == 0 or max_len <= 0:
        return
    pad = head_dim_pad(layout.latent_dim)
    lut = codec.lut_asm if layout.bits == 4 and byte_permute_available(cache.device) else ""  # as gather.py
    rows = 32 if pad >= 512 else GATHER_ROWS  # a 512-wide latent in 64-row tiles spills (ptxas, sm_90)
    _latent_gather_kernel[(batch, triton.cdiv(max_len, rows))](
        cache, block_table, cu_seq_lens, cu_seq_lens if seq_starts is None else seq_starts,
        codec.rotation_fp16_parts[0], codec.centroids_fp16, out_kv_c, out_k_pe, block_table.stride(0),
        out_kv_c.stride(0), out_k_pe.stride(0), **layout.kernel_constants(), LUT=lut,
        USE_STARTS=seq_starts is not None, COLUMNS=min(GATHER_COLUMNS, pad), ROWS=rows, num_warps=4, num_stages=1,
    )
