"""Sink and recent tokens, uncompressed, for vLLM decode steps (`exact_sinks`, `exact_recent`; on by
default where a layer can read them: `settings.VllmSettings.exact_counts`).

The paged cache holds every token compressed; vLLM gives a backend no per-request identity to hang a
full-precision window on, and prefix caching shares blocks between requests. So the exact copies live
in a ring keyed by cache slot (`kernels.ExactRing`): each step the builder hands every token that will
be a sink (position < `exact_sinks`) or among its sequence's latest `exact_recent` an entry of the ring,
round-robin, and the store writes it there besides compressing it. Decode attention then reads a
sequence's sinks and latest tokens from the ring where the entry still holds that slot, and from the
compressed cache everywhere else, including tokens whose entry has been handed out again since. A long
chunk after a cached prefix gathers that prefix's sinks and latest tokens from the ring the same way; the
fused extend kernel's chunks read their prefix compressed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import ExactRing
from ..kernels.exact_ring import RingRows
from ..kernels.ring_entries import hand_out_ring_entries

# The ring holds the sinks and latest tokens of this many sequences (or of max_num_seqs, if fewer): 1.2 GB
# on the 8B shape at 4 + 32 tokens. vLLM defaults to 1024 sequences on an H100/H200, for which it would
# take 4.8 GB of the KV budget. Entries are handed out again in turn, so a token reads compressed once
# this many sequences' worth of sinks (or of latest tokens) have been handed out after it: past this many
# running sequences a sequence's latest tokens, and in a long sequence beside a stream of newer requests
# (their prefills take sink entries) its sinks. Fidelity degrades there; results stay correct.
RING_SEQUENCES = 256


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
        self.capacity = self.sink_capacity + self.recent_capacity
        self.cursor = torch.zeros(2, dtype=torch.int64, device=device)
        self.tables: ExactRing | None = None  # the first layer's ring, whose slot tables every layer shares
        self.entries = torch.full((max_num_tokens,), -1, dtype=torch.int32, device=device)
        self.middle_ends = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.middle_starts = torch.full((max_num_seqs,), sinks, dtype=torch.int32, device=device)

    @staticmethod
    def capacities(sinks: int, recent: int, max_num_seqs: int) -> tuple[int, int]:
        """Ring entries for sinks and for recent tokens (at least one each: the modulus of their cursors)."""
        sequences = min(max_num_seqs, RING_SEQUENCES)
        return max(1, sinks * sequences), max(1, recent * sequences)

    def step(self, query_start: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, num_reqs: int,
             num_decodes: int) -> ExactStep:
        """Hand out this step's entries (one launch, no sync, so a CUDA graph may replay after it)."""
        hand_out_ring_entries(query_start, seq_lens, num_tokens, num_reqs, num_decodes, self.cursor, self.entries,
                              self.middle_ends, self.sinks, self.recent, self.sink_capacity, self.recent_capacity)
        return ExactStep(self, self.entries, self.middle_ends[:num_decodes], self.middle_starts[:num_decodes])

    def ring(self, layout, num_blocks: int, rows: RingRows) -> ExactRing:
        """A layer's ring on its `rows` (allocated with the model, so that vLLM's memory profile counts them)
        and the slot tables of the engine's first ring (their size is known once the cache's is)."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("turboquant exact tokens: a layer's ring must exist before CUDA graph capture")
        ring = ExactRing.allocate(self.capacity, layout, num_blocks, self.sinks, self.recent, rows[0].device,
                                  tables=self.tables, rows=rows)
        if self.tables is None:
            self.tables = ring
        return ring
