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

    # every token compressed: the references below read the cache alone (the ring's test sets its own)
    config = SimpleNamespace(additional_config={"turboquant": {"preset": "k4v4", "exact_sinks": 0, "exact_recent": 0}},
                             model_config=SimpleNamespace(get_total_num_hidden_layers=lambda: 4, max_model_len=200,
                                                          is_hybrid=False, dtype=torch.bfloat16),
                             scheduler_config=SimpleNamespace(max_num_seqs=4, max_num_batched_tokens=128),
                             parallel_config=SimpleNamespace(decode_context_parallel_size=1, use_ubatching=False),
                             speculative_config=None)
    monkeypatch.setattr(backend, "get_current_vllm_config", lambda: config)
    return backend, config


def step_metadata(new: list[int], seq_lens: list[int], block_table: torch.Tensor, slot_mapping: torch.Tensor,
                  device):
    """vLLM's metadata of a step whose requests take `new` tokens each and reach `seq_lens` tokens."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    query_start = torch.tensor([0, *new], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    lengths = torch.tensor(seq_lens, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=query_start.to(device), query_start_loc_cpu=query_start, seq_lens=lengths.to(device),
        num_reqs=len(new), num_actual_tokens=sum(new), max_query_len=max(new), max_seq_len=max(seq_lens),
        block_table_tensor=block_table, slot_mapping=slot_mapping, seq_lens_cpu_upper_bound=lengths)


def run_batch(backend, prefix: list[int], new: list[int]):
    """Fill a cache with each sequence's prefix, then run one step of `new` tokens per sequence through
    the backend. Returns (metadata, output [tokens, HEADS, HEAD_DIM] fp32, query, keys, values, and what
    the references need)."""
    from turboquant.kernels import compress_store

    module, config = backend
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    impl = module.TurboQuantImpl(HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS)
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")  # a 4-bit (non-boundary) layer
    blocks_per_seq = max(-(-(p + n) // BLOCK_SIZE) for p, n in zip(prefix, new))
    order = torch.randperm(len(prefix) * blocks_per_seq + 3, generator=generator)
    block_table = order[: len(prefix) * blocks_per_seq].reshape(len(prefix), blocks_per_seq).to(torch.int32)
    cache = torch.zeros(order.numel(), KV_HEADS, BLOCK_SIZE * (32 + 32 + 8), dtype=torch.uint8, device=device)

    def slots(seq, start, count):
        positions = torch.arange(start, start + count)
        return (block_table[seq, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE).to(device)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)

    codec = impl._codec(layer, cache)
    for seq, count in enumerate(prefix):
        if count:
            compress_store(randn(count, KV_HEADS, HEAD_DIM), randn(count, KV_HEADS, HEAD_DIM), slots(seq, 0, count),
                           cache, codec)
    tokens = sum(new)
    query, keys, values = randn(tokens, HEADS, HEAD_DIM), randn(tokens, KV_HEADS, HEAD_DIM), randn(tokens, KV_HEADS, HEAD_DIM)
    # the step's own keys: stored by forward, at slots padded as in a CUDA graph (−1: skipped)
    slot_mapping = torch.cat([slots(seq, prefix[seq], count) for seq, count in enumerate(new)]
                             + [torch.full((3,), -1, device=device)])

    common = step_metadata(new, [p + n for p, n in zip(prefix, new)], block_table.to(device), slot_mapping, device)
    spec = SimpleNamespace(num_kv_heads=KV_HEADS, head_size=HEAD_DIM)
    meta = module.TurboQuantMetadataBuilder(spec, ["x"], config, device).build(0, common)
    output = torch.full((tokens + 3, HEADS * HEAD_DIM), float("nan"), dtype=torch.bfloat16, device=device)
    padded = [torch.cat([x, randn(3, *x.shape[1:])]) for x in (query, keys, values)]  # CUDA-graph padding rows
    impl.forward(layer, *padded, cache, meta, output)
    assert output[tokens:].isnan().all()
    references = SimpleNamespace(cache=cache, codec=impl.codec, block_table=block_table.to(device),
                                 query_start=common.query_start_loc, seq_lens=common.seq_lens, scale=impl.scale)
    return meta, output[:tokens].view(-1, HEADS, HEAD_DIM).float(), query, keys, values, references


@pytest.mark.parametrize("num_sms", [4, 132])
def test_decode_and_prefill_rows_match_the_references(backend, monkeypatch, num_sms):
    from turboquant.kernels.reference import cached_attention_reference, decode_reference, extend_reference

    # two decodes, a short chunk after a prefix, a first chunk: two requests' short chunks fill 4 SMs with
    # the fused kernel's programs (one per kv head), and leave 132 to decode queries over the cache
    monkeypatch.setattr(backend[0], "multiprocessor_count", lambda device: num_sms)
    meta, output, query, keys, values, ref = run_batch(backend, prefix=[39, 22, 30, 0], new=[1, 1, 10, 20])
    route = "fused" if num_sms == 4 else "decode"
    assert (meta.num_decodes, meta.num_prefills, meta.prefill_route) == (2, 2, route)
    expected_decode = decode_reference(query[:2].float(), ref.cache, ref.codec, ref.block_table[:2], ref.seq_lens[:2],
                                       ref.scale)
    if route == "fused":  # the chunks' own keys in full precision
        expected_prefill = extend_reference(query[2:].float(), keys[2:].float(), values[2:].float(),
                                            ref.query_start[2:] - 2, ref.seq_lens[2:], ref.cache, ref.codec,
                                            ref.block_table[2:], ref.scale)
    else:  # every key from the cache, the chunks' own compressed
        expected_prefill = cached_attention_reference(query[2:].float(), ref.query_start[2:] - 2, ref.seq_lens[2:],
                                                      ref.cache, ref.codec, ref.block_table[2:], ref.scale)
    # bf16 output rounding (2^-8 relative) and fp16 level products inside the kernels
    torch.testing.assert_close(output[:2], expected_decode, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(output[2:], expected_prefill, atol=2e-2, rtol=2e-2)


def test_batch_invariant_mode_reads_every_token_from_the_cache(backend, monkeypatch):
    """VLLM_BATCH_INVARIANT=1: decodes and prefill chunks alike attend to the cache alone (their own
    chunk's compressed copies included), as cached_attention_reference says."""
    from vllm import envs

    from turboquant.kernels.reference import cached_attention_reference

    from vllm.model_executor.layers import layernorm

    from turboquant.vllm import batch_invariance

    monkeypatch.setattr(envs, "VLLM_BATCH_INVARIANT", True, raising=False)
    monkeypatch.setattr(layernorm, "rms_norm_batch_invariant", layernorm.rms_norm_batch_invariant)  # restored after
    monkeypatch.setattr(batch_invariance, "_installed", False)
    assert backend[0].TurboQuantBackend.supports_batch_invariance()
    meta, output, query, keys, values, ref = run_batch(backend, prefix=[39, 22, 30, 0], new=[1, 1, 10, 20])
    expected = cached_attention_reference(query.float(), ref.query_start, ref.seq_lens, ref.cache, ref.codec,
                                          ref.block_table, ref.scale)
    torch.testing.assert_close(output, expected, atol=2e-2, rtol=2e-2)
    # building the layer routed vLLM's residual RMSNorm through the batch-invariant one
    assert layernorm.rms_norm_batch_invariant is batch_invariance.residual_rms_norm_batch_invariant


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM turns its Triton kernels off without a GPU driver")
def test_residual_rms_norm_is_in_place_and_the_same_alone_as_in_a_batch():
    """`batch_invariance.residual_rms_norm_batch_invariant`: residual ← x + residual and x ← its RMSNorm,
    as vLLM's fused_add_rms_norm; a row's bits do not depend on the rows beside it (there: 256 or more
    tokens changed the CUDA kernel's block size, benchmarks/results/vllm-invariance-trace-h200.md)."""
    from turboquant.vllm.batch_invariance import residual_rms_norm_batch_invariant

    device, rows, alone, hidden, eps = "cuda", 300, 160, 576, 1e-5
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x, residual = (torch.randn(rows, hidden, generator=generator).to(device, torch.bfloat16) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(device, torch.bfloat16)
    summed = (x + residual).float()  # bf16 add, rounded as the kernel rounds it
    summed = summed.to(torch.bfloat16).float()
    expected = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + eps) * weight.float()

    batch_x, batch_residual = x.clone(), residual.clone()
    out, out_residual = residual_rms_norm_batch_invariant(batch_x, weight, eps, residual=batch_residual)
    assert out is batch_x and out_residual is batch_residual  # in place, like fused_add_rms_norm
    torch.testing.assert_close(out_residual.float(), summed, atol=0, rtol=0)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)  # bf16 output rounding
    alone_x, alone_residual = x[:alone].clone(), residual[:alone].clone()
    residual_rms_norm_batch_invariant(alone_x, weight, eps, residual=alone_residual)
    assert torch.equal(alone_x, batch_x[:alone]) and torch.equal(alone_residual, batch_residual[:alone])
    with pytest.raises(ValueError, match="must have one shape"):
        residual_rms_norm_batch_invariant(x, weight, eps, residual=residual[:alone])


def test_hybrid_models_are_refused_when_the_layer_is_built(backend):
    module, config = backend
    config.model_config.is_hybrid = True
    with pytest.raises(ValueError, match="does not serve hybrid models"):
        module.TurboQuantImpl(HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS)


def test_long_chunks_gather_their_prefixes_in_groups(backend):
    from turboquant.kernels.reference import extend_reference

    # long chunks: gathered for FlashAttention where vLLM ships it, in two groups (max_model_len 200)
    meta, output, query, keys, values, ref = run_batch(backend, prefix=[40, 0, 70], new=[100, 30, 90])
    assert meta.prefill_route == "gather"
    assert meta.num_prefills == 3 and [group.requests for group in meta.prefill_groups] == [slice(0, 2), slice(2, 3)]
    expected = extend_reference(query.float(), keys.float(), values.float(), ref.query_start, ref.seq_lens, ref.cache,
                                ref.codec, ref.block_table, ref.scale)
    # as above, plus the gathered K/V's bf16 rounding (2^-9 relative)
    torch.testing.assert_close(output, expected, atol=2e-2, rtol=2e-2)


def test_a_batch_of_first_chunks_has_no_prefix(backend):
    module, config = backend
    common = step_metadata([5, 7], [5, 7], torch.zeros(2, 1, dtype=torch.int32), torch.arange(12), "cpu")
    spec = SimpleNamespace(num_kv_heads=KV_HEADS, head_size=HEAD_DIM)
    meta = module.TurboQuantMetadataBuilder(spec, ["x"], config, "cpu").build(0, common)
    assert (meta.num_decodes, meta.num_prefills, meta.prefill_route, meta.prefill_max_query_len) == (0, 2, "flash", 7)


@pytest.mark.parametrize("tokens", [3, 300])  # 300: the rotations' 64-row tiles too
def test_compiling_the_serving_kernels_before_serving_writes_nothing(backend, tokens):
    """`_compile_serving_kernels` launches the store over skipped slots and the prefill routes' kernels over
    one empty sequence, on each layer's first uncaptured call (the GPU; here called directly): the cache
    and the exact ring must come out as they went in."""
    module, config = backend
    config.additional_config = {"turboquant": {"preset": "k4v4", "exact_sinks": 2, "exact_recent": 5}}
    meta, _, _, _, _, ref = run_batch(backend, prefix=[40, 3], new=[1, 1])
    impl = module.TurboQuantImpl(HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS)
    impl.exact_ring = meta.exact.tokens.ring(ref.codec.layout, ref.cache.shape[0], impl.exact_rows)
    device = ref.cache.device
    query = torch.randn(tokens, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    keys = torch.randn(tokens, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    ring = impl.exact_ring
    before = [x.clone() for x in (ref.cache, ring.keys, ring.key_norms, ring.slot_of_entry, ring.entry_of_slot)]
    impl._compile_serving_kernels(query, keys, keys.clone(), ref.cache, ref.codec, meta)
    after = (ref.cache, ring.keys, ring.key_norms, ring.slot_of_entry, ring.entry_of_slot)
    assert all(torch.equal(x, y) for x, y in zip(before, after)) and not impl.serving_uncompiled


# (q heads, kv heads, head_dim, max_model_len, max_num_seqs): this file's small shape, and Llama-3.1-8B's as the
# throughput benchmark serves it (its capture sizes reach 512, its block tables 2064 blocks)
SERVED_SHAPES = {"small": (HEADS, KV_HEADS, HEAD_DIM, 8192, 32), "llama-8b": (32, 8, 128, 33024, 1024)}


@pytest.mark.parametrize("shape", SERVED_SHAPES)
@pytest.mark.parametrize("like_hopper", [False, True])
def test_a_served_step_launches_only_kernel_variants_compiled_before_serving(backend, monkeypatch, shape,
                                                                              like_hopper):
    """What CUDA-graph capture (decode batches of vLLM's capture sizes) and `_compile_serving_kernels`
    launched covers the kernel variants of the steps an engine serves: prefill-only, mixed, a short tail
    chunk, a long chunk after a prefix, uncaptured decode batches. Launches recorded, not run (Triton
    compiles a variant it has not seen on its first launch: seconds mid-serving). `like_hopper`: the
    launches a Hopper GPU takes (programmatic dependent launch, the fragment decode kernel, prefixes
    gathered for FlashAttention), which the interpreter otherwise leaves out."""
    from tests.kernels.launches import recorded_launches
    from turboquant.kernels import decode, decode_fragments, store

    if like_hopper:
        for module_ in (decode, store):
            monkeypatch.setattr(module_, "programmatic_launch_available", lambda device: True)
        monkeypatch.setattr(decode_fragments, "unsupported_reason", lambda codec, group, device: None)
    heads, kv_heads, head_dim, max_model_len, max_num_seqs = SERVED_SHAPES[shape]
    module, config = backend
    config.additional_config = {"turboquant": "k4v4"}  # with the exact ring, as by default
    config.model_config.max_model_len = max_model_len
    config.scheduler_config = SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=16384)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impl = module.TurboQuantImpl(heads, head_dim, head_dim ** -0.5, kv_heads)
    if like_hopper and impl.fa_version is None:  # long chunks gather their prefixes for FlashAttention (a stub)
        monkeypatch.setattr(module, "flash_attn_varlen_func", lambda **kwargs: None)
        impl.fa_version, impl.gathers = 3, True
    builder = module.TurboQuantMetadataBuilder(SimpleNamespace(num_kv_heads=kv_heads, head_size=head_dim), ["x"],
                                               config, device)
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    width = max_model_len // BLOCK_SIZE
    # a k4v4 page: per token and kv head, head_dim / 2 bytes of key codes, as many of value codes, two fp32 norms
    cache = torch.zeros(64, kv_heads, BLOCK_SIZE * (head_dim + 8), dtype=torch.uint8, device=device)
    # vLLM's capture sizes of decode batches: 1, 2, 4, 8 to 256 by 8, 272 to 512 by 16, up to max_num_seqs
    capture_sizes = [size for size in [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)] if size <= max_num_seqs]

    def batch(requests, padded=None):  # [(cached prefix, new tokens)], decodes first; padded: a graph's tokens
        new = [count for _, count in requests]
        padded = padded or sum(new)
        meta = builder.build(0, step_metadata(
            new, [prefix + count for prefix, count in requests],
            torch.zeros(len(new), width, dtype=torch.int32, device=device), torch.full((padded,), -1, device=device),
            device))
        qkv = torch.zeros(padded, heads + 2 * kv_heads, head_dim, dtype=torch.bfloat16, device=device)
        return meta, *qkv.split([heads, kv_heads, kv_heads], dim=1)  # views of one tensor, as vLLM's

    def step(requests, padded=None):
        meta, query, key, value = batch(requests, padded)
        output = torch.empty(query.shape[0], heads * head_dim, dtype=torch.bfloat16, device=device)
        impl.forward(layer, query, key, value, cache, meta, output)

    # vLLM's dummy run before capture, the layer's first uncaptured call (on a GPU forward compiles there)
    meta, query, key, value = batch([(0, 8192)])
    codec = impl._codec(layer, cache)
    impl.exact_ring = meta.exact.tokens.ring(codec.layout, cache.shape[0], impl.exact_rows)  # as forward builds it
    with recorded_launches() as compiled:
        impl._compile_serving_kernels(query, key, value, cache, codec, meta)
        for size in capture_sizes:
            step([(100, 1)] * size, padded=size)
    served = {
        "a first step of one 1K prompt": [(0, 1024)],
        "a first step of sixteen 1K prompts": [(0, 1024)] * 16,
        "a 40-token prompt": [(0, 40)],
        "3 decodes and a 1K prompt": [(900, 1)] * 3 + [(0, 1024)],
        "13 decodes and 16K of prompts": [(900, 1)] * 13 + [(0, 1024)] * 15 + [(0, 1011)],
        "2 decodes and a prompt's 7-token tail": [(900, 1)] * 2 + [(3000, 7)],
        "three prompts' 20-token tails": [(3000, 20)] * 3,
        "twenty prompts' 5-token tails": [(3000, 5)] * 20,
        "a long chunk after a prefix": [(3000, 1500)],
        **{f"{count} decodes, uncaptured (a mixed step's)": [(900, 1)] * count for count in (3, 5, 13)},
        "as many decodes as max_num_seqs (past 512: never captured)": [(900, 1)] * max_num_seqs,
    }
    for name, requests in served.items():
        with recorded_launches() as launched:
            step(requests)
        assert set(launched) <= set(compiled), name


def test_exact_tokens_are_on_by_default_where_a_layer_can_read_them(backend, monkeypatch):
    """Default settings: 4 sinks + 32 latest tokens in a ring on full-attention layers; off without an
    error in batch-invariant mode, on sliding-window layers and on layers that read another's cache.
    Counts set in the config there stop the engine instead."""
    from vllm import envs
    from vllm.model_executor.layers import layernorm

    from turboquant.vllm import batch_invariance

    module, config = backend
    config.additional_config = {"turboquant": "k4v4"}
    spec = SimpleNamespace(num_kv_heads=KV_HEADS, head_size=HEAD_DIM)
    said = []  # the engine's log says which way each layer went
    monkeypatch.setattr(module.logger, "info_once", lambda message, *args: said.append(message % args))

    def impl(**kwargs):
        return module.TurboQuantImpl(HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS, **kwargs)
    builder = module.TurboQuantMetadataBuilder(spec, ["x"], config, "cpu")
    assert (builder.exact.sinks, builder.exact.recent) == (4, 32)
    rows = impl().exact_rows
    assert rows[0].shape == (4 * (4 + 32), KV_HEADS, HEAD_DIM) and rows[2].shape == (4 * (4 + 32), KV_HEADS)
    assert "first 4 and latest 32 tokens exactly" in said[-1]
    assert impl(sliding_window=8).exact_rows is None
    assert "off on sliding-window layers" in said[-1]
    assert impl(kv_sharing_target_layer_name="model.layers.0.self_attn.attn").exact_rows is None
    monkeypatch.setattr(envs, "VLLM_BATCH_INVARIANT", True, raising=False)
    monkeypatch.setattr(layernorm, "rms_norm_batch_invariant", layernorm.rms_norm_batch_invariant)  # restored after
    monkeypatch.setattr(batch_invariance, "_installed", False)
    assert impl().exact_rows is None and module.TurboQuantMetadataBuilder(spec, ["x"], config, "cpu").exact is None
    config.additional_config = {"turboquant": {"preset": "k4v4", "exact_recent": 16}}
    with pytest.raises(ValueError, match="batch-invariant mode"):
        impl()


def test_exact_sinks_and_recent_tokens_are_read_from_the_ring(backend, monkeypatch):
    """Settings exact_sinks=2, exact_recent=5: a prefill step puts each sequence's first 2 and last 5
    tokens in the ring; the decode step after it attends to those (and its own token) in the model's
    dtype and to the rest compressed. A sequence whose prefix was stored outside the backend (no ring
    entries) reads it compressed, its own new token exact."""
    from turboquant.kernels import compress_store
    from turboquant.kernels.reference import attention_reference, gather_sequence_reference

    module, config = backend
    config.additional_config = {"turboquant": {"preset": "k4v4", "exact_sinks": 2, "exact_recent": 5}}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)

    impl = module.TurboQuantImpl(HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS)
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    spec = SimpleNamespace(num_kv_heads=KV_HEADS, head_size=HEAD_DIM)
    builder = module.TurboQuantMetadataBuilder(spec, ["x"], config, device)

    def config_outside_setup():  # as vLLM's: no current config at forward time
        raise AssertionError("Current vLLM config is not set")
    monkeypatch.setattr(module, "get_current_vllm_config", config_outside_setup)
    block_table = torch.randperm(3 * 4, generator=generator)[:12].reshape(3, 4).to(torch.int32).to(device)
    cache = torch.zeros(12, KV_HEADS, BLOCK_SIZE * (32 + 32 + 8), dtype=torch.uint8, device=device)
    codec = impl._codec(layer, cache)

    def slots(seq, start, count):
        positions = torch.arange(start, start + count, device=device)
        return block_table[seq, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE

    def step(requests):  # [(seq, start, count)] → the step's query, keys, values, output
        new = [count for _, _, count in requests]
        tokens = sum(new)
        query = randn(tokens, HEADS, HEAD_DIM)
        keys, values = randn(tokens, KV_HEADS, HEAD_DIM), randn(tokens, KV_HEADS, HEAD_DIM)
        common = step_metadata(new, [start + count for _, start, count in requests],
                               block_table[[seq for seq, _, _ in requests]].contiguous(),
                               torch.cat([slots(*request) for request in requests]), device)
        output = torch.empty(tokens, HEADS * HEAD_DIM, dtype=torch.bfloat16, device=device)
        impl.forward(layer, query, keys, values, cache, builder.build(0, common), output)
        return query, keys, values, output.view(-1, HEADS, HEAD_DIM).float()

    lengths = [21, 12]
    outside = (randn(9, KV_HEADS, HEAD_DIM), randn(9, KV_HEADS, HEAD_DIM))  # sequence 2's prefix
    compress_store(*outside, slots(2, 0, 9), cache, codec)
    _, prefill_keys, prefill_values, _ = step([(0, 0, lengths[0]), (1, 0, lengths[1])])
    query, keys, values, output = step([(0, lengths[0], 1), (1, lengths[1], 1), (2, 9, 1)])

    exact_keys = [torch.cat([prefill_keys[:21], keys[0:1]]), torch.cat([prefill_keys[21:], keys[1:2]])]
    exact_values = [torch.cat([prefill_values[:21], values[0:1]]), torch.cat([prefill_values[21:], values[1:2]])]
    expectations = []
    for seq, length in enumerate([22, 13, 10]):
        ref_keys, ref_values = gather_sequence_reference(cache, codec, block_table[seq], length)
        exact = [0, 1, *range(length - 5, length)] if seq < 2 else [length - 1]
        if seq < 2:
            ref_keys[exact], ref_values[exact] = exact_keys[seq][exact].float(), exact_values[seq][exact].float()
        else:
            ref_keys[exact], ref_values[exact] = keys[2:3].float(), values[2:3].float()
        positions = torch.arange(length, device=device)
        expected, _ = attention_reference(query[seq:seq + 1].float(), ref_keys, ref_values, positions[-1:], positions,
                                          impl.scale)
        # bf16 output rounding and fp16 level products in the kernels (as the other backend tests)
        torch.testing.assert_close(output[seq], expected[0], atol=2e-2, rtol=2e-2)
        expectations.append(expected[0])
    # the tolerance tells the two apart: reading the first sequence's ends compressed lands farther away
    ref_keys, ref_values = gather_sequence_reference(cache, codec, block_table[0], 22)
    compressed, _ = attention_reference(query[:1].float(), ref_keys, ref_values, torch.arange(21, 22, device=device),
                                        torch.arange(22, device=device), impl.scale)
    assert (output[0] - expectations[0]).norm() < 0.5 * (output[0] - compressed[0]).norm()
