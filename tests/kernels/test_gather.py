import pytest
import torch

from turboquant.kernels.gather import _gather_kernel, gather_sequences
from turboquant.kernels.reference import gather_sequence_reference

from .paged import filled_cache, make_codec
from .test_decode import CASES
from .test_extend import chunks

# Levels are fp16 (11-bit significands) and the un-rotation is fp32-accurate, so an fp32 output is within
# a few 1e-4 of the largest entry; a bf16 output adds its own rounding (2^-9 relative).
RELATIVE_ERROR = {torch.float32: 2e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("head_dim,key_bits,value_bits,block_size,num_q_heads,num_kv_heads,out_dtype",
                         [case + (torch.bfloat16,) for case in CASES] + [CASES[0] + (torch.float32,),
                                                                          CASES[4] + (torch.float32,)])
def test_gather_matches_reference(head_dim, key_bits, value_bits, block_size, num_q_heads, num_kv_heads, out_dtype,
                                  device, generator):
    codec = make_codec(head_dim, key_bits, value_bits, num_kv_heads, block_size, device)
    prefix_lens, query_lens = [90, 0, 33, 70], [21, 70, 1, 0]  # after a prefix, a first chunk, one token, none
    seq_lens = [p + q for p, q in zip(prefix_lens, query_lens)]
    cache, block_table = filled_cache(codec, seq_lens, generator, device)
    tokens = sum(query_lens)
    keys = (torch.randn(tokens, num_kv_heads, head_dim, generator=generator) * 2).to(device, torch.bfloat16)
    values = torch.randn(tokens, num_kv_heads, head_dim, generator=generator).to(device, torch.bfloat16)
    gap = 5  # rows between sequences that the kernel must leave alone
    key_start = [0]
    for length in seq_lens:
        key_start.append(key_start[-1] + length + gap)
    sentinel = 123.0
    out_keys = torch.full((key_start[-1], num_kv_heads, head_dim), sentinel, dtype=out_dtype, device=device)
    out_values = out_keys.clone()
    query_start = chunks(query_lens, device)
    gather_sequences(keys, values, query_start, torch.tensor(seq_lens, dtype=torch.int32, device=device), cache,
                     codec, block_table, torch.tensor(key_start, dtype=torch.int32, device=device), max(seq_lens),
                     out_keys, out_values)

    for seq, (prefix, length) in enumerate(zip(prefix_lens, seq_lens)):
        rows = slice(key_start[seq], key_start[seq] + length)
        fresh = slice(int(query_start[seq]), int(query_start[seq + 1]))
        expected = gather_sequence_reference(cache, codec, block_table[seq], prefix)
        for name, got, prefix_rows, chunk_rows in (("keys", out_keys[rows], expected[0], keys[fresh]),
                                                   ("values", out_values[rows], expected[1], values[fresh])):
            if prefix:
                error = (got[:prefix].float() - prefix_rows).abs().max().item()
                assert error <= RELATIVE_ERROR[out_dtype] * prefix_rows.abs().max().item(), (name, seq, error)
            assert torch.equal(got[prefix:], chunk_rows.to(out_dtype)), (name, seq)  # copied as they are
        untouched = slice(key_start[seq] + length, key_start[seq + 1])
        assert bool((out_keys[untouched] == sentinel).all() and (out_values[untouched] == sentinel).all())


def test_gather_of_an_empty_sequence_writes_nothing(device, generator):
    """The vLLM backend compiles the kernel before serving by such a launch
    (`TurboQuantImpl._compile_serving_kernels`)."""
    codec = make_codec(64, 4, 4, 2, 16, device)
    cache, block_table = filled_cache(codec, [20], generator, device)
    keys = torch.randn(3, 2, 64, generator=generator).to(device, torch.bfloat16)
    zeros = torch.zeros(2, dtype=torch.int32, device=device)
    out = torch.full((1, 2, 64), 123.0, dtype=torch.bfloat16, device=device)
    gather_sequences(keys[:1], keys[:1], zeros, zeros[:1], cache, codec, block_table, zeros, 1, out, out)
    assert bool((out == 123.0).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts Triton's compiled variants: GPU only")
def test_gather_after_the_compile_launch_compiles_nothing_more(generator):
    """The backend's prefill rows slice vLLM's metadata at any request (seq_lens[decodes:]): such a call must
    reuse what the backend's empty launch compiled, or serving stalls on a compile (H200, b32 x 1024: 0.86x
    bf16's tok/s when a stand-in pointer followed the slice's alignment)."""
    codec = make_codec(64, 4, 4, 2, 16, "cuda")
    seq_lens = [20, 30, 40, 50]
    cache, block_table = filled_cache(codec, seq_lens, generator, "cuda")
    keys = torch.randn(8, 2, 64, generator=generator).to("cuda", torch.bfloat16)
    zeros = torch.zeros(2, dtype=torch.int32, device="cuda")
    out = torch.empty(200, 2, 64, dtype=torch.bfloat16, device="cuda")
    gather_sequences(keys[:1], keys[:1], zeros, zeros[:1], cache, codec, block_table[:1], zeros, 1, out, out)
    compiled = _gather_kernel.device_caches[torch.cuda.current_device()][0]
    variants = len(compiled)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    for first in (1, 2, 3):  # int32 metadata 4, 8 and 12 bytes past an aligned start
        query_lens = [2] * (len(seq_lens) - first)
        gather_sequences(keys[:sum(query_lens)], keys[:sum(query_lens)], chunks(query_lens, "cuda"),
                         lengths[first:], cache, codec, block_table[first:],
                         chunks(seq_lens[first:], "cuda"), max(seq_lens), out, out)
    assert len(compiled) == variants


def test_gather_rejects_bad_input(device, generator):
    codec = make_codec(64, 4, 4, 2, 16, device)
    cache, block_table = filled_cache(codec, [20], generator, device)
    keys = torch.randn(5, 2, 64, device=device)
    seq_lens = torch.tensor([20], dtype=torch.int32, device=device)
    query_start, key_start = chunks([5], device), chunks([20], device)
    out = torch.empty(20, 2, 64, device=device)
    with pytest.raises(ValueError, match="key_start"):
        gather_sequences(keys, keys, query_start, seq_lens, cache, codec, block_table, key_start[:1], 20, out, out)
    with pytest.raises(ValueError, match="out_values must have shape"):
        gather_sequences(keys, keys, query_start, seq_lens, cache, codec, block_table, key_start, 20, out,
                         out[:, :1])
    with pytest.raises(ValueError, match="values"):
        gather_sequences(keys, keys[:, :, :32], query_start, seq_lens, cache, codec, block_table, key_start, 20,
                         out, out)
