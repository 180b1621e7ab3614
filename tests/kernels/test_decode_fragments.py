"""The fragment decode kernel (`decode_fragments.py`, Gluon). Gluon does not run in the Triton
interpreter: on a GPU the kernel is checked against the PyTorch reference; on the CPU it is compiled for
sm_90 (Triton ships ptxas), which checks that every layout conversion in it moves no data and that its
loop keeps the levels out of shared memory."""

import json

import pytest
import torch

from turboquant.kernels import decode_fragments
from turboquant.kernels.decode import fragment_min_span, paged_decode_attention
from turboquant.kernels.reference import decode_reference

from .paged import filled_cache, make_codec
from .sass_scripts import run_sass_script
from .test_decode import TOLERANCE

needs_gluon = pytest.mark.skipif(decode_fragments.gluon is None, reason="this Triton has no Gluon")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (head_dim, block_size, num_q_heads, num_kv_heads): every head_dim, page sizes 16–128, GQA groups 1–8
CASES = [(64, 16, 8, 2), (128, 16, 32, 8), (128, 32, 7, 1), (128, 128, 16, 2), (256, 64, 3, 3)]


@needs_cuda
@needs_gluon
@pytest.mark.parametrize("head_dim,block_size,num_q_heads,num_kv_heads", CASES)
@pytest.mark.parametrize("options", [{}, {"sliding_window": 37}, {"softcap": 4.0},
                                     {"key_starts": [0, 1, 30, 96, 1500]}])  # the second sees no key at all
def test_fragment_decode_matches_reference(head_dim, block_size, num_q_heads, num_kv_heads, options, generator):
    codec = make_codec(head_dim, 4, 4, num_kv_heads, block_size, "cuda")
    seq_lens = [150, 1, 64, 97, 2000]
    # a split's last tile is read whole: the slots past the sequence's keys hold NaN norms
    cache, block_table = filled_cache(codec, seq_lens, generator, "cuda", fill=0xFF)
    query = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=generator).cuda()
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    if "key_starts" in options:
        options = {"key_starts": torch.tensor(options["key_starts"], dtype=torch.int32, device="cuda")}
    for num_splits in (None, 3):
        out, lse = paged_decode_attention(query, cache, codec, block_table, lengths, head_dim**-0.5,
                                          num_splits=num_splits, return_lse=True, fragments=True, **options)
        expected, expected_lse = decode_reference(query, cache, codec, block_table, lengths, head_dim**-0.5,
                                                  return_lse=True, **options)
        torch.testing.assert_close(out, expected, **TOLERANCE)
        torch.testing.assert_close(lse, expected_lse, **TOLERANCE)


@needs_cuda
@needs_gluon
def test_each_sequence_takes_the_split_kernel_its_length_picks(generator):
    """Batch 8 × 8 kv heads: sequences of ≥ 4096 visible keys (2^18 / 64 pairs) go to the fragment kernel,
    shorter ones to the Triton kernel, in one call (one CUDA graph's launches whatever the lengths)."""
    codec = make_codec(128, 4, 4, 8, 16, "cuda")
    seq_lens = [5000, 50, 4096, 4095, 0, 1, 300, 9000]
    cache, block_table = filled_cache(codec, seq_lens, generator, "cuda")
    assert fragment_min_span(codec, 8, 4, block_table.shape[1] * 16, torch.device("cuda")) == 4096
    query = torch.randn(len(seq_lens), 32, 128, generator=generator).cuda()
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    automatic = paged_decode_attention(query, cache, codec, block_table, lengths, 0.1)
    fragments = paged_decode_attention(query, cache, codec, block_table, lengths, 0.1, fragments=True)
    torch.testing.assert_close(automatic, decode_reference(query, cache, codec, block_table, lengths, 0.1), **TOLERANCE)
    long = lengths >= 4096
    assert torch.equal(automatic[long], fragments[long])  # the same kernel, splits and reduction
    assert not torch.equal(automatic[~long], fragments[~long])


@needs_gluon
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_fragment_kernel_compiles_without_shared_memory_in_its_loop(head_dim):
    """The design's premise: levels go from the byte permute to the MMA in registers. A layout that
    stops matching the MMA's fragments fails `convert_layout(..., assert_trivial=True)` at compile time,
    and one that sends levels through shared memory shows as shared-memory instructions in the loop.
    Compiled by `benchmarks/decode_sass.py` in a process without TRITON_INTERPRET."""
    sass = json.loads(run_sass_script("decode_sass.py", "--head-dim", str(head_dim)))
    assert sass["loop_mma"] == 3 * head_dim // 16  # a tile's score MMA (D/8) and value MMA (D/16)
    assert sass["loop_shared_memory"] == {}


@needs_gluon
def test_the_timeline_benchmark_still_stamps_the_kernel():
    """`benchmarks/decode_timeline.py` times each phase of a program in a copy of this kernel, edited at
    anchors in its source: a change to the kernel that moves one must update that script. Compiled for
    sm_90 on the CPU, like the test above."""
    stamped = json.loads(run_sass_script("decode_timeline.py", "--compile-only"))
    assert stamped["timer_reads"] == 7  # start, sequence length, query, first tile's codes, first, interior, last
