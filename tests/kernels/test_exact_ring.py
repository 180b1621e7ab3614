"""The exact ring (`kernels/exact_ring.py`): what compress-store writes into it, and decode attention
that reads each sequence's sinks and latest keys from it, against `reference.decode_reference(..., ring=)`."""

import pytest
import torch

from turboquant.kernels import ExactRing, compress_store, paged_decode_attention
from turboquant.kernels.reference import decode_reference

from .paged import filled_cache, make_codec
from .test_decode import TOLERANCE  # fp16 operands, fp32 accumulation


def sequence_slots(block_table: torch.Tensor, seq: int, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_table[seq, positions // block_size].long() * block_size + positions % block_size


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_writes_rotated_rows_and_both_tables(dtype, device, generator):
    codec = make_codec(64, 4, 4, 2, 16, device)
    cache, block_table = filled_cache(codec, [40], generator, device)
    ring = ExactRing.allocate(10, codec.layout, cache.shape[0], 2, 4, device)
    slots = sequence_slots(block_table, 0, torch.arange(30, 40, device=device), 16)
    slots[3] = -1  # a padding row: skipped
    keys, values = (torch.randn(10, 2, 64, generator=generator).to(device, dtype) for _ in range(2))
    entries = torch.tensor([7, -1, 2, 5, -1, 0, 1, -1, 3, 4], dtype=torch.int32, device=device)
    ring.entry_of_slot[slots[1]] = 9  # a stale entry of a slot stored again without one
    compress_store(keys, values, slots.to(torch.int32), cache, codec, ring=ring, entries=entries)

    stored, kept = slots >= 0, (slots >= 0) & (entries >= 0)
    assert torch.equal(ring.entry_of_slot[slots[stored]], entries[stored])
    assert torch.equal(ring.slot_of_entry[entries[kept].long()], slots[kept])
    assert (ring.slot_of_entry[[6, 8, 9]] == -1).all()  # entries no token took
    for x, units, norms in ((keys, ring.keys, ring.key_norms), (values, ring.values, ring.value_norms)):
        rotated = x[kept].float() @ codec.rotation.T
        expected_norms = x[kept].float().norm(dim=-1)
        torch.testing.assert_close(norms[entries[kept].long()], expected_norms, atol=1e-5, rtol=1e-5)
        # fp16 unit rows: 2^-11 of each coordinate, and the rotation's own fp32 rounding
        torch.testing.assert_close(units[entries[kept].long()].float(), rotated / expected_norms[..., None],
                                   atol=1e-3, rtol=1e-3)
        assert units[[6, 8, 9]].abs().sum() == 0 and norms[[6, 8, 9]].abs().sum() == 0


@pytest.mark.parametrize("head_dim, key_bits, value_bits, sinks, recent, num_splits, parts", [
    (64, 4, 4, 4, 8, 1, 1), (64, 4, 4, 4, 8, 3, 2), (64, 3, 3, 1, 5, 3, 1), (64, 4, 2, 0, 16, 1, 2),
    (64, 8, 4, 3, 0, 3, 2),
    (64, 4, 4, 4, 64, 3, 1),  # two tiles of 64 positions
    (256, 3, 3, 4, 32, 1, 1),  # two tiles of 32 (head_dim 256)
])
def test_decode_reads_sinks_and_latest_keys_from_the_ring(head_dim, key_bits, value_bits, sinks, recent, num_splits,
                                                           parts, device, generator, monkeypatch):
    """Sequences of 1, 6, 70 and 97 tokens: some of their end tokens are in the ring, one entry has been
    handed to another slot since (read compressed), and the longest has no entry at all. `parts` 2: the
    window kernel's sinks and latest tokens in programs of their own."""
    from turboquant.kernels import exact_ring

    monkeypatch.setattr(exact_ring, "window_launch", lambda head_dim: dict(PARTS=parts, num_warps=4))
    codec = make_codec(head_dim, key_bits, value_bits, 2, 16, device)
    seq_lens = [1, 6, 70, 97]
    cache, block_table = filled_cache(codec, seq_lens, generator, device)
    ring = ExactRing.allocate(200, codec.layout, cache.shape[0], sinks, recent, device)
    entry = 0
    for seq, length in enumerate(seq_lens[:3]):  # store the ends of the first three again, through the ring
        positions = torch.tensor(sorted({*range(min(sinks, length)), *range(max(0, length - recent), length)}),
                                 dtype=torch.long, device=device)
        if positions.numel() == 0:
            continue
        keys, values = (torch.randn(positions.numel(), 2, head_dim, generator=generator).to(device, torch.bfloat16)
                        for _ in range(2))
        entries = torch.arange(entry, entry + positions.numel(), dtype=torch.int32, device=device)
        entry += positions.numel()
        compress_store(keys, values, sequence_slots(block_table, seq, positions, 16).to(torch.int32), cache, codec,
                       ring=ring, entries=entries)
    if entry:
        ring.slot_of_entry[entry - 1] = 10**6  # handed out again since: that token reads compressed
    query = torch.randn(len(seq_lens), 8, head_dim, generator=generator).to(device)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    out = paged_decode_attention(query, cache, codec, block_table, lengths, scale, num_splits=num_splits, exact=ring)
    expected = decode_reference(query, cache, codec, block_table, lengths, scale, ring=ring)
    torch.testing.assert_close(out, expected, **TOLERANCE)
    if entry:  # the test tells the ring's keys from the cache's
        compressed = decode_reference(query, cache, codec, block_table, lengths, scale)
        assert (out - compressed).abs().max() > 10 * TOLERANCE["atol"]


GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="too long for the interpreter")


def replayed(fn) -> torch.Tensor:
    """fn's output from a CUDA graph of it (captured on a side stream, as torch.cuda.graph does), replayed."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("seq_lens", [
    [300, 5, 0, 64],  # the Triton split kernel alone; on a GPU the window's kernel beside it on its own stream
    # on a GPU, the fragment kernel started while the Triton split kernel runs, then the window's; then one
    # where all the Triton kernel's programs only skip
    pytest.param([9000, 50, 8192, 8191, 0, 1, 300, 12000], marks=GPU_ONLY),
    pytest.param([9000, 8192, 12000, 16000, 8500, 8193, 9999, 10000], marks=GPU_ONLY),
    # 256 (sequence · kv head) pairs: both split kernels, and the window's on its own stream
    pytest.param([700, 3000, 9000, 40, 1, 0, 2048, 12000] * 4, marks=GPU_ONLY)])
def test_a_decode_step_with_a_ring_chained_to_its_store(seq_lens, device, generator):
    """A decode step as the vLLM backend launches it with exact tokens: the store writes each sequence's
    newest key into the cache and the ring, and rotates the queries; the split kernels and the window's
    read them after it (programmatic dependent launch on a GPU, plain launches on the CPU). Against the
    reference, and bit for bit against the same step launched after the store ended and, on a GPU,
    replayed from a CUDA graph."""
    heads, sinks, recent = 8, 4, 32
    codec = make_codec(128, 4, 4, heads, 16, device)
    cache, block_table = filled_cache(codec, seq_lens, generator, device)
    ring = ExactRing.allocate(len(seq_lens) * (sinks + recent), codec.layout, cache.shape[0], sinks, recent, device)
    newest_entries = []
    for seq, length in enumerate(seq_lens):  # each sequence's ends but its newest token, through the ring
        ends = sorted({*range(min(sinks, length)), *range(max(0, length - recent), length)})
        first = seq * (sinks + recent)
        newest_entries.append(first + len(ends) - 1 if ends else -1)
        positions = torch.tensor(ends[:-1], dtype=torch.long, device=device)
        if positions.numel():
            rows = (torch.randn(positions.numel(), heads, 128, generator=generator).to(device, torch.bfloat16)
                    for _ in range(2))
            compress_store(*rows, sequence_slots(block_table, seq, positions, 16).to(torch.int32), cache, codec,
                           ring=ring, entries=torch.arange(first, first + positions.numel(), dtype=torch.int32,
                                                           device=device))
    # apart from the cache's: each output moves by 4 × the ring's share of its attention, which tells the
    # ring's reads from the cache's even where 36 of 16K tokens are the ring's
    ring.values.add_(4.0)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    newest = (lengths - 1).clamp(min=0).long()
    slots = block_table.gather(1, newest[:, None] // 16)[:, 0] * 16 + newest % 16
    slots = torch.where(lengths > 0, slots, -1).to(torch.int32)
    entries = torch.tensor(newest_entries, dtype=torch.int32, device=device)
    keys, values = (torch.randn(len(seq_lens), heads, 128, generator=generator).to(device, torch.bfloat16)
                    for _ in range(2))
    query = torch.randn(len(seq_lens), 4 * heads, 128, generator=generator).to(device, torch.bfloat16)
    def store(queries: torch.Tensor | None, chained: bool) -> torch.Tensor | None:
        return compress_store(keys, values, slots, cache, codec, queries=queries, launch_dependents=chained,
                              ring=ring, entries=entries)

    def step(chained: bool) -> torch.Tensor:
        rotated = store(query, chained)
        return paged_decode_attention(rotated, cache, codec, block_table, lengths, 128**-0.5, query_rotated=True,
                                      after_store=chained, exact=ring).float()

    def step_store_inside() -> torch.Tensor:  # on a GPU the store beside the split kernels, before the window
        return paged_decode_attention(query, cache, codec, block_table, lengths, 128**-0.5, exact=ring,
                                      store=lambda queries: store(queries, queries is not None)).float()

    outs = [step(True), step(False)]
    inside = [step_store_inside()]
    if device == "cuda":  # the step stores the same rows again, so a replay reads what the others did
        outs.append(replayed(lambda: step(True)))
        inside.append(replayed(step_store_inside))
    expected = decode_reference(query, cache, codec, block_table, lengths, 128**-0.5, ring=ring)
    torch.testing.assert_close(outs[0], expected, atol=2e-2, rtol=2e-2)  # bf16 output rounding
    for other in outs[1:]:
        assert torch.equal(outs[0], other)
    # the query rotated by its own launch beside the store, where the split kernels run beside it: the same
    # arithmetic in a tile of another height, which a GPU's matmul may round otherwise in the last bit
    for other in inside:
        torch.testing.assert_close(other, outs[0], atol=1e-3, rtol=1e-2)  # a bf16 ulp: at most 2^-7 of |out|
    compressed = decode_reference(query, cache, codec, block_table, lengths, 128**-0.5)
    shift, error = ((outs[0] - reference).abs().amax(dim=(1, 2)) for reference in (compressed, expected))
    assert (shift > 10 * error)[lengths > 0].all()  # each sequence read the ring's values, not the cache's


def test_decode_with_a_ring_refuses_a_sliding_window_key_starts_or_a_store_it_would_read(device, generator):
    codec = make_codec(64, 4, 4, 2, 16, device)
    cache, block_table = filled_cache(codec, [20], generator, device)
    ring = ExactRing.allocate(8, codec.layout, cache.shape[0], 4, 4, device)
    query, lengths = torch.randn(1, 4, 64).to(device), torch.tensor([20], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="not with sliding_window"):
        paged_decode_attention(query, cache, codec, block_table, lengths, 0.1, sliding_window=8, exact=ring)
    no_recent = ExactRing.allocate(8, codec.layout, cache.shape[0], 4, 0, device)
    for ring_or_none in (None, no_recent):  # the split kernels would read the step's own keys
        with pytest.raises(ValueError, match="store= runs the step's store beside"):
            paged_decode_attention(query, cache, codec, block_table, lengths, 0.1, exact=ring_or_none,
                                   store=lambda queries: None)
    small = ExactRing.allocate(8, codec.layout, cache.shape[0] - 1, 4, 4, device)
    with pytest.raises(ValueError, match="entry_of_slot must have shape"):
        paged_decode_attention(query, cache, codec, block_table, lengths, 0.1, exact=small)


def test_gather_reads_a_prefix_s_sinks_and_latest_tokens_from_the_ring(device, generator):
    """A long chunk's gathered prefix (what FlashAttention then reads) takes the ring's rows where decode
    would: its first `sinks` and latest `recent` tokens whose entry still holds their slot."""
    from turboquant.kernels import gather_sequences
    from turboquant.kernels.reference import exact_rows_reference, gather_sequence_reference

    codec = make_codec(64, 4, 4, 2, 16, device)
    prefixes, chunks = [50, 0, 21], [7, 5, 3]
    cache, block_table = filled_cache(codec, [p + c for p, c in zip(prefixes, chunks)], generator, device)
    ring = ExactRing.allocate(32, codec.layout, cache.shape[0], 2, 6, device)
    for seq, positions in ((0, [0, 1, 44, 45, 46, 47, 48, 49]), (2, [1, 16, 17, 18, 19, 20])):
        positions = torch.tensor(positions, device=device)
        rows = (torch.randn(positions.numel(), 2, 64, generator=generator).to(device, torch.bfloat16) for _ in range(2))
        first = int(ring.slot_of_entry.ge(0).sum())
        compress_store(*rows, sequence_slots(block_table, seq, positions, 16).to(torch.int32), cache, codec, ring=ring,
                       entries=torch.arange(first, first + positions.numel(), dtype=torch.int32, device=device))
    ring.slot_of_entry[3] = 10**6  # sequence 0's position 45: handed out again since
    fresh = [torch.randn(sum(chunks), 2, 64, generator=generator).to(device) for _ in range(2)]
    query_start = torch.tensor([0, 7, 12, 15], dtype=torch.int32, device=device)
    lengths = [p + c for p, c in zip(prefixes, chunks)]
    key_start = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    out = [torch.full((int(key_start[-1]), 2, 64), float("nan"), device=device) for _ in range(2)]
    gather_sequences(*fresh, query_start, torch.tensor(lengths, dtype=torch.int32, device=device), cache, codec,
                     block_table, key_start, max(lengths), *out, ring=ring)
    for seq, (prefix, chunk) in enumerate(zip(prefixes, chunks)):
        keys, values = gather_sequence_reference(cache, codec, block_table[seq], prefix)
        exact_rows_reference(keys, values, ring, codec, block_table[seq])
        for got, prefix_rows, chunk_rows in zip(out, (keys, values), fresh):
            rows = got[key_start[seq]:key_start[seq + 1]]
            torch.testing.assert_close(rows[:prefix], prefix_rows, **TOLERANCE)
            torch.testing.assert_close(rows[prefix:], chunk_rows[query_start[seq]:query_start[seq + 1]])
    without = [torch.empty_like(x) for x in out]
    gather_sequences(*fresh, query_start, torch.tensor(lengths, dtype=torch.int32, device=device), cache, codec,
                     block_table, key_start, max(lengths), *without)
    assert (out[0][44] - without[0][44]).abs().max() > 0.1 and torch.equal(out[0][45], without[0][45])
