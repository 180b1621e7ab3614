"""How the vLLM backend splits a step's prefill chunks for gathering, without vLLM."""

import pytest
import torch

from turboquant.vllm.prefill_groups import GATHER_MIN_CHUNK, engine_gathers, prefill_groups


def test_short_chunks_after_long_prefixes_stay_fused():
    # one long chunk after a short prefix does not outweigh a short chunk after a long one
    query_lens, seq_lens = [GATHER_MIN_CHUNK * 4, 8], [GATHER_MIN_CHUNK * 4 + 10, 8 + 5000]
    assert prefill_groups(query_lens, seq_lens, 10**6, torch.device("cpu")) is None
    assert prefill_groups([GATHER_MIN_CHUNK - 1], [GATHER_MIN_CHUNK + 99], 10**6, torch.device("cpu")) is None
    assert prefill_groups([GATHER_MIN_CHUNK], [GATHER_MIN_CHUNK + 99], 10**6, torch.device("cpu")) is not None


@pytest.mark.parametrize("capacity", [10**6, 1000, 600, 400])
def test_groups_cover_every_request_in_order_within_capacity(capacity):
    query_lens = [100, 300, 64, 200, 128]
    seq_lens = [400, 300, 164, 350, 200]  # the second chunk has no prefix
    groups = prefill_groups(query_lens, seq_lens, capacity, torch.device("cpu"))
    assert groups[0].requests.start == 0 and groups[-1].requests.stop == len(seq_lens)
    assert groups[0].rows.start == 0 and groups[-1].rows.stop == sum(query_lens)
    for before, after in zip(groups, groups[1:]):
        assert before.requests.stop == after.requests.start and before.rows.stop == after.rows.start
    for group in groups:
        queries, lengths = query_lens[group.requests], seq_lens[group.requests]
        assert group.num_keys == sum(lengths) and (group.num_keys <= capacity or len(lengths) == 1)
        assert group.query_start.tolist() == [sum(queries[:i]) for i in range(len(queries) + 1)]
        assert group.key_start.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
        assert group.query_start.dtype == group.key_start.dtype == torch.int32
        assert (group.max_query_len, group.max_seq_len) == (max(queries), max(lengths))
        assert group.rows.stop - group.rows.start == sum(queries)
    assert len(groups) == {10**6: 1, 1000: 2, 600: 3, 400: 5}[capacity]


def test_speculative_decoding_and_micro_batching_engines_keep_the_fused_kernel():
    assert engine_gathers(speculative_decoding=False, micro_batching=False)
    assert not engine_gathers(speculative_decoding=True, micro_batching=False)
    assert not engine_gathers(speculative_decoding=False, micro_batching=True)
