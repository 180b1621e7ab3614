"""Byte layout of a paged compressed KV cache: the one definition kernels, caches and engines share.

A cache is a uint8 tensor [num_blocks, num_kv_heads, head_page_bytes]. One (block, kv head) page holds
`block_size` tokens as four regions, each contiguous so a tile of tokens is one strided read:

    key codes   [block_size, key_bytes]     packed b-bit indices (see `packing.py`)
    value codes [block_size, value_bytes]
    key norms   [block_size] float32        fp32: fp16 norms lose long-context tokens
    value norms [block_size] float32

The norm regions start at a multiple of 4 bytes whenever block_size is a multiple of 4.
A contiguous per-sequence cache is the same layout with one block per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import NORM_BYTES
from .packing import packed_bytes


@dataclass(frozen=True)
class PagedLayout:
    head_dim: int
    key_bits: int
    value_bits: int
    block_size: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        for name in ("head_dim", "block_size", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.block_size % NORM_BYTES:
            raise ValueError(f"block_size must be a multiple of {NORM_BYTES} (fp32 norm alignment), got {self.block_size}")
        packed_bytes(self.head_dim, self.key_bits)  # raises on bits that do not pack
        packed_bytes(self.head_dim, self.value_bits)

    @property
    def key_bytes(self) -> int:
        return packed_bytes(self.head_dim, self.key_bits)

    @property
    def value_bytes(self) -> int:
        return packed_bytes(self.head_dim, self.value_bits)

    @property
    def values_offset(self) -> int:
        return self.block_size * self.key_bytes

    @property
    def key_norms_offset(self) -> int:
        return self.block_size * (self.key_bytes + self.value_bytes)

    @property
    def value_norms_offset(self) -> int:
        return self.key_norms_offset + NORM_BYTES * self.block_size

    @property
    def head_page_bytes(self) -> int:
        return self.block_size * (self.key_bytes + self.value_bytes + 2 * NORM_BYTES)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes per token over all KV heads of one layer."""
        return self.num_kv_heads * (self.key_bytes + self.value_bytes + 2 * NORM_BYTES)

    def cache_shape(self, num_blocks: int) -> tuple[int, int, int]:
        return (num_blocks, self.num_kv_heads, self.head_page_bytes)

    def allocate(self, num_blocks: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(self.cache_shape(num_blocks), dtype=torch.uint8, device=device)

    def check_cache(self, cache: torch.Tensor, name: str = "cache") -> None:
        """Raise ValueError unless `cache` is a contiguous uint8 tensor of this layout."""
        if not isinstance(cache, torch.Tensor) or cache.dtype != torch.uint8:
            raise ValueError(f"{name} must be a uint8 tensor, got {getattr(cache, 'dtype', type(cache).__name__)}")
        if cache.ndim != 3 or tuple(cache.shape[1:]) != self.cache_shape(0)[1:]:
            raise ValueError(f"{name} must have shape [num_blocks, {self.num_kv_heads}, {self.head_page_bytes}], "
                             f"got {tuple(cache.shape)}")
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous")

    def views(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(key codes [nb, H, bs, key_bytes], value codes [nb, H, bs, value_bytes], key norms [nb, H, bs] f32,
        value norms [nb, H, bs] f32): views that share memory with `cache`."""
        self.check_cache(cache)
        num_blocks, bs = cache.shape[0], self.block_size
        key_codes = cache[..., : self.values_offset].view(num_blocks, self.num_kv_heads, bs, self.key_bytes)
        value_codes = cache[..., self.values_offset : self.key_norms_offset].view(
            num_blocks, self.num_kv_heads, bs, self.value_bytes)
        key_norms = cache[..., self.key_norms_offset : self.value_norms_offset].view(torch.float32)
        value_norms = cache[..., self.value_norms_offset :].view(torch.float32)
        return key_codes, value_codes, key_norms, value_norms
