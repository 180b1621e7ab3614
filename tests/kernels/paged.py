"""Helpers that build random paged caches for the kernel tests."""

from __future__ import annotations

import torch

from turboquant.core import TurboQuantConfig
from turboquant.kernels.codec import KernelCodec
from turboquant.kernels.store import compress_store


def make_codec(head_dim: int, key_bits: int, value_bits: int, num_kv_heads: int, block_size: int,
               device: str, norm_correction: bool = True) -> KernelCodec:
    config = TurboQuantConfig(key_bits=key_bits, value_bits=value_bits, norm_correction=norm_correction)
    return KernelCodec.from_config(config, head_dim, num_kv_heads, block_size, layer_idx=3, device=device)


def filled_cache(codec: KernelCodec, seq_lens: list[int], generator: torch.Generator, device: str,
                 spare_blocks: int = 3, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache holding random K/V for each sequence in shuffled blocks, and its int32 block table; its
    other bytes are `fill` (0xFF: NaN norms, which a kernel that reads them but masks badly passes on)."""
    layout = codec.layout
    blocks_per_seq = max(1, max(-(-n // layout.block_size) for n in seq_lens))
    num_blocks = len(seq_lens) * blocks_per_seq + spare_blocks
    order = torch.randperm(num_blocks, generator=generator)[: len(seq_lens) * blocks_per_seq]
    block_table = order.reshape(len(seq_lens), blocks_per_seq).to(torch.int32)
    cache = layout.allocate(num_blocks, device).fill_(fill)
    slots = (block_table.long()[:, :, None] * layout.block_size + torch.arange(layout.block_size)).flatten(1)
    slots = torch.cat([slots[i, :n] for i, n in enumerate(seq_lens)]).to(torch.int32)
    shape = (slots.numel(), layout.num_kv_heads, layout.head_dim)
    # Keys with a per-channel offset and spread, like real models, not only unit Gaussians.
    keys = torch.randn(shape, generator=generator) * torch.rand(layout.head_dim, generator=generator) * 3 + 0.5
    values = torch.randn(shape, generator=generator)
    compress_store(keys.to(device), values.to(device), slots.to(device), cache, codec)
    return cache, block_table.to(device)
