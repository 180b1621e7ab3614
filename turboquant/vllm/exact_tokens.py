"""Sink and recent tokens in the model's dtype for vLLM decode steps (opt-in: `exact_sinks`, `exact_recent`).

The paged cache holds every token compressed; vLLM gives a backend no per-request identity to hang a
full-precision window on, and prefix caching shares blocks between requests. So the exact copies live
in a ring keyed by cache slot: each step the builder hands every token that will be a sink (position <
`exact_sinks`) or among its sequence's latest `exact_recent` an entry of the ring, in order, and the
store writes it there besides compressing it. A decode step then attends to its sequence's sinks and
latest tokens through the ring, where the entry still holds that slot (a slot written again points at
its new entry, or at none), and through the compressed cache everywhere else, including tokens whose
entry the ring has handed out again since. The two parts are merged by their log-sum-exps.

A prototype in PyTorch (decode rows only; prefill chunks attend as before), to measure what exact sinks
and recent tokens buy vLLM's greedy fidelity before kernels read the ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import unpack_indices
from ..kernels import KernelCodec

# Ring entries per running sequence and exact token: room for a second generation of entries before the
# first is handed out again.
RING_SLACK = 2


@dataclass
class ExactStep:
    """What one step's forward reads: the ring's tables, each token's entry (−1: none) and, per decode
    row, where its compressed middle ends and starts."""
    tokens: "ExactTokens"
    entries: torch.Tensor  # int32 [step tokens]
    middle_ends: torch.Tensor  # int32 [decodes]: max(seq_len − recent, sinks)
    middle_starts: torch.Tensor  # int32 [decodes]: sinks


class ExactTokens:
    """The builder's side: the shared tables and the per-step entries. Entries [0, sink capacity) hold
    sinks, the rest recent tokens; each part is handed out round-robin from a cursor on the device."""

    def __init__(self, sinks: int, recent: int, max_num_seqs: int, max_num_tokens: int, device):
        self.sinks, self.recent = sinks, recent
        self.sink_capacity, self.recent_capacity = self.capacities(sinks, recent, max_num_seqs)
        self.capacity = self.sink_capacity + self.recent_capacity  # one more row: where skipped writes go
        self.cursor = torch.zeros(2, dtype=torch.int64, device=device)
        self.slot_of_entry = torch.full((self.capacity + 1,), -1, dtype=torch.int64, device=device)
        self.entry_of_slot: torch.Tensor | None = None  # [cache slots + 1], once the cache's size is known
        self.entries = torch.full((max_num_tokens,), -1, dtype=torch.int32, device=device)
        self.middle_ends = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.middle_starts = torch.full((max_num_seqs,), sinks, dtype=torch.int32, device=device)

    @staticmethod
    def capacities(sinks: int, recent: int, max_num_seqs: int) -> tuple[int, int]:
        """Ring entries for sinks and for recent tokens (at least one each: the modulus of their cursors)."""
        return max(1, RING_SLACK * sinks * max_num_seqs), max(1, RING_SLACK * recent * max_num_seqs)

    def step(self, query_start: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, num_reqs: int,
             num_decodes: int) -> ExactStep:
        """Hand out this step's entries (device ops only: no sync, so a CUDA graph may replay after it)."""
        device = self.cursor.device
        starts, lengths = query_start[:num_reqs + 1].long(), seq_lens[:num_reqs].long()
        token = torch.arange(num_tokens, device=device)
        request = torch.searchsorted(starts[1:], token, right=True)
        position = lengths[request] - (starts[request + 1] - token)
        sink = position < self.sinks
        recent = ~sink & (position >= lengths[request] - self.recent)
        sink_rank, recent_rank = sink.cumsum(0) - 1, recent.cumsum(0) - 1
        entries = torch.where(sink, (self.cursor[0] + sink_rank) % self.sink_capacity,
                              torch.where(recent, self.sink_capacity + (self.cursor[1] + recent_rank)
                                          % self.recent_capacity, -1))
        self.entries[:num_tokens] = entries.to(torch.int32)
        self.cursor += torch.stack((sink.sum(), recent.sum()))
        self.middle_ends[:num_decodes] = (seq_lens[:num_decodes] - self.recent).clamp(min=self.sinks)
        return ExactStep(self, self.entries, self.middle_ends[:num_decodes], self.middle_starts[:num_decodes])

    def slot_table(self, num_slots: int, device) -> torch.Tensor:
        if self.entry_of_slot is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("turboquant exact tokens: the slot table must exist before CUDA graph capture")
            self.entry_of_slot = torch.full((num_slots + 1,), -1, dtype=torch.int32, device=device)
        return self.entry_of_slot


class ExactRing:
    """One layer's exact keys and values [capacity + 1, kv_heads, head_dim] (the last row takes skipped writes)."""

    def __init__(self, capacity: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.keys = torch.zeros(capacity + 1, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)

    def write(self, step: ExactStep, keys: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor,
              num_slots: int) -> None:
        """After the store: the step's tokens with an entry go to it; every stored slot learns its entry or −1."""
        tables = step.tokens
        entry_of_slot = tables.slot_table(num_slots, keys.device)
        count = keys.shape[0]
        slots, entries = slot_mapping[:count].long(), step.entries[:count].long()
        stored = slots >= 0
        entry_of_slot[torch.where(stored, slots, num_slots)] = torch.where(stored, entries, -1).to(torch.int32)
        kept = stored & (entries >= 0)
        rows = torch.where(kept, entries, tables.capacity)
        tables.slot_of_entry[rows] = torch.where(kept, slots, -1)
        self.keys[rows] = keys.to(self.keys.dtype)
        self.values[rows] = values.to(self.values.dtype)

    def attend(self, step: ExactStep, query: torch.Tensor, cache: torch.Tensor, codec: KernelCodec,
               block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
               softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode rows' attention over their sinks and latest tokens → (output [rows, Hq, d] fp32, natural
        log-sum-exp [rows, Hq]); each key from the ring where its entry still holds it, else dequantized."""
        tables, layout = step.tokens, codec.layout
        rows = query.shape[0]
        lengths = seq_lens[:rows].long()
        sink_positions = torch.arange(tables.sinks, device=query.device).expand(rows, -1)
        recent_positions = lengths[:, None] - tables.recent + torch.arange(tables.recent, device=query.device)
        positions = torch.cat((sink_positions, recent_positions), dim=1)
        visible = torch.cat((sink_positions < lengths[:, None], recent_positions >= tables.sinks), dim=1)
        positions = positions.clamp(min=0)
        blocks = block_table[:rows].long().gather(1, positions // layout.block_size)
        offsets = positions % layout.block_size
        slots = blocks * layout.block_size + offsets
        entries = tables.entry_of_slot[slots].long()
        held = entries.clamp(min=0)
        exact = visible & (entries >= 0) & (tables.slot_of_entry[held] == slots)
        key_codes, value_codes, key_norms, value_norms = layout.views(cache)
        keys, values = (torch.where(exact[..., None, None], ring[held].float(),
                                    dequantized(codes[blocks, :, offsets], norms[blocks, :, offsets], centroids, bits,
                                                codec))
                        for ring, codes, norms, centroids, bits in (
                            (self.keys, key_codes, key_norms, codec.key_centroids, layout.key_bits),
                            (self.values, value_codes, value_norms, codec.value_centroids, layout.value_bits)))
        group = query.shape[1] // layout.num_kv_heads
        grouped = query.float().reshape(rows, layout.num_kv_heads, group, -1)
        scores = torch.einsum("bhgd,bphd->bhgp", grouped, keys) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        lse = scores.logsumexp(dim=-1)
        probs = torch.where(visible[:, None, None, :], (scores - lse[..., None].clamp(min=-1e30)).exp(), 0.0)
        out = torch.einsum("bhgp,bphd->bhgd", probs, values)
        return out.reshape(query.shape), lse.reshape(rows, -1)


def dequantized(codes: torch.Tensor, norms: torch.Tensor, centroids: torch.Tensor, bits: int,
                codec: KernelCodec) -> torch.Tensor:
    """Packed codes [..., bytes] and norms [...] → vectors [..., d] fp32 in the original space."""
    indices = unpack_indices(codes, bits, codec.layout.head_dim).long()
    return (centroids[indices] * norms[..., None]) @ codec.rotation


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint key sets, from each one's output and natural log-sum-exp (fp32)."""
    top = torch.maximum(lse_a, lse_b).clamp(min=-1e30)
    weight_a, weight_b = (lse_a - top).exp(), (lse_b - top).exp()
    total = (weight_a + weight_b).clamp(min=1e-30)
    return (out_a.float() * weight_a[..., None] + out_b.float() * weight_b[..., None]) / total[..., None]
