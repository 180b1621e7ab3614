"""The MLA latent cache kernels against their PyTorch references (fresh random inputs each run)."""

import itertools

import pytest
import torch

from turboquant.core import TurboQuantConfig, unpack_indices
from turboquant.kernels.latent import LatentCodec, LatentLayout, latent_decode, latent_gather, latent_store
from turboquant.kernels.reference import latent_decode_reference, latent_gather_reference, latent_store_reference

from .test_decode import TOLERANCE  # fp16 tensor-core operands, fp32 sums

# (latent_dim, rope_dim, bits, block_size, heads): every bit width, a latent of DeepSeek's 512 scaled
# down and one that is not a power of two, head counts below, at and above one program's 16.
CASES = [(64, 16, 4, 16, 4), (96, 32, 3, 32, 20), (128, 16, 2, 16, 16), (64, 24, 8, 64, 3)]


def make(latent_dim, rope_dim, bits, block_size, device, rope_dtype=torch.bfloat16) -> LatentCodec:
    return LatentCodec.from_config(TurboQuantConfig(key_bits=bits, value_bits=bits), latent_dim, rope_dim,
                                   block_size, rope_dtype, layer_idx=2, device=device)


def filled(codec, seq_lens, generator, device):
    layout = codec.layout
    per_seq = max(-(-n // layout.block_size) for n in seq_lens)
    num_blocks = len(seq_lens) * per_seq + 2
    table = torch.randperm(num_blocks, generator=generator)[: len(seq_lens) * per_seq].reshape(len(seq_lens), per_seq)
    slots = (table[:, :, None] * layout.block_size + torch.arange(layout.block_size)).flatten(1)
    slots = torch.cat([slots[i, :n] for i, n in enumerate(seq_lens)]).to(torch.int32)
    kv_c = torch.randn(slots.numel(), layout.latent_dim, generator=generator) * 2 + 0.3
    k_pe = torch.randn(slots.numel(), layout.rope_dim, generator=generator).to(layout.rope_dtype)
    cache = layout.allocate(num_blocks, device)
    latent_store(kv_c.to(device), k_pe.to(device), slots.to(device), cache, codec)
    return cache, table.to(torch.int32).to(device)


@pytest.mark.parametrize("latent_dim,rope_dim,bits,block_size,heads", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_matches_reference(latent_dim, rope_dim, bits, block_size, heads, dtype, device, generator):
    codec = make(latent_dim, rope_dim, bits, block_size, device)
    tokens, num_blocks = 41, 5
    kv_c = (torch.randn(tokens, latent_dim, generator=generator) * 3).to(dtype)
    k_pe = torch.randn(tokens, rope_dim, generator=generator).to(torch.bfloat16)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:tokens].to(torch.int32)
    slots[3] = -1
    cache, expected = codec.layout.allocate(num_blocks, device), codec.layout.allocate(num_blocks, device)
    latent_store(kv_c.to(device), k_pe.to(device), slots.to(device), cache, codec)
    latent_store_reference(kv_c.to(device), k_pe.to(device), slots.to(device), expected, codec)
    (codes, norms, rope), (want_codes, _, want_rope) = codec.layout.views(cache), codec.layout.views(expected)
    got_idx = unpack_indices(codes, bits, latent_dim).int()
    want_idx = unpack_indices(want_codes, bits, latent_dim).int()
    # dense fp32 rotation in the kernel, fast transform in the reference: a boundary tie moves one level
    assert (got_idx - want_idx).abs().max() <= 1 and (got_idx != want_idx).float().mean() < 1e-3
    # whatever level a coordinate took, the stored norm is ‖x‖/‖û‖ for the codes stored beside it
    stored = slots[slots >= 0].long()
    x_norms = torch.linalg.vector_norm(kv_c[slots >= 0].float(), dim=-1)
    own_norms = codec.quantizer.to("cpu").stored_norms(x_norms, got_idx.cpu().flatten(0, 1)[stored].long())
    torch.testing.assert_close(norms.cpu().flatten()[stored], own_norms, rtol=2e-6, atol=1e-6)
    assert torch.equal(rope, want_rope)  # k_pe is stored exactly
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0].long()] = False
    assert (norms.flatten()[untouched.to(device)] == 0).all()  # the skipped row (slot −1) wrote nothing


@pytest.mark.parametrize("latent_dim,rope_dim,bits,block_size,heads", CASES)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_matches_reference(latent_dim, rope_dim, bits, block_size, heads, num_splits, device, generator):
    codec = make(latent_dim, rope_dim, bits, block_size, device)
    seq_lens = [150, 1, 0, 70]
    cache, table = filled(codec, [max(n, 1) for n in seq_lens], generator, device)
    q_latent = torch.randn(len(seq_lens), heads, latent_dim, generator=generator).to(device)
    q_pe = torch.randn(len(seq_lens), heads, rope_dim, generator=generator).to(device)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = (latent_dim + rope_dim) ** -0.5
    out, lse = latent_decode(q_latent, q_pe, cache, codec, table, lengths, scale, num_splits, return_lse=True)
    expected, expected_lse = latent_decode_reference(q_latent, q_pe, cache, codec, table, lengths, scale, True)
    torch.testing.assert_close(out, expected, **TOLERANCE)
    torch.testing.assert_close(lse, expected_lse, **TOLERANCE)
    assert (out[2] == 0).all()  # an empty sequence


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_in_the_rotated_space(dtype, device, generator):
    """`rotated=True`: the caller's projections hold R, so q arrives as q·Rᵀ and the output stays rotated."""
    codec = make(64, 16, 4, 16, device)
    seq_lens = [40, 9]
    cache, table = filled(codec, seq_lens, generator, device)
    q_latent = torch.randn(2, 5, 64, generator=generator).to(device)
    q_pe = torch.randn(2, 5, 16, generator=generator).to(device, dtype)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    rotation = codec.rotation
    out = latent_decode((q_latent @ rotation.T).to(dtype), q_pe, cache, codec, table, lengths, 0.1, rotated=True)
    assert out.dtype == dtype
    expected = latent_decode_reference(q_latent, q_pe, cache, codec, table, lengths, 0.1) @ rotation.T
    tolerance = TOLERANCE if dtype == torch.float32 else dict(atol=2e-3 + 4e-3, rtol=4e-3)  # plus fp16 output
    torch.testing.assert_close(out.float(), expected, **tolerance)


@pytest.mark.parametrize("latent_dim,rope_dim,bits,block_size,heads", CASES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gather_matches_reference(latent_dim, rope_dim, bits, block_size, heads, out_dtype, device, generator):
    codec = make(latent_dim, rope_dim, bits, block_size, device)
    cached, starts, lengths = [150, 40, 70], [0, 7, 69], [150, 30, 1]
    cache, table = filled(codec, cached, generator, device)
    cu_seq_lens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    total, spare = int(cu_seq_lens[-1]), 3  # spare rows past the last sequence must stay as they are
    out_kv_c = torch.full((total + spare, latent_dim), 7.0, dtype=out_dtype, device=device)
    out_k_pe = torch.full((total + spare, rope_dim), 7.0, dtype=out_dtype, device=device)
    latent_gather(cache, codec, table, cu_seq_lens.to(device), max(lengths), out_kv_c, out_k_pe,
                  torch.tensor(starts, dtype=torch.int32, device=device))
    for seq, (start, length) in enumerate(zip(starts, lengths)):
        rows = slice(int(cu_seq_lens[seq]), int(cu_seq_lens[seq + 1]))
        kv_c, k_pe = latent_gather_reference(cache, codec, table[seq], start, length)
        # levels × R rounded to fp16 (2^-11), then the output dtype's rounding
        bound = (8e-3 if out_dtype == torch.bfloat16 else 2e-3) * kv_c.abs().max().item()  # as test_gather.py
        assert (out_kv_c[rows].float() - kv_c).abs().max().item() <= bound
        assert torch.equal(out_k_pe[rows], k_pe.to(out_dtype))
    assert (out_kv_c[total:] == 7.0).all() and (out_k_pe[total:] == 7.0).all()


def test_fp16_rope_and_bf16_queries(device, generator):
    codec = make(64, 16, 4, 16, device, rope_dtype=torch.float16)
    cache, table = filled(codec, [90, 33], generator, device)
    q_latent = torch.randn(2, 16, 64, generator=generator).to(device, torch.bfloat16)
    q_pe = torch.randn(2, 16, 16, generator=generator).to(device, torch.bfloat16)
    lengths = torch.tensor([90, 33], dtype=torch.int32, device=device)
    out = latent_decode(q_latent, q_pe, cache, codec, table, lengths, 0.1)
    assert out.dtype == torch.bfloat16
    expected = latent_decode_reference(q_latent, q_pe, cache, codec, table, lengths, 0.1)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)  # bf16 output rounding


def test_layout_bytes_and_bad_input(device):
    layout = LatentLayout(512, 64, 4, 16)
    assert layout.bytes_per_token == 256 + 4 + 128  # DeepSeek-V2's latent at 4 bits: 388 of bf16's 1152 bytes
    assert LatentLayout(512, 64, 3, 16).bytes_per_token == 192 + 4 + 128
    with pytest.raises(ValueError, match="bits"):
        LatentLayout(64, 16, 5, 16)
    with pytest.raises(ValueError, match="block_size"):
        LatentLayout(64, 16, 4, 6)
    codec = make(64, 16, 4, 16, device)
    cache = codec.layout.allocate(2, device)
    kv_c, k_pe = torch.randn(3, 64, device=device), torch.randn(3, 16, device=device)
    slots = torch.arange(3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="k_pe"):
        latent_store(kv_c, k_pe, slots, cache, codec)  # fp32 k_pe: the layout keeps bf16
    with pytest.raises(ValueError, match="cache"):
        latent_store(kv_c, k_pe.bfloat16(), slots, cache[:, :-2], codec)
    table = torch.zeros(1, 2, dtype=torch.int32, device=device)
    lengths = torch.tensor([3], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="q_latent"):
        latent_decode(torch.randn(1, 4, 32, device=device), torch.randn(1, 4, 16, device=device), cache, codec,
                      table, lengths, 0.1)
    out = torch.empty(3, 64, device=device), torch.empty(3, 16, device=device)
    with pytest.raises(ValueError, match="cu_seq_lens"):
        latent_gather(cache, codec, table, torch.tensor([0, 3, 3], dtype=torch.int32, device=device), 3, *out)
    with pytest.raises(ValueError, match="out_k_pe"):
        latent_gather(cache, codec, table, torch.tensor([0, 3], dtype=torch.int32, device=device), 3, out[0], out[0])
    with pytest.raises(ValueError, match="q_pe"):
        latent_decode(torch.randn(1, 4, 64, device=device), torch.randn(1, 4, 8, device=device), cache, codec,
                      table, lengths, 0.1)
