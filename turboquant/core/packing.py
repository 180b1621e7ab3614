"""Bit packing of b-bit indices along the last dimension: the one definition of the byte layout.

Codes: an index i (of a codebook's ascending levels) is stored as its code `sign_magnitude(i)`: for a
codebook symmetric around 0, the top bit says which half the level is in (1: the positive one) and the
bits below rank its magnitude from the smallest, so a kernel's lookup needs only a table of magnitudes
and finds a code's rank with one AND (`kernels/lut_asm.py`; the ascending order took four instructions
more per eight 4-bit codes). `pack_indices` and `unpack_indices` apply it; a kernel that indexes levels
by code reads them in `code_order`.

Layout: the n codes form a little-endian bit stream; code i occupies bits [i·b, (i+1)·b) of the
row, bit k of the stream is bit (k mod 8) of byte k // 8. So 4-bit puts code 2j in the low nibble
of byte j and code 2j+1 in the high nibble; 3-bit puts 8 codes in 3 bytes (a d=128 vector is 48
bytes), a code may straddle two bytes. Kernels and caches ask `packed_bytes` for sizes.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (1, 2, 3, 4, 8)


def validate_packable(num_indices: int, bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS} for packing, got {bits!r}")
    if (num_indices * bits) % 8:
        raise ValueError(
            f"the last dimension ({num_indices}) times bits ({bits}) must be a multiple of 8 to pack into whole bytes"
        )


def sign_magnitude(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices of ascending levels ↔ their stored codes (the map is its own inverse): i keeps its value
    in the upper half (i ≥ 2^(b−1)) and becomes 2^(b−1) − 1 − i in the lower one."""
    half = 1 << (bits - 1)
    return torch.where(indices < half, indices ^ (half - 1), indices)


def code_order(bits: int) -> torch.Tensor:
    """[2**bits] int64: the index that each code stands for, so `levels[code_order(b)]` are the levels
    of a codebook indexed by code."""
    return sign_magnitude(torch.arange(1 << bits), bits)


def packed_bytes(num_indices: int, bits: int) -> int:
    """Bytes that `num_indices` indices of `bits` bits take after packing."""
    validate_packable(num_indices, bits)
    return num_indices * bits // 8


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] integer indices < 2**bits -> [..., n·bits/8] uint8 of their codes."""
    validate_packable(indices.shape[-1], bits)
    codes = sign_magnitude(indices, bits)
    if bits == 8:
        return codes.to(torch.uint8)
    if 8 % bits == 0:  # whole codes per byte: shift each into its field, no bit stream
        per_byte = 8 // bits
        fields = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
        shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
        return (fields << shifts).sum(dim=-1).to(torch.uint8)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # [..., n, bits]
    stream = stream.reshape(*codes.shape[:-1], codes.shape[-1] * bits // 8, 8)
    weights = torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream << weights).sum(dim=-1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, num_indices: int) -> torch.Tensor:
    """[..., n·bits/8] uint8 -> [..., n] uint8 indices (inverse of `pack_indices`)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    expected = packed_bytes(num_indices, bits)
    if packed.shape[-1] != expected:
        raise ValueError(f"packed has {packed.shape[-1]} bytes in its last dimension, expected {expected}")
    if bits == 8:
        return sign_magnitude(packed, bits)
    if 8 % bits == 0:  # whole codes per byte: shift each byte, no bit stream (1 byte per code in memory)
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        fields = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [..., bytes, 8 / bits]
        return sign_magnitude(fields.reshape(*packed.shape[:-1], num_indices), bits)
    # 3 bits: 8 codes in each 3 bytes, read as one 24-bit word
    groups = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 3, 3).to(torch.int32)  # no -1: rows may be 0
    words = groups[..., 0] | groups[..., 1] << 8 | groups[..., 2] << 16
    shifts = torch.arange(0, 24, 3, device=packed.device, dtype=torch.int32)
    codes = ((words.unsqueeze(-1) >> shifts) & 7).to(torch.uint8).reshape(*packed.shape[:-1], num_indices)
    return sign_magnitude(codes, bits)
