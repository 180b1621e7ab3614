"""Which way a step's prefill chunks attend to their compressed prefixes, and in what groups (no vLLM
import: CPU-testable). The backend (`backend.py`) follows `prefill_route`:
- "flash": no chunk has a cached prefix; FlashAttention on the chunks alone.
- "gather": some chunk is long (≥ `SHORT_CHUNK`); each prefix is dequantized once into a workspace, a
  group of consecutive requests at a time so the gathered keys fit it (`prefill_groups`), then
  FlashAttention varlen. The fused kernel would unpack the prefix again for every block of queries and
  runs about 3x FlashAttention's time (`benchmarks/results/kernels-extend-h100.md`).
- "fused": short chunks of enough requests to fill the device with the fused extend kernel's programs,
  which read each prefix once per 16 queries (speculative decoding's verification steps look like this).
- "decode": short chunks of a few requests, e.g. the tail of a long prompt that chunked prefill cut off.
  The fused kernel would walk each long prefix in one program per kv head (H200, Llama-3.1-8B, 16 × 6K
  prompts: 6.7 ms a layer in one step, `benchmarks/results/vllm-profile-h200.md`); instead each token is
  a decode query over the cache (`chunk_decode_queries`), split over its prefix like any decode. The
  chunk's own keys are then read compressed, as its decode steps will read them."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

# Chunks at least this long are worth gathering their prefixes for FlashAttention (H100, 16K prefix:
# gather + FA3 beat the fused kernel at every chunk measured, 64 to 2048 tokens).
SHORT_CHUNK = 32
# The fused kernel's programs for one request: one per kv head for a chunk shorter than SHORT_CHUNK
# (up to 64 query rows each). Below about one per SM it leaves most of the device idle.
FUSED_MIN_PROGRAMS_PER_SM = 1


def prefill_route(query_lens: list[int], prefix_lens: list[int], num_kv_heads: int, num_sms: int,
                  gathers: bool) -> str:
    """"flash", "gather", "fused" or "decode" for a step's prefill requests (module docstring); "gather"
    only where the engine can (`gathers`: `engine_gathers`, FlashAttention and CPU sequence lengths)."""
    if not any(prefix_lens):
        return "flash"
    if max(query_lens) >= SHORT_CHUNK:
        return "gather" if gathers else "fused"
    if len(query_lens) * num_kv_heads >= FUSED_MIN_PROGRAMS_PER_SM * num_sms:
        return "fused"
    return "decode"


def decode_route_max_tokens(num_kv_heads: int, num_sms: int, max_num_seqs: int) -> int:
    """The most chunk tokens a "decode" route step can hold: short chunks of as many requests as leave the
    fused kernel's programs short of filling the device (`prefill_route`)."""
    requests = min(max_num_seqs, -(-FUSED_MIN_PROGRAMS_PER_SM * num_sms // num_kv_heads) - 1)
    return max(0, requests) * (SHORT_CHUNK - 1)


def chunk_decode_queries(query_start: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                         num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of `num_tokens` chunk tokens as a decode query: (its request's block-table row [num_tokens,
    width], its sequence length int32 [num_tokens]). Token p of a chunk of q in a sequence of s tokens
    sees s − q + p + 1 keys. On the tensors' device, without a host sync."""
    query_lens = query_start[1:] - query_start[:-1]
    requests = torch.repeat_interleave(torch.arange(query_lens.shape[0], device=query_lens.device), query_lens,
                                       output_size=num_tokens)
    positions = torch.arange(num_tokens, device=query_lens.device) - query_start[requests]
    token_seq_lens = seq_lens[requests] - query_lens[requests] + positions + 1
    return block_table[requests], token_seq_lens.to(torch.int32)


def engine_gathers(speculative_decoding: bool, micro_batching: bool) -> bool:
    """Whether an engine may gather prefixes at all; otherwise long chunks take the fused kernel.
    Speculative decoding: the gather layout is built from vLLM's CPU sequence lengths, which are
    optimistic for draft rows (the fused kernel reads the exact lengths on the GPU). Micro-batching
    (dual-batch overlap): vLLM keeps one workspace per micro-batch, and the reservation the builder makes
    at start covers only the first, so the second would grow its own after vLLM locks growth, mid-request."""
    return not speculative_decoding and not micro_batching


@dataclass
class PrefillGroup:
    requests: slice  # of the prefill requests
    rows: slice  # of the prefill query tokens
    query_start: torch.Tensor  # int32 [len + 1], from 0
    key_start: torch.Tensor  # int32 [len + 1], from 0: rows of the gathered keys/values
    num_keys: int
    max_query_len: int
    max_seq_len: int


def prefill_groups(query_lens: list[int], seq_lens: list[int], capacity: int,
                   device: torch.device) -> list[PrefillGroup]:
    """Groups of consecutive prefill requests whose gathered keys fit `capacity` rows. A sequence longer
    than the capacity cannot happen: the capacity is the model's maximum length."""
    bounds, keys = [0], 0
    for index, length in enumerate(seq_lens):
        if keys + length > capacity and index > bounds[-1]:
            bounds.append(index)
            keys = 0
        keys += length
    bounds.append(len(seq_lens))
    starts, spans = [], []
    for first, last in zip(bounds, bounds[1:]):
        query_start = list(accumulate(query_lens[first:last], initial=0))
        key_start = list(accumulate(seq_lens[first:last], initial=0))
        starts += query_start + key_start
        spans.append((first, last, query_start, key_start))
    packed = torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True)  # one copy per step
    groups, offset, row = [], 0, 0
    for first, last, query_start, key_start in spans:
        count = last - first + 1
        groups.append(PrefillGroup(
            requests=slice(first, last), rows=slice(row, row + query_start[-1]),
            query_start=packed[offset:offset + count], key_start=packed[offset + count:offset + 2 * count],
            num_keys=key_start[-1], max_query_len=max(query_lens[first:last]), max_seq_len=max(seq_lens[first:last])))
        offset, row = offset + 2 * count, row + query_start[-1]
    return groups
