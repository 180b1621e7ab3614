"""Which ring entry each token of an engine step gets (`exact_ring.ExactRing`), in one launch.

A step's tokens that will be a sink (position < sinks) or among their sequence's latest `recent` take the
next entries of their part of the ring, round-robin from a cursor on the device, in token order; the
others take −1. Also each decode row's compressed middle end (`exact_ring.middle_ends`). The same as some
forty small PyTorch ops (`reference.ring_entries_reference`), which an engine would otherwise launch
before every step; no host sync, so a CUDA graph may replay after it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import SLICED_METADATA, check_device_tensor

TOKENS_PER_TILE = 1024


@triton.jit(do_not_specialize=["num_tokens", "num_reqs", "num_decodes", "search_steps"],
            do_not_specialize_on_alignment=SLICED_METADATA)
def _ring_entries_kernel(query_start_ptr, seq_lens_ptr, cursor_ptr, entries_ptr, middle_ends_ptr, num_tokens,
                         num_reqs, num_decodes, search_steps, sink_capacity, recent_capacity, SINKS: tl.constexpr,
                         RECENT: tl.constexpr, TILE: tl.constexpr):
    sink_cursor, recent_cursor = tl.load(cursor_ptr), tl.load(cursor_ptr + 1)
    requests_end = tl.load(query_start_ptr + num_reqs)
    sinks_before = tl.full((), 0, tl.int64)  # handed out by earlier tiles
    recent_before = sinks_before
    for first in range(0, num_tokens, TILE):
        token = first + tl.arange(0, TILE)
        # each token's request: how many of query_start[1 … num_reqs] are ≤ it (a binary search;
        # 2^search_steps > num_reqs)
        request = tl.zeros([TILE], tl.int32)
        for step in range(search_steps):
            candidate = request + (1 << (search_steps - 1 - step))
            start = tl.load(query_start_ptr + candidate, mask=candidate <= num_reqs, other=0)
            request = tl.where((candidate <= num_reqs) & (start <= token), candidate, request)
        request = tl.maximum(tl.minimum(request, num_reqs - 1), 0)
        length = tl.load(seq_lens_ptr + request).to(tl.int64)
        position = length - (tl.load(query_start_ptr + request + 1) - token)
        # a full CUDA graph's padding: requests with empty queries, tokens past the last request's end
        real = (token < num_tokens) & (token < requests_end) & (position >= 0)
        sink = real & (position < SINKS)
        recent = real & (position >= SINKS) & (position >= length - RECENT)
        sink_rank = sinks_before + tl.cumsum(sink.to(tl.int64), axis=0) - 1
        recent_rank = recent_before + tl.cumsum(recent.to(tl.int64), axis=0) - 1
        entries = tl.where(sink, (sink_cursor + sink_rank) % sink_capacity,
                           tl.where(recent, sink_capacity + (recent_cursor + recent_rank) % recent_capacity, -1))
        tl.store(entries_ptr + token, entries.to(tl.int32), mask=token < num_tokens)
        sinks_before += tl.sum(sink.to(tl.int64), axis=0)
        recent_before += tl.sum(recent.to(tl.int64), axis=0)
    tl.store(cursor_ptr, sink_cursor + sinks_before)
    tl.store(cursor_ptr + 1, recent_cursor + recent_before)
    for first in range(0, num_decodes, TILE):
        rows = first + tl.arange(0, TILE)
        lengths = tl.load(seq_lens_ptr + rows, mask=rows < num_decodes, other=0)
        tl.store(middle_ends_ptr + rows, tl.maximum(lengths - RECENT, SINKS).to(tl.int32), mask=rows < num_decodes)


def hand_out_ring_entries(query_start: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, num_reqs: int,
                          num_decodes: int, cursor: torch.Tensor, entries: torch.Tensor, middle_ends: torch.Tensor,
                          sinks: int, recent: int, sink_capacity: int, recent_capacity: int) -> None:
    """entries[:num_tokens] (int32) ← each token's entry; cursor (int64 [2]: sinks', recent tokens' next
    entry) advanced past the step's; middle_ends[:num_decodes] (int32) ← max(seq_len − recent, sinks) of
    the first num_decodes requests. query_start (int32 [≥ num_reqs + 1]) and seq_lens (int32 [≥ num_reqs])
    as vLLM's: a step's requests, decodes first; sink entries are [0, sink_capacity), recent ones follow."""
    device = cursor.device
    check_device_tensor(cursor, "cursor", (torch.int64,), (2,), device)
    for name, tensor, least in (("query_start", query_start, num_reqs + 1), ("seq_lens", seq_lens, num_reqs),
                                ("entries", entries, num_tokens), ("middle_ends", middle_ends, num_decodes)):
        check_device_tensor(tensor, name, (torch.int32,), None, device)
        if tensor.ndim != 1 or tensor.shape[0] < least:
            raise ValueError(f"{name} must be int32 [>= {least}], got {tuple(tensor.shape)}")
    if not 0 <= num_decodes <= num_reqs or num_reqs < 1:
        raise ValueError(f"need 0 <= num_decodes <= num_reqs and num_reqs >= 1, got {num_decodes} and {num_reqs}")
    if sink_capacity < 1 or recent_capacity < 1:
        raise ValueError(f"capacities must be positive, got {sink_capacity} and {recent_capacity}")
    _ring_entries_kernel[(1,)](query_start, seq_lens, cursor, entries, middle_ends, num_tokens, num_reqs,
                               num_decodes, num_reqs.bit_length(), sink_capacity, recent_capacity, SINKS=sinks,
                               RECENT=recent, TILE=TOKENS_PER_TILE, num_warps=4)
