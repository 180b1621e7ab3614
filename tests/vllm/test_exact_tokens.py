"""The vLLM builder's side of exact tokens (`vllm/exact_tokens.py`): which tokens of a step get ring
entries, which entries, and where each decode row's compressed middle lies. No vLLM needed."""

import pytest
import torch

pytest.importorskip("triton")

from turboquant.vllm.exact_tokens import ExactTokens  # noqa: E402

# the entries are handed out by a Triton kernel: natively on a GPU, in the interpreter on the CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_sinks_and_latest_tokens_get_entries_round_robin_and_padding_none():
    tokens = ExactTokens(sinks=2, recent=3, max_num_seqs=4, max_num_tokens=32, device=DEVICE)
    assert (tokens.sink_capacity, tokens.recent_capacity) == (8, 12)
    # a decode at position 39, a first chunk of 6 tokens, then a full CUDA graph's padding as vLLM lays it
    # out: two padding requests (empty queries, length 0) and one padding token past the last request's end
    query_start = torch.tensor([0, 1, 7, 7, 7], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([40, 6, 0, 0], dtype=torch.int32, device=DEVICE)
    step = tokens.step(query_start, seq_lens, num_tokens=8, num_reqs=4, num_decodes=1)
    # the decode's token is recent; the chunk's positions 0, 1 are sinks, 3–5 recent, 2 neither
    assert step.entries[:8].tolist() == [8, 0, 1, -1, 9, 10, 11, -1]
    assert step.middle_ends.tolist() == [37] and step.middle_starts.tolist() == [2]
    assert tokens.cursor.tolist() == [2, 4]
    # the next step continues where this one stopped, and wraps around each part
    for _ in range(2):
        step = tokens.step(query_start, seq_lens, num_tokens=8, num_reqs=4, num_decodes=1)
    assert step.entries[:8].tolist() == [8 + 8 % 12, 4, 5, -1, 8 + 9 % 12, 8 + 10 % 12, 8 + 11 % 12, -1]
    assert tokens.cursor.tolist() == [6, 12]
    step = tokens.step(query_start, seq_lens, num_tokens=8, num_reqs=4, num_decodes=1)
    assert step.entries[:8].tolist() == [8, 6, 7, -1, 9, 10, 11, -1]  # the recent part wrapped around


def test_a_short_decode_sequence_has_an_empty_middle():
    tokens = ExactTokens(sinks=4, recent=32, max_num_seqs=2, max_num_tokens=8, device=DEVICE)
    step = tokens.step(torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE),
                       torch.tensor([3, 50], dtype=torch.int32, device=DEVICE),
                       num_tokens=2, num_reqs=2, num_decodes=2)
    assert step.entries[:2].tolist() == [0, 8 + 0]  # position 2 is a sink, position 49 a latest token
    assert step.middle_ends.tolist() == [4, 18] and step.middle_starts.tolist() == [4, 4]
