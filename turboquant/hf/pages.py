"""`SequencePages`: one layer's compressed tokens for a batch of sequences, in the paged layout the
kernels read (`core/paged_layout.py`) with one contiguous run of blocks per sequence.

This is the storage of `TurboQuantCache(mode="fused")`: tokens are written by the compress-store kernel
and read by the decode/extend kernels, so no full-precision copy of them ever exists. Capacity grows in
steps of `GROW_TOKENS` (copying compressed bytes only), so at most that many tokens are spare.
"""

from __future__ import annotations

import torch

from ..core import TurboQuantConfig
from ..kernels import KernelCodec, compress_store, extend_attention, paged_decode_attention

BLOCK_SIZE = 64
GROW_TOKENS = 256


def _tokens_major(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, tokens, d] → [batch · tokens, heads, d], the kernels' row order."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


class SequencePages:
    def __init__(self, config: TurboQuantConfig, head_dim: int, num_kv_heads: int, batch: int, layer_idx: int,
                 device: torch.device):
        self.codec = KernelCodec.from_config(config, head_dim, num_kv_heads, BLOCK_SIZE, layer_idx, device)
        self.batch, self.num_tokens, self.blocks_per_seq = batch, 0, 0
        self.cache = self.codec.layout.allocate(0, device)
        self._number_blocks()

    def _reserve(self, tokens: int) -> None:
        blocks = -(-tokens // GROW_TOKENS) * GROW_TOKENS // BLOCK_SIZE
        if blocks <= self.blocks_per_seq:
            return
        layout, device = self.codec.layout, self.cache.device
        grown = layout.allocate(self.batch * blocks, device)
        page = layout.cache_shape(0)[1:]
        grown.view(self.batch, blocks, *page)[:, : self.blocks_per_seq] = self.cache.view(
            self.batch, self.blocks_per_seq, *page)
        self.cache, self.blocks_per_seq = grown, blocks
        self._number_blocks()

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Compress and store keys/values [batch, kv_heads, n, head_dim] after the tokens already held."""
        count = keys.shape[2]
        self._reserve(self.num_tokens + count)
        device = self.cache.device
        positions = self.num_tokens + torch.arange(count, device=device)
        first_slots = torch.arange(self.batch, device=device) * (self.blocks_per_seq * BLOCK_SIZE)
        slots = (first_slots[:, None] + positions[None, :]).flatten()
        compress_store(_tokens_major(keys), _tokens_major(values), slots, self.cache, self.codec)
        self.num_tokens += count

    def _lengths(self, tokens: int) -> torch.Tensor:
        return torch.full((self.batch,), tokens, dtype=torch.int32, device=self.cache.device)

    def decode(self, query: torch.Tensor, scale: float, softcap: float | None, key_starts: torch.Tensor | None,
               num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of query [batch, q_heads, d] over the first `num_tokens` held tokens →
        (out [batch, q_heads, d] fp32, log-sum-exp [batch, q_heads])."""
        return paged_decode_attention(query.float(), self.cache, self.codec, self.block_table,
                                      self._lengths(num_tokens), scale, softcap=softcap,
                                      key_starts=key_starts, return_lse=True)

    def extend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
               softcap: float | None, key_starts: torch.Tensor | None,
               num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk: query [batch, q_heads, L, d] over the first `num_tokens` held tokens and causally over
        its own keys/values [batch, kv_heads, L, d] → (out [batch, q_heads, L, d] fp32, lse [batch, q_heads, L])."""
        batch, num_q_heads, chunk, head_dim = query.shape
        device = self.cache.device
        query_start = torch.arange(batch + 1, dtype=torch.int32, device=device) * chunk
        out, lse = extend_attention(_tokens_major(query.float()), _tokens_major(keys), _tokens_major(values),
                                    query_start, self._lengths(num_tokens + chunk), self.cache,
                                    self.codec, self.block_table, scale, chunk, softcap=softcap,
                                    key_starts=key_starts, return_lse=True)
        return (out.view(batch, chunk, num_q_heads, head_dim).transpose(1, 2),
                lse.view(batch, chunk, num_q_heads).transpose(1, 2))

    def truncate(self, num_tokens: int) -> None:
        self.num_tokens = min(self.num_tokens, num_tokens)

    def map_sequences(self, fn) -> None:
        """Apply a batch-dimension op (index_select, repeat_interleave, indexing) to every sequence's pages."""
        page = self.codec.layout.cache_shape(0)[1:]
        pages = fn(self.cache.view(self.batch, self.blocks_per_seq, *page))
        self.batch = pages.shape[0]
        self.cache = pages.reshape(-1, *page).contiguous()
        self._number_blocks()

    def _number_blocks(self) -> None:
        """Sequence i owns blocks i · blocks_per_seq onwards, in order."""
        self.block_table = torch.arange(self.batch * self.blocks_per_seq, dtype=torch.int32,
                                        device=self.cache.device).view(self.batch, self.blocks_per_seq)

    def nbytes(self) -> int:
        return self.cache.numel()
