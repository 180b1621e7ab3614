import json

import pytest
import torch
import triton

from turboquant.kernels import extend, extend_hopper
from turboquant.kernels.extend import cached_attention, extend_attention
from turboquant.kernels.reference import cached_attention_reference, extend_reference

from .paged import filled_cache, make_codec
from .sass_scripts import run_sass_script
from .test_decode import CASES, TOLERANCE

# A chunk's first rows attend to two or three keys. Where two of similar weight carry values that cancel, a
# score's fp16 rounding (which grows with |q|·|k|) reaches the output almost whole: a call's worst error is
# 1.4-1.8e-3 typically and passed 4e-3 in 1 of 5,000 emulated calls at d=128 (4.1e-3; CI once saw 4.4e-3),
# against 2.1e-3 at most for decode (benchmarks/results/attention-rounding-cpu.md). Decode's tolerance, doubled.
CHUNK_TOLERANCE = {name: 2 * value for name, value in TOLERANCE.items()}


def chunks(query_lens: list[int], device: str) -> torch.Tensor:
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor(query_lens).cumsum(0)
    return starts.to(device)


def chunked_case(case, prefix_lens: list[int], query_lens: list[int], device, generator, key_scale: float = 1.0,
                 kv_dtype: torch.dtype = torch.bfloat16):
    """A cache filled with each sequence's prefix and chunk, and the chunks' queries and fresh K/V:
    (codec, cache, block table, `extend_attention`'s first five arguments)."""
    head_dim, key_bits, value_bits, block_size, num_q_heads, num_kv_heads = case
    codec = make_codec(head_dim, key_bits, value_bits, num_kv_heads, block_size, device)
    seq_lens = [p + q for p, q in zip(prefix_lens, query_lens)]
    cache, block_table = filled_cache(codec, seq_lens, generator, device)
    tokens = sum(query_lens)
    query = torch.randn(tokens, num_q_heads, head_dim, generator=generator).to(device)
    keys = (torch.randn(tokens, num_kv_heads, head_dim, generator=generator) * key_scale).to(device, kv_dtype)
    values = torch.randn(tokens, num_kv_heads, head_dim, generator=generator).to(device, kv_dtype)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return codec, cache, block_table, (query, keys, values, chunks(query_lens, device), lengths)


@pytest.mark.parametrize("head_dim,key_bits,value_bits,block_size,num_q_heads,num_kv_heads", CASES)
@pytest.mark.parametrize("options", [{}, {"sliding_window": 29}, {"softcap": 4.0}])
def test_extend_matches_reference(head_dim, key_bits, value_bits, block_size, num_q_heads, num_kv_heads, options,
                                  device, generator):
    case = (head_dim, key_bits, value_bits, block_size, num_q_heads, num_kv_heads)
    query_lens = [21, 70, 1]  # a chunk after a prefix, a first chunk, one token
    codec, cache, table, inputs = chunked_case(case, [90, 0, 33], query_lens, device, generator, key_scale=2.0)
    out = extend_attention(*inputs, cache, codec, table, head_dim**-0.5, max(query_lens), **options)
    expected = extend_reference(*inputs, cache, codec, table, head_dim**-0.5, **options)
    torch.testing.assert_close(out, expected, **CHUNK_TOLERANCE)


@pytest.mark.parametrize("case", [CASES[4], CASES[5]])
def test_extend_wide_programs_match_reference(case, device, generator, monkeypatch):
    """The program shape `extend_launch` picks where the grid fills the SMs (here: on a one-SM device),
    with rows past each chunk's end."""
    monkeypatch.setattr(extend, "multiprocessor_count", lambda device: 1)
    head_dim, num_q_heads, num_kv_heads = case[0], case[4], case[5]
    codec, cache, table, inputs = chunked_case(case, [70, 5], [43, 21], device, generator)
    group_pad = triton.next_power_of_2(num_q_heads // num_kv_heads)
    plan = extend.program_plan(codec.layout, num_q_heads, 2, 43, 256, False, 1)
    assert plan[1:] == (extend.WIDE_ROWS // group_pad, 1)  # query tokens per program, splits
    out = extend_attention(*inputs, cache, codec, table, head_dim**-0.5, 43)
    expected = extend_reference(*inputs, cache, codec, table, head_dim**-0.5)
    torch.testing.assert_close(out, expected, **CHUNK_TOLERANCE)


def test_narrow_plan_keeps_64_row_programs():
    """`narrow` (the Hopper kernel at d=256, `extend_hopper.narrow_only`) keeps programs of 64 query rows
    where the grid would otherwise take wide ones (a one-SM device)."""
    assert extend_hopper.narrow_only(256) and not extend_hopper.narrow_only(128)
    layout = make_codec(256, 4, 4, 8, 16, "cpu").layout
    wide = extend.program_plan(layout, 16, 2, 43, 256, False, 1)
    narrow = extend.program_plan(layout, 16, 2, 43, 256, False, 1, narrow=True)
    assert wide[1] == extend.WIDE_ROWS // 2 and narrow[1] == 64 // 2


def test_hopper_kernel_fits_shared_memory_at_every_program_shape():
    """Each program shape the Hopper kernel serves, as `extend_hopper.launch` runs it (unsplit, and split
    with every option), fits an sm_90 program's 227 KB of shared memory: a ring too deep for its tiles
    would fail only at launch, on the GPU. Compiled by `benchmarks/extend_sass.py` in a process without
    TRITON_INTERPRET."""
    rows = [json.loads(line) for line in run_sass_script("extend_sass.py").splitlines()]
    assert {(row["head_dim"], row["rows"]) for row in rows} == {(64, 64), (64, 128), (128, 64), (128, 128), (256, 64)}
    assert len(rows) == 10 and all(row["fits"] for row in rows), rows


@pytest.mark.parametrize("case, options, num_splits", [(CASES[0], {}, 2), (CASES[3], {"sliding_window": 29}, 5),
                                                       (CASES[4], {"softcap": 4.0}, 3)])
def test_extend_split_prefix_matches_reference(case, options, num_splits, device, generator):
    """Each query block's prefix split among programs and merged after (as `extend_attention` does where
    its programs would not fill the device), with key starts and the log-sum-exp: a split that sees no
    key (the second sequence's prefix is short, the third has none) must weigh nothing."""
    head_dim = case[0]
    codec, cache, table, inputs = chunked_case(case, [150, 9, 0], [21, 4, 6], device, generator)
    key_starts = torch.tensor([30, 0, 0], dtype=torch.int32, device=device)
    out, lse = extend_attention(*inputs, cache, codec, table, head_dim**-0.5, 21, key_starts=key_starts,
                                return_lse=True, num_splits=num_splits, **options)
    expected, expected_lse = extend_reference(*inputs, cache, codec, table, head_dim**-0.5, key_starts=key_starts,
                                              return_lse=True, **options)
    torch.testing.assert_close(out, expected, **CHUNK_TOLERANCE)
    torch.testing.assert_close(lse, expected_lse, **TOLERANCE)


def test_extend_rejects_bad_input(device, generator):
    codec = make_codec(64, 4, 4, 2, 16, device)
    cache, block_table = filled_cache(codec, [20], generator, device)
    query, keys = torch.randn(5, 4, 64, device=device), torch.randn(5, 2, 64, device=device)
    seq_lens = torch.tensor([20], dtype=torch.int32, device=device)
    starts = chunks([5], device)
    with pytest.raises(ValueError, match="query must be"):
        extend_attention(query[:4], keys, keys, starts, seq_lens, cache, codec, block_table, 0.1, 5)
    with pytest.raises(ValueError, match="query_start"):
        extend_attention(query, keys, keys, starts[:1], seq_lens, cache, codec, block_table, 0.1, 5)
    with pytest.raises(ValueError, match="values"):
        extend_attention(query, keys, keys[:, :, :32], starts, seq_lens, cache, codec, block_table, 0.1, 5)
    with pytest.raises(ValueError, match="num_splits"):
        extend_attention(query, keys, keys, starts, seq_lens, cache, codec, block_table, 0.1, 5, num_splits=0)
    with pytest.raises(ValueError, match="out must have shape"):
        extend_attention(query, keys, keys, starts, seq_lens, cache, codec, block_table, 0.1, 5,
                         out=torch.empty(5, 2, 64, device=device))
    with pytest.raises(ValueError, match="sliding_window"):
        extend_attention(query, keys, keys, starts, seq_lens, cache, codec, block_table, 0.1, 5, sliding_window=-1)
    with pytest.raises(ValueError, match="softcap"):
        extend_attention(query, keys, keys, starts, seq_lens, cache, codec, block_table, 0.1, 5, softcap=-1.0)
    with pytest.raises(ValueError, match="key_starts"):
        extend_attention(query, keys, keys, starts, seq_lens, cache, codec, block_table, 0.1, 5,
                         key_starts=torch.zeros(2, dtype=torch.int32, device=device))


@pytest.mark.parametrize("head_dim,key_bits,value_bits,block_size,num_q_heads,num_kv_heads", [CASES[1], CASES[3]])
def test_extend_key_starts_and_log_sum_exp(head_dim, key_bits, value_bits, block_size, num_q_heads, num_kv_heads,
                                          device, generator):
    case = (head_dim, key_bits, value_bits, block_size, num_q_heads, num_kv_heads)
    codec, cache, table, inputs = chunked_case(case, [90, 40, 0], [21, 3, 9], device, generator,
                                               kv_dtype=torch.float32)
    key_starts = torch.tensor([17, 40, 0], dtype=torch.int32, device=device)  # inside, at the end of a prefix
    out, lse = extend_attention(*inputs, cache, codec, table, head_dim**-0.5, 21, key_starts=key_starts,
                                return_lse=True)
    expected, expected_lse = extend_reference(*inputs, cache, codec, table, head_dim**-0.5, key_starts=key_starts,
                                              return_lse=True)
    torch.testing.assert_close(out, expected, **CHUNK_TOLERANCE)
    torch.testing.assert_close(lse, expected_lse, **TOLERANCE)


def test_extend_fresh_keys_and_values_of_different_dtypes(device, generator):
    """Fresh keys and values share one rotation launch where their dtypes match; fp32 keys beside bf16
    values take one launch each, and the output still matches the reference."""
    head_dim = CASES[1][0]
    codec, cache, table, (query, keys, values, starts, lengths) = chunked_case(CASES[1], [40, 0], [9, 5], device,
                                                                               generator)
    inputs = (query, keys.float(), values, starts, lengths)
    out = extend_attention(*inputs, cache, codec, table, head_dim**-0.5, 9)
    expected = extend_reference(*inputs, cache, codec, table, head_dim**-0.5)
    torch.testing.assert_close(out, expected, **CHUNK_TOLERANCE)


# the window and soft-capping code is extend's (tested above over every case): one case each here
@pytest.mark.parametrize("case, options", [(CASES[1], {}), (CASES[3], {"sliding_window": 29}),
                                           (CASES[5], {"softcap": 4.0})])
def test_cached_attention_matches_reference(case, options, device, generator):
    head_dim, key_bits, value_bits, block_size, num_q_heads, num_kv_heads = case
    codec = make_codec(head_dim, key_bits, value_bits, num_kv_heads, block_size, device)
    seq_lens, query_lens = [111, 70, 34], [21, 70, 1]  # a later chunk, a whole prompt, a decode step
    cache, block_table = filled_cache(codec, seq_lens, generator, device)
    query = torch.randn(sum(query_lens), num_q_heads, head_dim, generator=generator).to(device)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    starts = chunks(query_lens, device)
    out = cached_attention(query, starts, seq_lens_t, cache, codec, block_table, head_dim**-0.5, max(query_lens),
                           **options)
    expected = cached_attention_reference(query, starts, seq_lens_t, cache, codec, block_table, head_dim**-0.5,
                                          **options)
    torch.testing.assert_close(out, expected, **CHUNK_TOLERANCE)


def test_cached_attention_is_invariant_to_chunking_and_batching(device, generator):
    """One sequence's outputs, bit for bit: as one prompt, as two chunks, and token by token as decode
    steps batched with other sequences (vLLM's batch-invariant mode relies on it)."""
    head_dim, length, options = 128, 48, {"sliding_window": 29}
    codec = make_codec(head_dim, 4, 4, 2, 16, device)
    others = [45, 90]
    cache, block_table = filled_cache(codec, [length, *others], generator, device)
    query = torch.randn(length, 8, head_dim, generator=generator).to(device)

    def run(rows: slice, seq_len: int, batch_with_others: bool = False) -> torch.Tensor:
        parts, lens, tables = [query[rows]], [seq_len], [block_table[0]]
        if batch_with_others:
            parts += [torch.randn(1, 8, head_dim, generator=generator).to(device) for _ in others]
            lens, tables = lens + others, tables + list(block_table[1:])
        lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
        starts = chunks([p.shape[0] for p in parts], device)
        out = cached_attention(torch.cat(parts), starts, lens_t, cache, codec, torch.stack(tables), head_dim**-0.5,
                               max(p.shape[0] for p in parts), **options)
        return out[:rows.stop - rows.start]

    whole = run(slice(0, length), length)
    two_chunks = torch.cat([run(slice(0, 19), 19), run(slice(19, length), length)])
    decode_steps = torch.cat([run(slice(t, t + 1), t + 1, batch_with_others=True) for t in range(length)])
    # On a GPU a tile's rows are multiplied alike, wherever they sit: bit for bit. The interpreter's
    # numpy matmul rounds a row by its position in the tile (an fp32 ulp, which can move q's fp16
    # rounding by one): there, within the kernels' fp16-operand tolerance, which still catches a
    # wrong position or mask (errors of order 1).
    exact = dict(atol=0, rtol=0) if device == "cuda" else TOLERANCE
    torch.testing.assert_close(two_chunks, whole, **exact)
    torch.testing.assert_close(decode_steps, whole, **exact)


def test_cached_attention_rejects_bad_input(device, generator):
    codec = make_codec(64, 4, 4, 2, 16, device)
    cache, block_table = filled_cache(codec, [20], generator, device)
    query, seq_lens, starts = torch.randn(5, 4, 64, device=device), torch.tensor([20], dtype=torch.int32,
                                                                                  device=device), chunks([5], device)
    with pytest.raises(ValueError, match="query must be"):
        cached_attention(query[:, :3], starts, seq_lens, cache, codec, block_table, 0.1, 5)
    with pytest.raises(ValueError, match="query_start"):
        cached_attention(query, starts[:1], seq_lens, cache, codec, block_table, 0.1, 5)
