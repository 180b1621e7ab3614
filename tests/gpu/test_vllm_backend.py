"""The vLLM backend adapter against the kernel references, without an engine: vLLM's own metadata types,
a batch of two decodes, one prefill chunk after a cached prefix and one chunk without a prefix.
Needs vLLM importable (the GPU host); runs the kernels natively on CUDA, in the interpreter otherwise."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 64, 16, 24


@pytest.fixture
def backend(monkeypatch):
    from turboquant.vllm import backend

    config = SimpleNamespace(additional_config={"turboquant": "k4v4"},
                             model_config=SimpleNamespace(get_total_num_hidden_layers=lambda: 4),
                             parallel_config=SimpleNamespace(decode_context_parallel_size=1),
                             speculative_config=None)
    monkeypatch.setattr(backend, "get_current_vllm_config", lambda: config)
    return backend, config


def test_decode_and_prefill_rows_match_the_references(backend):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from turboquant.kernels.reference import decode_reference, extend_reference

    module, config = backend
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    impl = module.TurboQuantImpl(HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS)
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")  # a 4-bit (non-boundary) layer
    cache = torch.zeros(NUM_BLOCKS, KV_HEADS, BLOCK_SIZE * (32 + 32 + 8), dtype=torch.uint8, device=device)
    block_table = torch.tensor([[0, 1, 2, 0], [3, 4, 0, 0], [5, 6, 7, 0], [8, 9, 0, 0]], dtype=torch.int32)
    prefix, new = [39, 22, 30, 0], [1, 1, 10, 20]  # two decodes, a chunk after a prefix, a first chunk

    def slots(seq, start, count):
        positions = torch.arange(start, start + count)
        return (block_table[seq, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE).to(device)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)

    for seq, count in enumerate(prefix):
        if count:
            impl.do_kv_cache_update(layer, randn(count, KV_HEADS, HEAD_DIM), randn(count, KV_HEADS, HEAD_DIM),
                                    cache, slots(seq, 0, count))
    tokens = sum(new)
    query, keys, values = randn(tokens, HEADS, HEAD_DIM), randn(tokens, KV_HEADS, HEAD_DIM), randn(tokens, KV_HEADS, HEAD_DIM)
    slot_mapping = torch.cat([slots(seq, prefix[seq], count) for seq, count in enumerate(new)])
    impl.do_kv_cache_update(layer, keys, values, cache, slot_mapping)

    query_start = torch.tensor([0, 1, 2, 12, 32], dtype=torch.int32)
    seq_lens = torch.tensor([p + n for p, n in zip(prefix, new)], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=query_start.to(device), query_start_loc_cpu=query_start, seq_lens=seq_lens.to(device),
        num_reqs=4, num_actual_tokens=tokens, max_query_len=20, max_seq_len=int(seq_lens.max()),
        block_table_tensor=block_table.to(device), slot_mapping=slot_mapping, seq_lens_cpu_upper_bound=seq_lens)
    meta = module.TurboQuantMetadataBuilder(SimpleNamespace(), ["x"], config, device).build(0, common)
    assert (meta.num_decodes, meta.num_prefills, meta.prefill_has_prefix) == (2, 2, True)
    output = torch.full((tokens + 3, HEADS * HEAD_DIM), float("nan"), dtype=torch.bfloat16, device=device)
    padded = torch.cat([query, randn(3, HEADS, HEAD_DIM)])  # CUDA-graph padding rows are left alone
    impl.forward(layer, padded, keys, values, cache, meta, output)
    output = output.view(-1, HEADS, HEAD_DIM).float()

    codec, table = impl.codec, block_table.to(device)
    expected_decode = decode_reference(query[:2].float(), cache, codec, table[:2], seq_lens[:2].to(device), impl.scale)
    expected_prefill = extend_reference(query[2:].float(), keys[2:].float(), values[2:].float(),
                                        (query_start[2:] - 2).to(device), seq_lens[2:].to(device), cache, codec,
                                        table[2:], impl.scale)
    # bf16 output rounding (2^-8 relative) and fp16 level products inside the kernels
    torch.testing.assert_close(output[:2], expected_decode, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(output[2:tokens], expected_prefill, atol=2e-2, rtol=2e-2)


def test_a_batch_of_first_chunks_has_no_prefix(backend):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    module, config = backend
    query_start, seq_lens = torch.tensor([0, 5, 12], dtype=torch.int32), torch.tensor([5, 7], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=query_start, query_start_loc_cpu=query_start, seq_lens=seq_lens, num_reqs=2,
        num_actual_tokens=12, max_query_len=7, max_seq_len=7, block_table_tensor=torch.zeros(2, 1, dtype=torch.int32),
        slot_mapping=torch.arange(12), seq_lens_cpu_upper_bound=seq_lens)
    meta = module.TurboQuantMetadataBuilder(SimpleNamespace(), ["x"], config, "cpu").build(0, common)
    assert (meta.num_decodes, meta.num_prefills, meta.prefill_has_prefix, meta.prefill_max_query_len) == (0, 2, False, 7)
