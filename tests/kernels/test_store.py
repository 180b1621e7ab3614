import pytest
import torch

from turboquant.core import unpack_indices
from turboquant.kernels.reference import compress_store_reference
from turboquant.kernels import store
from turboquant.kernels.store import compress_store

from .paged import make_codec

# (head_dim, key_bits, value_bits, block_size): every supported bit width on each side, every head_dim.
CASES = [(64, 4, 4, 16), (80, 3, 8, 32), (96, 2, 3, 16), (128, 8, 2, 64), (256, 4, 3, 128), (128, 3, 4, 16)]


def assert_codes_within_one_level(cache, expected, codec):
    """Key and value codes differ by at most one level, in fewer than 0.1% of the coordinates."""
    for side, quantizer in enumerate((codec.key_quantizer, codec.value_quantizer)):
        got = unpack_indices(codec.layout.views(cache)[side], quantizer.bits, codec.layout.head_dim).int()
        want = unpack_indices(codec.layout.views(expected)[side], quantizer.bits, codec.layout.head_dim).int()
        assert (got - want).abs().max() <= 1
        assert (got != want).float().mean() < 1e-3


def assert_norms_follow_codes(cache, codec, keys, values, slots):
    """Whatever level each coordinate took, the stored norm is the quantizer's for the codes stored beside
    it (‖x‖/‖û‖ with norm correction: a level moved on a decision boundary changes ‖û‖; the norm follows)."""
    layout, stored = codec.layout, slots >= 0
    blocks, offsets = slots[stored].long() // layout.block_size, slots[stored].long() % layout.block_size
    views = [view.cpu() for view in layout.views(cache)]
    for side, (quantizer, x) in enumerate(((codec.key_quantizer, keys), (codec.value_quantizer, values))):
        indices = unpack_indices(views[side][blocks, :, offsets], quantizer.bits, layout.head_dim)
        x_norms = torch.linalg.vector_norm(x.cpu()[stored].float(), dim=-1)
        own_norms = quantizer.to("cpu").stored_norms(x_norms, indices.long())
        torch.testing.assert_close(views[side + 2][blocks, :, offsets], own_norms, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("head_dim,key_bits,value_bits,block_size,num_tokens",
                         [(*case, 37) for case in CASES] + [(128, 4, 4, 16, 600)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compress_store_matches_reference(head_dim, key_bits, value_bits, block_size, num_tokens, dtype, device,
                                          generator, monkeypatch):
    # 600 tokens take the 64-row programs of long calls: the threshold lowered, so fewer tokens reach them
    monkeypatch.setattr(store, "SHORT_TILE_MAX_TOKENS", 512)
    codec = make_codec(head_dim, key_bits, value_bits, num_kv_heads=2, block_size=block_size, device=device)
    num_blocks = -(-num_tokens // block_size) + 2
    keys = (torch.randn(num_tokens, 2, head_dim, generator=generator) * 4 + 1).to(dtype)
    values = torch.randn(num_tokens, 2, head_dim, generator=generator).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens].to(torch.int32)
    slots[5] = -1  # padding slots are skipped
    keys[7] = 0  # a zero vector stores norm 0
    cache, expected = codec.layout.allocate(num_blocks, device), codec.layout.allocate(num_blocks, device)
    compress_store(keys.to(device), values.to(device), slots.to(device), cache, codec)
    compress_store_reference(keys.to(device), values.to(device), slots.to(device), expected, codec)

    # The kernel rotates by a dense fp32 matmul, the reference by the fast transform: a coordinate
    # within float rounding of a decision boundary may land one level over, nothing more.
    assert_codes_within_one_level(cache, expected, codec)
    assert_norms_follow_codes(cache, codec, keys, values, slots)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0].long()] = False
    key_norms = codec.layout.views(cache)[2].transpose(1, 2).reshape(-1, 2)
    assert (key_norms[untouched.to(device)] == 0).all()


def test_fixed_tile_stores_a_token_alike_whatever_was_stored_with_it(device, generator):
    """`fixed_tile`: 600 tokens stored in one call (a prefill) and in calls of 1 and 99 (decode steps and a
    short chunk) give the same bytes, bit for bit on a GPU (vLLM's batch-invariant mode relies on it)."""
    codec = make_codec(128, 4, 4, num_kv_heads=2, block_size=16, device=device)
    keys, values = (torch.randn(600, 2, 128, generator=generator).to(device, torch.bfloat16) for _ in range(2))
    slots = torch.arange(600, dtype=torch.int32, device=device)
    whole, pieces = codec.layout.allocate(40, device), codec.layout.allocate(40, device)
    compress_store(keys, values, slots, whole, codec, fixed_tile=True)
    for start, stop in [(0, 1), (1, 100), *[(t, t + 100) for t in range(100, 600, 100)]]:
        compress_store(keys[start:stop], values[start:stop], slots[start:stop], pieces, codec, fixed_tile=True)
    if device == "cuda":  # a tile's rows are multiplied alike wherever they sit
        assert torch.equal(whole, pieces)
        return
    # The interpreter's numpy matmul rounds a row by its position in the tile, and a token sits at other
    # rows in the pieces: a coordinate on a decision boundary may move one level, rarely; a wrong slot or
    # a tile that mixes tokens would change whole vectors.
    assert_codes_within_one_level(whole, pieces, codec)
    for cache in (whole, pieces):
        assert_norms_follow_codes(cache, codec, keys, values, slots)


@pytest.mark.parametrize("head_dim, dtype", [(128, torch.bfloat16), (80, torch.float16), (64, torch.float32)])
def test_queries_rotated_in_the_store_launch(head_dim, dtype, device, generator):
    """`queries`: the first query tokens' rotation comes out of the same launch, as `rotate` gives it
    (fp32 accurate), and the cache bytes are those of a store without queries."""
    codec = make_codec(head_dim, 4, 3, num_kv_heads=2, block_size=16, device=device)
    keys, values = (torch.randn(37, 2, head_dim, generator=generator).to(device, dtype) for _ in range(2))
    queries = torch.randn(20, 8, head_dim, generator=generator).to(device, dtype)  # GQA group of 4
    slots = torch.randperm(64, generator=generator)[:37].to(device, torch.int32)
    with_queries, without = codec.layout.allocate(4, device), codec.layout.allocate(4, device)
    rotated = compress_store(keys, values, slots, with_queries, codec, queries=queries)
    assert compress_store(keys, values, slots, without, codec) is None
    assert torch.equal(with_queries, without)
    expected = queries.float() @ codec.rotation.T
    torch.testing.assert_close(rotated, expected, atol=2e-6 * expected.abs().max().item(), rtol=0)
    out = torch.full_like(rotated, float("nan"))
    assert compress_store(keys, values, slots, without, codec, queries=queries, rotated_queries=out) is out
    torch.testing.assert_close(out, expected, atol=2e-6 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("head_dim, key_bits, value_bits", [(128, 4, 4), (256, 3, 3), (64, 8, 2)])
def test_storing_at_the_tile_token_counts_compiles_every_variant_of_any_count(head_dim, key_bits, value_bits, device):
    """`tile_token_counts`: whatever a later call's token count, with or without queries, its launch is a
    variant that the stores at those counts launched (recorded, not run)."""
    from .launches import recorded_launches

    codec = make_codec(head_dim, key_bits, value_bits, num_kv_heads=2, block_size=16, device=device)
    cache = codec.layout.allocate(4, device)
    most = 3 * store.SHORT_TILE_MAX_TOKENS

    def launches(counts):
        with recorded_launches() as recorded:
            for count in counts:
                keys = torch.zeros(count, 2, head_dim, device=device, dtype=torch.bfloat16)
                slots = torch.full((count,), -1, device=device, dtype=torch.int64)
                for queries in (None, torch.zeros(count, 8, head_dim, device=device, dtype=torch.bfloat16)):
                    compress_store(keys, keys, slots, cache, codec, queries=queries)
        return set(recorded)

    compiled = launches(store.tile_token_counts(most))
    boundaries = [store.ONE_BLOCK_MAX_TOKENS, store.SHORT_TILE_MAX_TOKENS]
    later = launches([1, 2, 17, 300, most] + [edge + step for edge in boundaries for step in (0, 1)])
    assert later <= compiled
    assert len(compiled) == len(launches(store.tile_token_counts(most)[:-1])) + 2  # the last count's tiles are new
    assert store.tile_token_counts(70) == [1, store.ONE_BLOCK_MAX_TOKENS + 1]


def test_compress_store_rejects_bad_input(device):
    codec = make_codec(64, 4, 4, num_kv_heads=2, block_size=16, device=device)
    cache = codec.layout.allocate(2, device)
    keys = torch.randn(3, 2, 64, device=device)
    slots = torch.arange(3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="keys"):
        compress_store(keys[:, :1], keys, slots, cache, codec)
    with pytest.raises(ValueError, match="dtype"):
        compress_store(keys.int(), keys, slots, cache, codec)
    with pytest.raises(ValueError, match="slot_mapping"):
        compress_store(keys, keys, slots[:2], cache, codec)
    with pytest.raises(ValueError, match="cache must have shape"):
        compress_store(keys, keys, slots, cache[:, :1].contiguous(), codec)
    with pytest.raises(ValueError, match="contiguous"):
        compress_store(keys, keys, slots, torch.cat([cache, cache], dim=2)[:, :, : cache.shape[2]], codec)
    with pytest.raises(ValueError, match="uint8"):
        compress_store(keys, keys, slots, cache.float(), codec)
    with pytest.raises(ValueError, match="queries must be"):  # more query tokens than tokens
        compress_store(keys, keys, slots, cache, codec, queries=torch.randn(4, 4, 64, device=device))
    with pytest.raises(ValueError, match="queries must be"):  # heads not a multiple of the kv heads
        compress_store(keys, keys, slots, cache, codec, queries=torch.randn(3, 3, 64, device=device))
    with pytest.raises(ValueError, match="queries must have dtype"):
        compress_store(keys, keys, slots, cache, codec, queries=torch.randn(3, 4, 64, device=device).half())
    with pytest.raises(ValueError, match="rotated_queries must have"):
        compress_store(keys, keys, slots, cache, codec, queries=keys, rotated_queries=torch.empty(3, 2, 32))
