"""The kernel-vs-reference checks at the size they run in production (GPU only)."""

import pytest
import torch

from turboquant.kernels.decode import paged_decode_attention
from turboquant.kernels.extend import extend_attention
from turboquant.kernels.reference import decode_reference, extend_reference

from .paged import filled_cache, make_codec
from .test_decode import TOLERANCE

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
