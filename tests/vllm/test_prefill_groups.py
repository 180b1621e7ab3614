"""How the vLLM backend splits a step's prefill chunks for gathering, without vLLM."""

import pytest
import torch

from turboquant.vllm.prefill_groups import (SHORT_CHUNK, chunk_decode_queries, decode_route_max_tokens,
                                            engine_gathers, prefill_groups, prefill_route)


def test_routes_follow_prefixes_chunk_lengths_and_programs():
    short, long = SHORT_CHUNK - 1, SHORT_CHUNK
    assert prefill_route([long, short], [0, 0], 8, 132, gathers=True) == "flash"
    # one long chunk gathers every prefix, a short tail's too
    assert prefill_route([long * 4, 8], [10, 5000], 8, 132, gathers=True) == "gather"
    assert prefill_route([long * 4, 8], [10, 5000], 8, 132, gathers=False) == "fused"
    # short chunks: the fused kernel where its programs (a request × kv head each) fill the SMs
    assert prefill_route([short] * 17, [5000] * 17, 8, 132, gathers=True) == "fused"
    assert prefill_route([short] * 17, [5000] * 17, 8, 132, gathers=False) == "fused"
    assert prefill_route([short] * 16, [5000] * 16, 8, 132, gathers=True) == "decode"
    assert prefill_route([short] * 16, [5000] * 16, 8, 128, gathers=True) == "fused"
    assert prefill_route([short, 3], [5000, 0], 8, 132, gathers=True) == "decode"


def test_chunk_tokens_become_decode_queries_that_see_their_own_positions():
    # chunks of 3, 1 and 2 tokens ending sequences of 10, 4 and 2 tokens
    query_start = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    seq_lens = torch.tensor([10, 4, 2], dtype=torch.int32)
    block_table = torch.randint(0, 100, (3, 5), dtype=torch.int32)
    rows, token_seq_lens = chunk_decode_queries(query_start, seq_lens, block_table, 6)
    assert token_seq_lens.tolist() == [8, 9, 10, 4, 1, 2] and token_seq_lens.dtype == torch.int32
    assert torch.equal(rows, block_table[[0, 0, 0, 1, 2, 2]])


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


@pytest.mark.parametrize("num_kv_heads, num_sms, max_num_seqs", [(8, 132, 1024), (2, 132, 32), (8, 132, 4), (1, 8, 64)])
def test_decode_route_max_tokens_is_the_most_the_decode_route_takes(num_kv_heads, num_sms, max_num_seqs):
    most = decode_route_max_tokens(num_kv_heads, num_sms, max_num_seqs)
    requests = most // (SHORT_CHUNK - 1)
    # that many requests' longest short chunks, each after a prefix, go the "decode" way; one more request
    # (where max_num_seqs allows it) or one more token in a chunk does not
    assert most % (SHORT_CHUNK - 1) == 0 and requests <= max_num_seqs
    assert prefill_route([SHORT_CHUNK - 1] * requests, [100] * requests, num_kv_heads, num_sms, True) == "decode"
    assert prefill_route([SHORT_CHUNK] + [SHORT_CHUNK - 1] * (requests - 1), [100] * requests, num_kv_heads,
                         num_sms, True) != "decode"
    if requests < max_num_seqs:
        assert prefill_route([1] * (requests + 1), [100] * (requests + 1), num_kv_heads, num_sms, True) != "decode"
