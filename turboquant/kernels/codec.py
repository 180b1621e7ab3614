"""`KernelCodec`: one layer's TurboQuant codec as the device tensors the kernels read.

The kernels implement the MSE codec only (rotation, per-coordinate Lloyd–Max levels, fp32 norms with
optional norm correction). Centering, sink tokens and full-precision windows are cache policies that
live above the kernels; a QJL (prod) key code is not implemented by the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import MSEQuantizer, TurboQuantConfig, byte_grid, code_order
from ..core.paged_layout import PagedLayout
from .lut_asm import (LUT_BITS, code_levels_fp16, dequant_asm, dequant_pairs_asm, lookup_tables, scaled_dequant_asm,
                      signed_byte_tables)

KERNEL_HEAD_DIMS = (64, 80, 96, 128, 256)
KERNEL_BITS = (2, 3, 4, 8)
# The rotation as three 16-bit parts, R = P0 + P1/s + P2/s² (`rotate.py` says why).
PART_SCALES = {torch.bfloat16: 256.0, torch.float16: 2048.0}
# Where the kernels find their table words in `KernelCodec.lut_lane_tables`: the rows of the key
# lookup's four words, of the value lookup's four, and of the key's two signed byte words.
KEY_TABLE_ROW, VALUE_TABLE_ROW, KEY_BYTE_TABLE_ROW = 0, 4, 8


@dataclass(frozen=True, eq=False)
class KernelCodec:
    layout: PagedLayout
    key_quantizer: MSEQuantizer  # the PyTorch definition the kernels are tested against
    value_quantizer: MSEQuantizer
    rotation: torch.Tensor  # [head_dim, head_dim] float32; row i is the i-th rotated coordinate
    rotation_bf16_parts: torch.Tensor  # [3, head_dim, head_dim]: see `rotation_parts`
    rotation_fp16_parts: torch.Tensor
    rotation_signs: torch.Tensor | None  # rotation = rotation_sign_scale · signs: see `sign_form`
    rotation_sign_scale: float
    # Levels are indexed by stored code (`core.packing.code_order`), boundaries ascend.
    key_centroids: torch.Tensor  # [2**key_bits] float32
    key_boundaries: torch.Tensor  # [2**key_bits - 1] float32
    value_centroids: torch.Tensor
    value_boundaries: torch.Tensor
    # Attention multiplies levels in fp16 on the tensor cores (10-bit mantissa, like tf32; finer than bf16).
    # They are made exactly antisymmetric, as the Lloyd–Max levels of a symmetric law are, so the
    # byte-permute lookup (`lut_asm.py`) can store magnitudes only (`lut_asm.code_levels_fp16`).
    key_centroids_fp16: torch.Tensor
    value_centroids_fp16: torch.Tensor
    # Byte-permute lookup PTX for 3- and 4-bit codebooks ("" otherwise), built here on the host: a
    # kernel wrapper must not read device tensors back (CUDA graph capture).
    key_lut_asm: str
    value_lut_asm: str
    # The same lookups taking the table words as inputs (`dequant_asm(..., table_inputs=True)`), for
    # kernels that load `lut_lane_tables` once (the Triton decode split kernel), and for 4-bit values in
    # the fragment decode kernel (`decode_fragments.py`) as fp16 pairs; "" where there is no lookup.
    key_table_lut_asm: str
    value_table_lut_asm: str
    value_pairs_lut_asm: str
    # Lookups that scale the levels by a norm, table words as inputs (`scaled_dequant_asm`; the Hopper
    # extend kernel): keys by an fp32 norm given as an fp16 hi/lo pair, values by an fp16 norm.
    key_scaled_lut_asm: str
    value_scaled_lut_asm: str
    # The table words, one copy per lane ([10, 32] int32; each lookup's words start at its row,
    # KEY_TABLE_ROW, VALUE_TABLE_ROW or KEY_BYTE_TABLE_ROW; zeros for codes of other widths).
    lut_lane_tables: torch.Tensor
    # 4-bit keys' levels are s · (L + 1/2), L an int8 (`core.byte_grid`; the key quantizer's codebook is
    # that grid's), so the fragment decode kernel multiplies them as int8: s (0.0 for other widths).
    key_byte_scale: float

    @property
    def norm_correction(self) -> bool:
        return self.key_quantizer.norm_correction

    @property
    def device(self) -> torch.device:
        return self.rotation.device

    @staticmethod
    def check_config(config: TurboQuantConfig, head_dim: int) -> None:
        """Raise ValueError unless the kernels implement `config` at `head_dim` (builds nothing)."""
        if config.key_quantizer != "mse" or config.value_quantizer != "mse":
            raise ValueError("the kernels implement the mse quantizer only; set key_quantizer='mse' and value_quantizer='mse'")
        if config.key_outlier_channels:
            raise ValueError("the kernels do not split outlier key channels; set key_outlier_channels=0")
        if head_dim not in KERNEL_HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {KERNEL_HEAD_DIMS} for the kernels, got {head_dim!r}")
        for role in ("key", "value"):
            bits = getattr(config, f"{role}_bits")
            if bits not in KERNEL_BITS:
                raise ValueError(f"{role}_bits must be one of {KERNEL_BITS} for the kernels, got {bits!r}")

    @classmethod
    def from_config(cls, config: TurboQuantConfig, head_dim: int, num_kv_heads: int, block_size: int,
                    layer_idx: int = 0, device: torch.device | str = "cpu") -> "KernelCodec":
        cls.check_config(config, head_dim)
        layout = PagedLayout(head_dim, config.key_bits, config.value_bits, block_size, num_kv_heads)
        key_quantizer = config.make_quantizer("key", head_dim, layer_idx)
        value_quantizer = config.make_quantizer("value", head_dim, layer_idx)
        assert key_quantizer.rotation is value_quantizer.rotation  # one rotation per layer: q is rotated once
        key_byte_scale = 0.0
        if config.key_bits == 4:  # on a byte grid (<0.1% more distortion) for the fragment decode kernel's int8 MMA
            key_quantizer.codebook, key_byte_scale = byte_grid(key_quantizer.codebook)
        key_book, value_book = key_quantizer.codebook, value_quantizer.codebook
        for book in (key_book, value_book):  # the store counts positive boundaries only (store._quantize_block)
            if not torch.equal(book.boundaries, -book.boundaries.flip(0)):
                raise ValueError(f"the kernels need a codebook symmetric around 0 ({book.bits} bits, d={book.dim})")
        key_levels, value_levels = code_levels_fp16(key_book.centroids), code_levels_fp16(value_book.centroids)
        key_byte_tables = signed_byte_tables(key_levels, key_byte_scale) if config.key_bits == 4 else (0, 0)
        return cls(
            layout, key_quantizer, value_quantizer, **rotation_operands(key_quantizer.rotation.matrix(), device),
            key_centroids=key_book.centroids[code_order(key_book.bits)].to(device),
            key_boundaries=key_book.boundaries.to(device),
            value_centroids=value_book.centroids[code_order(value_book.bits)].to(device),
            value_boundaries=value_book.boundaries.to(device),
            key_centroids_fp16=key_levels.to(device), value_centroids_fp16=value_levels.to(device),
            key_lut_asm=dequant_asm(key_levels) if config.key_bits in LUT_BITS else "",
            value_lut_asm=dequant_asm(value_levels) if config.value_bits in LUT_BITS else "",
            key_table_lut_asm=dequant_asm(key_levels, table_inputs=True) if config.key_bits in LUT_BITS else "",
            value_table_lut_asm=(dequant_asm(value_levels, table_inputs=True) if config.value_bits in LUT_BITS
                                 else ""),
            value_pairs_lut_asm=dequant_pairs_asm(value_levels) if config.value_bits == 4 else "",
            key_scaled_lut_asm=(scaled_dequant_asm(key_levels, split_scale=True) if config.key_bits in LUT_BITS
                                else ""),
            value_scaled_lut_asm=scaled_dequant_asm(value_levels) if config.value_bits in LUT_BITS else "",
            lut_lane_tables=lane_tables(key_levels, value_levels, key_byte_tables).to(device),
            key_byte_scale=key_byte_scale,
        )


def lane_tables(key_levels: torch.Tensor, value_levels: torch.Tensor,
                key_byte_tables: tuple[int, int]) -> torch.Tensor:
    """[10, 32] int32: the four table words of each 3- or 4-bit codebook's lookup (zeros for other widths),
    then the key's two signed byte words, each repeated once per lane of a warp."""
    words = [word for levels in (key_levels, value_levels)
             for word in (lookup_tables(levels) if levels.numel() in (8, 16) else (0, 0, 0, 0))]
    assert len(words) == KEY_BYTE_TABLE_ROW
    words += list(key_byte_tables)
    signed = torch.tensor(words, dtype=torch.int64)
    signed = torch.where(signed >= 1 << 31, signed - (1 << 32), signed).to(torch.int32)
    return signed[:, None].expand(len(words), 32).contiguous()


def rotation_operands(rotation: torch.Tensor, device: torch.device | str) -> dict:
    """The fields of a rotation that `rotate.rotation_operand` reads (`KernelCodec`'s names), on `device`:
    the fp32 rotation, its 16-bit parts and its sign form."""
    signs, sign_scale = sign_form(rotation)
    return dict(rotation=rotation.to(device), rotation_bf16_parts=rotation_parts(rotation, torch.bfloat16).to(device),
                rotation_fp16_parts=rotation_parts(rotation, torch.float16).to(device),
                rotation_signs=None if signs is None else signs.to(device), rotation_sign_scale=sign_scale)


def sign_form(rotation: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """(S int8 of ±1, c) with rotation = c · S exactly, where every entry has the one magnitude c (a
    randomized Hadamard, H · diag(s) / √d); (None, 0.0) otherwise. S is exact in every dtype, so a
    kernel rotates a 16-bit x by one dot with S (exact products, fp32 sums) and a multiply by c, where
    a dense rotation takes three dots with its parts: a sixth of the bytes to load, a third of the dots."""
    magnitude = rotation.abs()
    scale = magnitude.flatten()[0]
    if scale > 0 and bool((magnitude == scale).all()):
        return torch.sign(rotation).to(torch.int8).contiguous(), float(scale)
    return None, 0.0


def rotation_parts(rotation: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[3, d, d] of `dtype`: P0, P1, P2 with rotation = P0 + P1/s + P2/s² to ~2^-24 (s = PART_SCALES[dtype])."""
    scale, rest, parts = PART_SCALES[dtype], rotation.double(), []
    for _ in range(3):
        parts.append(rest.to(dtype))
        rest = (rest - parts[-1].double()) * scale
    return torch.stack(parts).contiguous()


@dataclass(frozen=True)
class PackedBits:
    """How b-bit indices group into bytes, as kernel constants: `coords` indices fill `group_bytes`
    bytes (2 and 4 bits: one byte; 3 bits: 8 indices in 3 bytes; 8 bits: one index per byte)."""

    bits: int
    coords: int
    group_bytes: int

    @classmethod
    def of(cls, bits: int) -> "PackedBits":
        if bits not in KERNEL_BITS:
            raise ValueError(f"bits must be one of {KERNEL_BITS}, got {bits!r}")
        return cls(bits, 8, 3) if bits == 3 else cls(bits, 8 // bits, 1)
