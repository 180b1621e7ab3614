"""Ring entries of an engine step in one launch (`kernels/ring_entries.py`) against
`reference.ring_entries_reference`, on random steps laid out as vLLM lays them out."""

import pytest
import torch

from turboquant.kernels.reference import ring_entries_reference
from turboquant.kernels.ring_entries import hand_out_ring_entries


def random_step(generator: torch.Generator, max_reqs: int, long_chunks: bool):
    """(query_start, seq_lens, num_tokens, num_reqs, num_decodes): decodes first, then chunks with random
    prefixes or none, then a full CUDA graph's padding (empty requests of length 0, tokens past the last one)."""
    def draw(low, high):
        return int(torch.randint(low, high + 1, (), generator=generator))

    real = draw(1, max_reqs - 2)
    num_decodes = draw(0, real - 1)
    query_lens = [1] * num_decodes + [draw(1, 1500 if long_chunks else 40) for _ in range(real - num_decodes)]
    # some chunks without a prefix, the last one always (so that each step has sinks)
    seq_lens = [q + draw(0, 5000) if draw(0, 3) and i < real - 1 else q for i, q in enumerate(query_lens)]
    padding = draw(0, 2)
    query_lens += [0] * padding
    seq_lens += [0] * padding
    query_start = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    num_tokens = int(query_start[-1]) + draw(0, 7)
    return query_start, torch.tensor(seq_lens, dtype=torch.int32), num_tokens, real + padding, num_decodes


@pytest.mark.parametrize("sinks, recent, long_chunks", [(4, 32, False), (4, 32, True), (0, 16, False),
                                                        (3, 0, False)])
def test_entries_cursor_and_middle_ends_match_the_reference(sinks, recent, long_chunks, device, generator):
    """Three steps in a row (the cursor carries over), with small rings that wrap around within a step;
    the long chunks span several tiles of the kernel."""
    max_reqs = 12
    sink_capacity, recent_capacity = max(1, sinks * 5), max(1, recent * 3)
    cursor = torch.randint(0, 10**6, (2,), generator=generator).to(device)
    expected_cursor = cursor.clone()
    for _ in range(3):
        query_start, seq_lens, num_tokens, num_reqs, num_decodes = random_step(generator, max_reqs, long_chunks)
        query_start, seq_lens = query_start.to(device), seq_lens.to(device)
        entries = torch.full((num_tokens + 5,), -7, dtype=torch.int32, device=device)
        middle_ends = torch.full((max_reqs,), -7, dtype=torch.int32, device=device)
        hand_out_ring_entries(query_start, seq_lens, num_tokens, num_reqs, num_decodes, cursor, entries, middle_ends,
                              sinks, recent, sink_capacity, recent_capacity)
        want_entries, expected_cursor, want_ends = ring_entries_reference(
            query_start, seq_lens, num_tokens, num_reqs, num_decodes, expected_cursor, sinks, recent,
            sink_capacity, recent_capacity)
        assert torch.equal(entries[:num_tokens].long(), want_entries)
        assert (entries[num_tokens:] == -7).all()  # nothing written past the step's tokens
        assert torch.equal(cursor, expected_cursor)
        assert torch.equal(middle_ends[:num_decodes].long(), want_ends)
        assert (middle_ends[num_decodes:] == -7).all()
        assert (want_entries >= 0).any() or not (sinks or recent)  # the step handed out entries


def test_bad_arguments_are_refused_before_launch(device):
    query_start = torch.tensor([0, 1, 3], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([9, 3], dtype=torch.int32, device=device)
    cursor = torch.zeros(2, dtype=torch.int64, device=device)
    entries = torch.zeros(8, dtype=torch.int32, device=device)
    middle_ends = torch.zeros(2, dtype=torch.int32, device=device)

    def call(**changes):
        arguments = dict(query_start=query_start, seq_lens=seq_lens, num_tokens=3, num_reqs=2, num_decodes=1,
                         cursor=cursor, entries=entries, middle_ends=middle_ends, sinks=4, recent=32,
                         sink_capacity=8, recent_capacity=64) | changes
        hand_out_ring_entries(**arguments)

    call()
    with pytest.raises(ValueError, match="seq_lens"):
        call(seq_lens=seq_lens.long())
    with pytest.raises(ValueError, match="entries"):
        call(num_tokens=9)
    with pytest.raises(ValueError, match="cursor"):
        call(cursor=cursor.int())
    with pytest.raises(ValueError, match="num_decodes"):
        call(num_decodes=-1)
    with pytest.raises(ValueError, match="capacities"):
        call(sink_capacity=0)
