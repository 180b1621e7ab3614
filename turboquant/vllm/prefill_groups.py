"""Which way a step's prefill chunks attend to their compressed prefixes, and in what groups (no vLLM
import: CPU-testable). The backend (`backend.py`) gathers the prefixes for FlashAttention when the
chunks are long, a group of consecutive requests at a time so the gathered keys fit its workspace."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

# Prefix-weighted mean chunk length from which gathering the prefixes beats the fused extend kernel. On an
# H100 (16K prefix, `benchmarks/results/kernels-extend-h100.md`) gathering + FlashAttention won at every
# chunk measured, 64 to 2048 tokens (2.5–4.4x); the fused kernel keeps many short chunks, which fill the
# GPU with its programs while gathering would write every prefix out for a few queries each.
GATHER_MIN_CHUNK = 32


def engine_gathers(speculative_decoding: bool, micro_batching: bool) -> bool:
    """Whether an engine may gather prefixes at all; otherwise every prefill keeps the fused kernel.
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
                   device: torch.device) -> list[PrefillGroup] | None:
    """Groups of consecutive prefill requests whose gathered keys fit `capacity` rows, or None when the
    chunks are too short for gathering to pay (`GATHER_MIN_CHUNK`). A sequence longer than the capacity
    cannot happen: the capacity is the model's maximum length."""
    prefixes = [seq - query for query, seq in zip(query_lens, seq_lens)]
    if sum(q * p for q, p in zip(query_lens, prefixes)) < GATHER_MIN_CHUNK * sum(prefixes):
        return None
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
