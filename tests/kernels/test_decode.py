import json

import pytest
import torch

from turboquant.kernels import decode
from turboquant.kernels.decode import launch_triton_split, paged_decode_attention, reduce_splits
from turboquant.kernels.reference import decode_reference
from turboquant.kernels.rotate import rotate
from turboquant.kernels.store import compress_store

from .paged import filled_cache, make_codec
from .sass_scripts import run_sass_script

# (head_dim, key_bits, value_bits, block_size, num_q_heads, num_kv_heads): every bit width on each side,
# every head_dim, block sizes 16–128, MHA and GQA groups of 1, 4, 6 and 8.
CASES = [
    (64, 4, 4, 16, 8, 2), (80, 3, 8, 32, 6, 1), (96, 2, 3, 16, 4, 4), (128, 8, 2, 64, 32, 4),
    (256, 4, 3, 128, 8, 2), (128, 3, 4, 16, 16, 2),
]
# Scores and the value sum multiply fp16 operands (q and the levels, 11-bit significands) with fp32
# accumulation; a call's worst output error is 0.6-0.8e-3 typically and 2.1e-3 at most in 5,000 emulated
# calls (benchmarks/results/attention-rounding-cpu.md), so 4e-3 leaves room without hiding a wrong level.
TOLERANCE = dict(atol=4e-3, rtol=4e-3)
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="too long for the interpreter")


@pytest.mark.parametrize("head_dim,key_bits,value_bits,block_size,num_q_heads,num_kv_heads", CASES)
@pytest.mark.parametrize("options", [{}, {"sliding_window": 37}, {"softcap": 4.0},
                                     {"key_starts": [0, 1, 30, 96]}])  # the second sees no key at all
def test_decode_matches_reference(head_dim, key_bits, value_bits, block_size, num_q_heads, num_kv_heads, options,
                                  device, generator):
    codec, query, cache, block_table, lengths, options = decode_inputs(
        (head_dim, key_bits, value_bits, block_size, num_q_heads, num_kv_heads), options, device, generator)
    out, lse = paged_decode_attention(query, cache, codec, block_table, lengths, head_dim**-0.5, num_splits=3,
                                      return_lse=True, **options)
    expected, expected_lse = decode_reference(query, cache, codec, block_table, lengths, head_dim**-0.5,
                                              return_lse=True, **options)
    torch.testing.assert_close(out, expected, **TOLERANCE)
    torch.testing.assert_close(lse, expected_lse, **TOLERANCE)


def decode_inputs(case, options, device, generator):
    """(codec, query, cache, block table, lengths, options with key_starts as a tensor) for one of CASES:
    four sequences of 150, 1, 64 and 97 keys."""
    head_dim, key_bits, value_bits, block_size, num_q_heads, num_kv_heads = case
    codec = make_codec(head_dim, key_bits, value_bits, num_kv_heads, block_size, device)
    seq_lens = [150, 1, 64, 97]
    cache, block_table = filled_cache(codec, seq_lens, generator, device)
    query = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=generator).to(device)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    if "key_starts" in options:
        options = {"key_starts": torch.tensor(options["key_starts"], dtype=torch.int32, device=device)}
    return codec, query, cache, block_table, lengths, options


@pytest.mark.parametrize("token_rows", [True, False])
@pytest.mark.parametrize("case", [CASES[0], CASES[4]])
@pytest.mark.parametrize("options", [{"softcap": 4.0}, {"key_starts": [0, 1, 30, 96]}])
def test_both_orientations_of_the_split_kernel_match_the_reference(token_rows, case, options, device, generator,
                                                                    monkeypatch):
    """`decode_launch` picks the orientation by the codec's widths and lookups (the interpreter gathers, so
    by default it runs one): each is forced here."""
    chosen = decode.decode_launch
    monkeypatch.setattr(decode, "decode_launch", lambda *args: chosen(*args) | {"TOKEN_ROWS": token_rows})
    codec, query, cache, block_table, lengths, options = decode_inputs(case, options, device, generator)
    scale = case[0] ** -0.5
    out = paged_decode_attention(query, cache, codec, block_table, lengths, scale, num_splits=3, fragments=False,
                                 **options)
    expected = decode_reference(query, cache, codec, block_table, lengths, scale, **options)
    torch.testing.assert_close(out, expected, **TOLERANCE)


def test_the_transposed_split_kernel_compiles_to_warpgroup_mma_with_its_tables_in_registers():
    """The premises of the 4-bit split kernel's form, in its sm_90 code: with the tokens as rows a tile's
    products are Hopper warpgroup MMAs and nothing spills; with the lookup tables as inputs the loop is
    shorter than with them as constants (no copy before every byte permute). Compiled by
    `benchmarks/split_sass.py` in a process without TRITON_INTERPRET."""
    output = run_sass_script("split_sass.py", "--cases", "k4v4:128")
    rows = {row["variant"]: row for row in map(json.loads, output.splitlines())}
    token_rows = rows["token_rows"]
    assert set(token_rows["loop_mma"]) == {"HGMMA.64x16x16.F32"} and token_rows["stack_bytes"] == 0
    assert token_rows["loop_instructions"] < rows["token_rows_constant_tables"]["loop_instructions"]


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16, 17])  # 17: the un-rotation in a launch of its own
def test_decode_does_not_depend_on_splits(num_splits, device, generator):
    codec = make_codec(64, 4, 4, 2, 16, device)
    seq_lens = [130, 3]
    cache, block_table = filled_cache(codec, seq_lens, generator, device)
    query = torch.randn(2, 4, 64, generator=generator).to(device)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    expected = decode_reference(query, cache, codec, block_table, lengths, 0.125)
    out = paged_decode_attention(query, cache, codec, block_table, lengths, 0.125, num_splits=num_splits)
    torch.testing.assert_close(out, expected, **TOLERANCE)


@pytest.mark.parametrize("options, shortest_long", [({}, 64), ({"sliding_window": 37}, 30)])
def test_sequences_split_between_launches_by_their_visible_keys(options, shortest_long, device, generator):
    """`paged_decode_attention` may serve a call's short sequences with the Triton split kernel and its
    long ones with the fragment kernel, each at its own split count, into one set of partials. Here two
    Triton launches share them that way: partials start as NaN, so a slot that neither fills, or a
    sequence that neither serves, shows in the output."""
    codec = make_codec(64, 4, 4, 2, 16, device)
    seq_lens = [150, 0, 64, 97, 20, 63]  # visible keys with the window: 37, 0, 37, 37, 20, 37
    cache, block_table = filled_cache(codec, seq_lens, generator, device)
    query = torch.randn(len(seq_lens), 4, 64, generator=generator).to(device)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    window = options.get("sliding_window")
    rotated_query = rotate(query, codec)
    partial_out = torch.full((len(seq_lens), 4, 4, 64), float("nan"), device=device)
    partial_lse = torch.full((len(seq_lens), 4, 4), float("nan"), device=device)
    for num_splits, spans in ((2, dict(max_span=shortest_long - 1)), (4, dict(min_span=shortest_long))):
        launch_triton_split(rotated_query, cache, codec, block_table, lengths, None, partial_out, partial_lse, 0.125,
                            None, window, num_splits, **spans)
    out = torch.empty_like(query)
    reduce_splits(partial_out, partial_lse, out, None, rotation=codec.rotation)
    expected = decode_reference(query, cache, codec, block_table, lengths, 0.125, sliding_window=window)
    torch.testing.assert_close(out, expected, **TOLERANCE)
    with pytest.raises(ValueError, match="must divide"):
        launch_triton_split(rotated_query, cache, codec, block_table, lengths, None, partial_out, partial_lse, 0.125,
                            None, None, 3)


def test_a_query_rotated_beforehand_gives_the_same_output(device, generator):
    codec = make_codec(128, 4, 4, 2, 16, device)
    seq_lens = [70, 33, 0]
    cache, block_table = filled_cache(codec, seq_lens, generator, device)
    query = torch.randn(3, 8, 128, generator=generator).to(device, torch.bfloat16)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    expected = paged_decode_attention(query, cache, codec, block_table, lengths, 128**-0.5)
    out = torch.empty_like(query)
    paged_decode_attention(rotate(query, codec), cache, codec, block_table, lengths, 128**-0.5, out=out,
                           query_rotated=True)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_split_kernel_rotating_the_query_itself_gives_the_rotated_querys_output(head_dim, dtype, device,
                                                                                   generator, monkeypatch):
    """Up to ROTATE_IN_SPLIT_MAX_BATCH sequences each split program rotates its group's query rows, with the
    rotation launch's math: the output of a call that launched the rotation, bit for bit on a GPU; in the
    interpreter, whose dots sum a [16, D] tile in another order than the launch's [16, 64] ones, within the
    tolerance of fp16 operands (the rotated query is rounded to fp16, where a sum rounded differently moves
    it by one unit)."""
    codec = make_codec(head_dim, 4, 3, 2, 16, device)
    seq_lens = [70, 33, 0]
    cache, block_table = filled_cache(codec, seq_lens, generator, device)
    query = torch.randn(3, 8, head_dim, generator=generator).to(device, dtype)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    rotations = []
    monkeypatch.setattr(decode, "rotate", lambda x, *args, **kw: rotations.append(x) or rotate(x, *args, **kw))
    outs = []
    for most in (0, 3):
        monkeypatch.setattr(decode, "ROTATE_IN_SPLIT_MAX_BATCH", most)
        outs.append(paged_decode_attention(query, cache, codec, block_table, lengths, head_dim**-0.5,
                                           num_splits=2).float())
        assert len(rotations) == 1  # the query's, in the first call only (the reduction un-rotates the output)
    if torch.device(device).type == "cuda":
        assert torch.equal(outs[1], outs[0])
    else:  # a bf16 output moved across a rounding point moves by one unit of it: up to 2^-7 of |out|
        moved = dict(atol=TOLERANCE["atol"], rtol=1e-2) if dtype == torch.bfloat16 else TOLERANCE
        torch.testing.assert_close(outs[1], outs[0], **moved)
    expected = decode_reference(query, cache, codec, block_table, lengths, head_dim**-0.5)
    rounding = 2e-2 if dtype == torch.bfloat16 else TOLERANCE["atol"]  # of the bf16 output
    torch.testing.assert_close(outs[1], expected, atol=rounding, rtol=rounding)


@pytest.mark.parametrize("seq_lens, num_kv_heads", [
    ([300], 2), ([150, 1, 64, 0], 2),
    # on a GPU, both split kernels (as in test_decode_fragments), then the fragment kernel's sequences only
    pytest.param([9000, 50, 8192, 8191, 0, 1, 300, 12000], 8, marks=GPU_ONLY),
    pytest.param([9000, 8192, 12000, 16000, 8500, 8193, 9999, 10000], 8, marks=GPU_ONLY)])
def test_a_decode_step_chained_to_its_store(seq_lens, num_kv_heads, device, generator):
    """A decode step as the vLLM backend launches it: the store writes each sequence's newest key and
    rotates the queries, and the split kernel (and, in the long batches on a GPU, the fragment kernel after
    it) starts while the store runs (programmatic dependent launch; plain launches on the CPU). It must
    read the keys and the query the store wrote: the output is the unchained step's, bit for bit. Where
    every sequence is long, all the Triton kernel's programs only skip, and the fragment kernel must still
    not start before the store is done."""
    codec = make_codec(128, 4, 4, num_kv_heads, 16, device)
    cache, block_table = filled_cache(codec, seq_lens, generator, device)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    newest = (lengths - 1).clamp(min=0).long()
    slots = block_table.gather(1, newest[:, None] // 16)[:, 0] * 16 + newest % 16
    slots = torch.where(lengths > 0, slots, -1).to(torch.int32)
    keys, values = (torch.randn(len(seq_lens), num_kv_heads, 128, generator=generator).to(device, torch.bfloat16)
                    for _ in range(2))
    query = torch.randn(len(seq_lens), 4 * num_kv_heads, 128, generator=generator).to(device, torch.bfloat16)
    outs = []
    for chained in (True, False):
        rotated = compress_store(keys, values, slots, cache, codec, queries=query, launch_dependents=chained)
        outs.append(paged_decode_attention(rotated, cache, codec, block_table, lengths, 128**-0.5,
                                           query_rotated=True, after_store=chained).float())
    expected = decode_reference(query, cache, codec, block_table, lengths, 128**-0.5)
    torch.testing.assert_close(outs[0], expected, atol=2e-2, rtol=2e-2)  # bf16 output rounding
    assert torch.equal(outs[0], outs[1])


def test_decode_empty_sequence_and_bf16_query(device, generator):
    codec = make_codec(128, 4, 4, 2, 16, device)
    cache, block_table = filled_cache(codec, [40, 40], generator, device)
    query = torch.randn(2, 4, 128, generator=generator).to(device, torch.bfloat16)
    lengths = torch.tensor([0, 40], dtype=torch.int32, device=device)
    out = paged_decode_attention(query, cache, codec, block_table, lengths, 128**-0.5)
    assert out.dtype == torch.bfloat16
    assert (out[0] == 0).all()
    expected = decode_reference(query, cache, codec, block_table, lengths, 128**-0.5)
    torch.testing.assert_close(out[1].float(), expected[1], atol=2e-2, rtol=2e-2)  # bf16 output rounding


@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_queries_match_the_reference_in_their_own_dtype(head_dim, dtype, device, generator):
    """vLLM hands bf16/fp16 queries over as they are: they are rotated from their 16-bit parts."""
    codec = make_codec(head_dim, 4, 3, 2, 16, device)
    seq_lens = [70, 33]
    cache, block_table = filled_cache(codec, seq_lens, generator, device)
    query = torch.randn(2, 8, head_dim, generator=generator).to(device, dtype)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    out = paged_decode_attention(query, cache, codec, block_table, lengths, head_dim**-0.5, num_splits=2)
    expected = decode_reference(query, cache, codec, block_table, lengths, head_dim**-0.5)
    assert out.dtype == dtype
    rounding = 2e-2 if dtype == torch.bfloat16 else 4e-3  # of the 16-bit output
    torch.testing.assert_close(out.float(), expected, atol=rounding, rtol=rounding)


def test_decode_rejects_bad_input(device, generator):
    codec = make_codec(64, 4, 3, 2, 16, device)
    cache, block_table = filled_cache(codec, [20], generator, device)
    query = torch.randn(1, 4, 64, device=device)
    lengths = torch.tensor([20], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="query"):
        paged_decode_attention(query[..., :32], cache, codec, block_table, lengths, 0.1)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(query[:, :3], cache, codec, block_table, lengths, 0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(query, cache, codec, block_table, lengths.long(), 0.1)
    with pytest.raises(ValueError, match="block_table"):
        paged_decode_attention(query, cache, codec, block_table.long(), lengths, 0.1)
    with pytest.raises(ValueError, match="out must have shape"):
        paged_decode_attention(query, cache, codec, block_table, lengths, 0.1, out=torch.empty(1, 4, 32, device=device))
    with pytest.raises(ValueError, match="cache"):
        paged_decode_attention(query, cache[..., :-4], codec, block_table, lengths, 0.1)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention(query, cache, codec, block_table, lengths, 0.1, sliding_window=0)
    with pytest.raises(ValueError, match="softcap"):
        paged_decode_attention(query, cache, codec, block_table, lengths, 0.1, softcap=0.0)
    with pytest.raises(ValueError, match="key_starts"):
        paged_decode_attention(query, cache, codec, block_table, lengths, 0.1, key_starts=lengths.long())
    with pytest.raises(ValueError, match="fragment decode kernel"):  # it serves k4v4 only
        paged_decode_attention(query, cache, codec, block_table, lengths, 0.1, fragments=True)



def test_the_reduction_compiles_for_sm90_with_every_output_and_shared_unrotation():
    """The interpreter runs code that Triton's compiler may reject (a constexpr `and` a tensor in a
    condition did): the reduction with its log-sum-exp, the exact ring's split and its un-rotation shared
    by four programs must compile for sm_90 at every tiling `paged_decode_attention` launches. Compiled by
    `benchmarks/reduce_sass.py` in a process without TRITON_INTERPRET."""
    output = run_sass_script("reduce_sass.py", "--column-programs", "4", "--lse-and-extra")
    rows = list(map(json.loads, output.splitlines()))
    assert len(rows) == 15 and all(row["instructions"] > 0 for row in rows)


@pytest.mark.parametrize("num_splits, split_block, unrotate, extra, column_programs", [
    (5, 2, False, 0, 1), (8, 8, False, 0, 1), (3, 1, False, 0, 1), (5, 2, True, 0, 1), (8, 4, True, 0, 1),
    (5, 2, False, 1, 1), (8, 4, True, 1, 1), (5, 2, True, 2, 2), (3, 1, False, 2, 1)])
def test_split_reduction_in_blocks_matches_one_softmax(num_splits, split_block, unrotate, extra, column_programs,
                                                       device, generator):
    """The reduction merges partial outputs `split_block` splits at a time (wide latents would spill
    holding them all); a split that saw no key (lse −inf, its partial output never written: NaN here)
    and a row that saw none at all weigh 0. `unrotate`: 16 rows per program, then x @ R, its 32 columns
    in blocks of 16 (`column_programs` 2: one block each in two programs). `extra`: that many more partials
    per row from buffers of their own (`exact_ring`'s), merged as that many more splits."""
    import triton

    from turboquant.kernels.decode import UNROTATE_ROWS, _decode_reduce_kernel

    batch, heads, head_dim, pad = 3, 7, 24, 32  # rows past the 16 of a program's block are masked
    partial = torch.randn(batch, heads, num_splits, pad, generator=generator)
    lse = torch.randn(batch, heads, num_splits, generator=generator) * 3
    lse[0, 0, 0] = float("-inf")
    lse[2, 3] = float("-inf")
    partial[lse == float("-inf")] = float("nan")
    rotation = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator))[0].contiguous()
    out = torch.full((batch, heads + 2, head_dim), 7.0)[:, 1:-1]  # strided rows, as vLLM's slices can be
    out_lse = torch.empty(batch, heads)
    out, out_lse = out.to(device), out_lse.to(device)
    extra_partial = torch.randn(extra, batch, heads, pad, generator=generator)
    extra_lse = torch.randn(extra, batch, heads, generator=generator) * 3
    extra_lse[:, 1, 1], extra_lse[:, 2, 3] = float("-inf"), float("-inf")
    extra_partial[extra_lse == float("-inf")] = float("nan")
    rows = UNROTATE_ROWS if unrotate else 1
    _decode_reduce_kernel[(triton.cdiv(batch * heads, rows), column_programs)](
        partial.to(device), lse.to(device), extra_partial.to(device), extra_lse.to(device), rotation.to(device), out,
        out_lse, batch * heads, out.stride(0), out.stride(1), HEADS=heads, NUM_SPLITS=num_splits,
        NUM_SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, HEAD_DIM_PAD=pad,
        SPLIT_BLOCK=split_block, ROWS=rows, UNROTATE=unrotate, COLUMNS=16, COLUMN_PROGRAMS=column_programs,
        RETURN_LSE=True, CHAINED=False, EXTRA=extra)
    partial = torch.cat([partial, extra_partial.permute(1, 2, 0, 3)], dim=2)
    lse = torch.cat([lse, extra_lse.permute(1, 2, 0)], dim=2)
    weights = torch.softmax(lse * 0.6931471805599453, dim=-1).nan_to_num(0.0)  # lse is in log2 units
    expected = (weights[..., None] * partial.nan_to_num(0.0)).sum(2)[..., :head_dim]
    if unrotate:
        expected = expected @ rotation
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)
    seen = lse.amax(-1) > float("-inf")
    torch.testing.assert_close(out_lse.cpu()[seen], torch.logsumexp(lse[seen] * 0.6931471805599453, -1), atol=1e-5,
                               rtol=1e-5)
    assert out_lse[2, 3] == float("-inf") and (out[2, 3] == 0).all()


@pytest.mark.parametrize("query_rotated", [True, False])
@pytest.mark.parametrize("like_hopper", [False, True])
@pytest.mark.parametrize("head_dim, num_q_heads, num_kv_heads, table_blocks", [(128, 32, 8, 2064), (64, 4, 2, 512)])
def test_calls_at_the_variant_batches_launch_every_variant_of_any_batch(query_rotated, like_hopper, head_dim,
                                                                        num_q_heads, num_kv_heads, table_blocks,
                                                                        device, monkeypatch):
    """`variant_batches`: a call of any batch up to the limit launches kernel variants that calls at those
    batches launched (recorded, not run). `like_hopper`: the launch decisions a Hopper GPU takes
    (programmatic dependent launch, the fragment kernel), which the interpreter otherwise leaves out.
    Unrotated queries: each call rotates them too, at a tile height that follows the batch, or up to
    ROTATE_IN_SPLIT_MAX_BATCH (8 here) in the split kernel."""
    from turboquant.kernels import decode, decode_fragments

    from .launches import recorded_launches

    monkeypatch.setattr(decode, "ROTATE_IN_SPLIT_MAX_BATCH", 8)

    if like_hopper:
        monkeypatch.setattr(decode, "programmatic_launch_available", lambda device: True)
        monkeypatch.setattr(decode_fragments, "unsupported_reason", lambda codec, group, device: None)
    codec = make_codec(head_dim, 4, 4, num_kv_heads=num_kv_heads, block_size=16, device=device)
    cache = codec.layout.allocate(4, device)
    most = 600
    batches = decode.variant_batches(codec, num_q_heads // num_kv_heads, table_blocks * 16, cache.device, most,
                                     rotates_queries=not query_rotated)

    def launched(batch_sizes):
        with recorded_launches() as recorded:
            for batch in batch_sizes:
                paged_decode_attention(torch.zeros(batch, num_q_heads, head_dim, device=device), cache, codec,
                                       torch.zeros(batch, table_blocks, dtype=torch.int32, device=device),
                                       torch.zeros(batch, dtype=torch.int32, device=device), 0.1,
                                       query_rotated=query_rotated, after_store=True)
        return set(recorded)

    compiled = launched(batches)
    assert launched(range(1, most + 1)) <= compiled
    assert len(batches) < 20 and launched(batches[:-1]) < compiled  # few calls, each with a variant of its own
