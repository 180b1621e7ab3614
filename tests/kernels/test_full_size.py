"""The kernel-vs-reference checks at the size they run in production (GPU only)."""

import pytest
import torch

from turboquant.kernels.decode import paged_decode_attention
from turboquant.kernels.extend import extend_attention
from turboquant.kernels.latent import latent_decode, latent_gather
from turboquant.kernels.reference import (decode_reference, extend_reference, latent_decode_reference,
                                          latent_gather_reference)

from .paged import filled_cache, make_codec
from .test_decode import TOLERANCE
from .test_latent import filled, make

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("head_dim,num_q_heads,key_bits,value_bits", [
    (128, 32, 4, 4), (128, 32, 3, 3), (128, 32, 8, 4), (128, 32, 2, 2), (256, 16, 4, 4), (256, 16, 3, 3), (64, 32, 4, 3)])
def test_production_shapes_decode_and_extend(head_dim, num_q_heads, key_bits, value_bits, generator):
    """Llama-3.1-8B (d=128), Gemma-2-9B (d=256) and Llama-3.2-1B (d=64) attention shapes."""
    codec = make_codec(head_dim, key_bits, value_bits, num_kv_heads=8, block_size=16, device="cuda")
    seq_lens = [8192, 1000, 4097, 17]
    cache, block_table = filled_cache(codec, seq_lens, generator, "cuda")
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    query = torch.randn(4, num_q_heads, head_dim, generator=generator).cuda()
    out = paged_decode_attention(query, cache, codec, block_table, lengths, scale)
    torch.testing.assert_close(out, decode_reference(query, cache, codec, block_table, lengths, scale), **TOLERANCE)

    chunk = 512  # the last 512 tokens of sequence 0 as a fresh chunk over its compressed prefix
    starts = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
    query = torch.randn(chunk, num_q_heads, head_dim, generator=generator).cuda()
    keys = torch.randn(chunk, 8, head_dim, generator=generator).cuda().bfloat16()
    values = torch.randn(chunk, 8, head_dim, generator=generator).cuda().bfloat16()
    out = extend_attention(query, keys, values, starts, lengths[:1], cache, codec, block_table[:1], scale, chunk)
    expected = extend_reference(query, keys, values, starts, lengths[:1], cache, codec, block_table[:1], scale)
    torch.testing.assert_close(out, expected, **TOLERANCE)


@pytest.mark.parametrize("bits", [4, 3])
def test_production_shape_latent_decode_and_gather(bits, generator):
    """DeepSeek-V2-Lite's latent: kv_c 512 + k_pe 64, 16 heads; long and short sequences."""
    codec = make(512, 64, bits, 16, "cuda")
    seq_lens = [8192, 1000, 17]
    cache, table = filled(codec, seq_lens, generator, "cuda")
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    q_latent = torch.randn(3, 16, 512, generator=generator).cuda().bfloat16()
    q_pe = torch.randn(3, 16, 64, generator=generator).cuda().bfloat16()
    scale = 576**-0.5
    out = latent_decode(q_latent, q_pe, cache, codec, table, lengths, scale)
    expected = latent_decode_reference(q_latent, q_pe, cache, codec, table, lengths, scale)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)  # bf16 output rounding

    cu_seq_lens = torch.tensor([0, 8192, 9192, 9209], dtype=torch.int32, device="cuda")
    out_kv_c = torch.empty(9209, 512, device="cuda", dtype=torch.bfloat16)
    out_k_pe = torch.empty(9209, 64, device="cuda", dtype=torch.bfloat16)
    latent_gather(cache, codec, table, cu_seq_lens, 8192, out_kv_c, out_k_pe)
    for seq, length in enumerate(seq_lens):
        rows = slice(int(cu_seq_lens[seq]), int(cu_seq_lens[seq + 1]))
        kv_c, k_pe = latent_gather_reference(cache, codec, table[seq], 0, length)
        assert (out_kv_c[rows].float() - kv_c).abs().max() <= 8e-3 * kv_c.abs().max()
        assert torch.equal(out_k_pe[rows], k_pe)
