"""TurboQuantCache on tiny random models built offline from config objects."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.hf.cache import TurboQuantCache, TurboQuantLayer, cache_kwargs  # noqa: E402

EXACT = dict(residual_window=10**6)  # nothing is ever compressed: must equal DynamicCache exactly
# The tiny models have 2–4 layers; tests of the preset's bits turn off the 8-bit first/last layers.


def tiny_llama(head_dim=64, layers=2, **extra):
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=4 * head_dim, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=4096, **extra)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gemma(version):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, sliding_window=8, max_position_embeddings=512)
    if version == 2:
        config = transformers.Gemma2Config(**common, layer_types=["sliding_attention", "full_attention"] * 2)
        cls = transformers.Gemma2ForCausalLM
    else:
        config = transformers.Gemma3TextConfig(**common, layer_types=["sliding_attention"] * 3 + ["full_attention"])
        cls = transformers.Gemma3ForCausalLM
    torch.manual_seed(0)
    return cls(config).eval()


def greedy(model, input_ids, cache, **kwargs):
    options = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, **kwargs}
    torch.manual_seed(0)  # the same draws for both caches when sampling
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **cache_kwargs(model, cache), **options)


def prompt(length=40, batch=1, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_uncompressed_window_matches_dynamic_cache_exactly(head_dim):
    model = tiny_llama(head_dim)
    ids = prompt()
    expected = greedy(model, ids, DynamicCache(config=model.config))
    assert torch.equal(greedy(model, ids, TurboQuantCache(model.config, TurboQuantConfig(**EXACT))), expected)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_compressed_logits_stay_close(head_dim):
    model = tiny_llama(head_dim)
    ids = prompt(64)
    with torch.no_grad():
        reference = model(ids).logits[0, -16:]
        cache = TurboQuantCache(model.config, TurboQuantConfig(residual_window=0, sink_tokens=0, boundary_layers=0))
        model(ids[:, :48], **cache_kwargs(model, cache))
        steps = [model(ids[:, i : i + 1], **cache_kwargs(model, cache)).logits[0, -1] for i in range(48, 64)]
    assert cache.layers[0].packed_keys.shape[2] == 64  # with no window even the newest token is compressed
    cosine = torch.nn.functional.cosine_similarity(torch.stack(steps), reference, dim=-1)
    assert cosine.min() > 0.98  # every token compressed at 4 bits, random weights: ~0.99 typical


def test_layer_stores_sinks_compressed_middle_and_window():
    config = TurboQuantConfig(sink_tokens=3, residual_window=5)
    layer = TurboQuantLayer(config, layer_idx=0)
    keys, values = torch.randn(2, 2, 20, 64), torch.randn(2, 2, 20, 64)
    k1, v1 = layer.update(keys[:, :, :12], values[:, :, :12])
    assert torch.equal(k1, keys[:, :, :12]) and torch.equal(v1, values[:, :, :12])  # a chunk sees itself exactly
    k2, _ = layer.update(keys[:, :, 12:19], values[:, :, 12:19])
    k3, _ = layer.update(keys[:, :, 19:], values[:, :, 19:])
    assert layer.get_seq_length() == 20 and k3.shape == keys.shape
    assert torch.equal(k3[:, :, :3], keys[:, :, :3]) and torch.equal(k3[:, :, -6:], keys[:, :, -6:])
    assert layer.packed_keys.shape == (2, 2, 12, 32)  # 4-bit, d=64: 32 bytes per vector
    # The middle equals the codec reference: dequantize(quantize(x − center)) + center.
    center = keys[:, :, :12].mean(dim=2, keepdim=True)
    quantizer = config.make_quantizer("key", 64, 0)
    reference = quantizer.dequantize(quantizer.quantize(keys[:, :, 3:14] - center)) + center
    assert torch.allclose(k3[:, :, 3:14], reference, atol=1e-5)
    assert torch.equal(k2, torch.cat([keys[:, :, :3], k3[:, :, 3:7], keys[:, :, 7:19]], dim=2))


def test_compact_and_incremental_modes_agree():
    model = tiny_llama()
    ids = prompt()
    config = TurboQuantConfig.from_preset("k3v3", residual_window=4, boundary_layers=0)
    out_incremental = greedy(model, ids, TurboQuantCache(model.config, config, mode="incremental"))
    out_compact = greedy(model, ids, TurboQuantCache(model.config, config, mode="compact"))
    assert torch.equal(out_incremental, out_compact)


def test_key_outlier_channels_stay_exact_and_spare_the_rest():
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(1, 2, 30, 64, generator=generator)
    keys[..., [3, 17]] *= 50  # two heavy channels
    values = torch.randn(1, 2, 30, 64, generator=generator)
    inliers = [c for c in range(64) if c not in (3, 17)]
    errors = {}
    for outliers in (0, 8):
        config = TurboQuantConfig(sink_tokens=0, residual_window=0, key_outlier_channels=outliers)
        layer = TurboQuantLayer(config, layer_idx=1)
        layer.update(keys, values)
        keys_hat, _ = layer.compressed_kv()
        errors[outliers] = (keys_hat - keys)[..., inliers].norm() / keys[..., inliers].norm()
        if outliers:
            assert torch.equal(keys_hat[..., [3, 17]], keys[..., [3, 17]])
    # Without the split the heavy channels' norm spreads quantization error over every channel.
    assert errors[8] < 0.5 * errors[0]
    assert TurboQuantConfig(key_outlier_channels=8).key_bytes(64) == 28 + 4 + 16


@pytest.mark.parametrize("version", [2, 3])
def test_gemma_sliding_layers_stay_uncompressed(version):
    model = tiny_gemma(version)
    cache = TurboQuantCache(model.config, TurboQuantConfig(**EXACT))
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds.count("TurboQuantLayer") == len(model.config.layer_types) - model.config.layer_types.count("sliding_attention")
    ids = prompt(30)
    assert torch.equal(greedy(model, ids, cache), greedy(model, ids, DynamicCache(config=model.config)))
    compressed = TurboQuantCache(model.config, TurboQuantConfig(residual_window=2, sink_tokens=0, boundary_layers=0))
    assert greedy(model, ids, compressed).shape == (1, 42)
    assert compressed.layers[-1].packed_keys is not None


def tiny_qwen3_next():
    torch.manual_seed(0)
    config = transformers.Qwen3NextConfig(
        vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=32,
        linear_value_head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_hybrid_model_compresses_its_full_attention_layers_only():
    """Qwen3-Next: linear-attention layers keep the recurrent state transformers gives them, the
    full-attention layers are compressed, and the cache says which is which."""
    model = tiny_qwen3_next()
    config = TurboQuantConfig(residual_window=16, sink_tokens=0, boundary_layers=0)
    cache = TurboQuantCache(model.config, config)
    assert cache.compressed_layers() == [1, 3]
    assert cache.uncompressed == {0: "linear attention: uncompressed", 2: "linear attention: uncompressed"}
    ids = prompt(120)
    with torch.no_grad():
        ours = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=6, do_sample=False,
                              return_dict_in_generate=True, output_logits=True)
        exact = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), max_new_tokens=6,
                               do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert cache.layers[1].packed_keys is not None  # the full-attention layers did compress
    cosine = torch.nn.functional.cosine_similarity(torch.cat(ours.logits), torch.cat(exact.logits), dim=-1)
    assert cosine.min() > 0.99


def test_layer_types_the_cache_cannot_hold_are_refused():
    config = tiny_llama(layers=2).config
    config.layer_types = ["full_attention", "hybrid"]
    with pytest.raises(ValueError, match="layer 1 has attention type 'hybrid'"):
        TurboQuantCache(config, "k4v4")


def test_batch_with_left_padding():
    model = tiny_llama()
    ids = prompt(30, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0  # the second row is shorter, left-padded
    ids[1, :10] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        caches = [DynamicCache(config=model.config), TurboQuantCache(model.config, TurboQuantConfig(**EXACT)),
                  TurboQuantCache(model.config, TurboQuantConfig(residual_window=4, boundary_layers=0))]
        expected, exact, compressed = (model.generate(ids, **cache_kwargs(model, cache), **kwargs) for cache in caches)
    assert torch.equal(exact, expected)
    assert compressed.shape == expected.shape


def test_beam_search_and_multiple_return_sequences_reorder_the_cache():
    model = tiny_llama()
    ids = prompt(24)
    for kwargs in (dict(num_beams=3, num_return_sequences=2), dict(num_return_sequences=2, do_sample=True)):
        expected = greedy(model, ids, DynamicCache(config=model.config), **kwargs)
        got = greedy(model, ids, TurboQuantCache(model.config, TurboQuantConfig(**EXACT)), **kwargs)
        assert torch.equal(got, expected)
        assert greedy(model, ids, TurboQuantCache(model.config, TurboQuantConfig(residual_window=3, boundary_layers=0)), **kwargs).shape == expected.shape


def test_long_cache_with_large_norms_keeps_every_layer_accurate():
    """16K tokens whose keys grow to norms ~1e4: fp32 norms keep the cosine (fp16 would overflow past 65504)."""
    config = TurboQuantConfig(sink_tokens=0, residual_window=0)
    generator = torch.Generator().manual_seed(3)
    for layer_idx in range(4):
        layer = TurboQuantLayer(config, layer_idx)
        scale = torch.logspace(0, 4, 16384).view(1, 1, -1, 1)
        keys = torch.randn(1, 2, 16384, 128, generator=generator) * scale
        values = torch.randn(1, 2, 16384, 128, generator=generator) * scale
        for chunk in range(0, 16384, 4096):
            keys_hat, values_hat = layer.update(keys[:, :, chunk : chunk + 4096], values[:, :, chunk : chunk + 4096])
        assert layer.key_norms.dtype == torch.float32
        for x, x_hat in ((keys, keys_hat), (values, values_hat)):
            assert torch.nn.functional.cosine_similarity(x_hat, x, dim=-1).min() > 0.97
            assert torch.nn.functional.cosine_similarity(x_hat, x, dim=-1).mean() > 0.99


def test_memory_accounting():
    model = tiny_llama(head_dim=128, layers=2)
    cache = TurboQuantCache(model.config, TurboQuantConfig(residual_window=0, sink_tokens=0, center_keys=False,
                                                           center_values=False, boundary_layers=0))
    with torch.no_grad():
        model(prompt(100), **cache_kwargs(model, cache))
    # 2 layers × 2 kv heads × 100 tokens × 136 B, vs 2 × 2 × 100 × 2 × 128 × 4 B (fp32 model) for DynamicCache.
    assert cache.nbytes() == 2 * 2 * 100 * 136 + 2 * 2 * 2 * 128 * 4  # + the (zero) centers
    assert cache.dynamic_cache_nbytes() == 2 * 2 * 100 * 2 * 128 * 4


def test_default_boundary_layers_use_8_bits():
    model = tiny_llama(head_dim=64, layers=4)
    cache = TurboQuantCache(model.config, "k4v4")
    assert [(layer.config.key_bits, layer.config.value_bits) for layer in cache.layers] == [(8, 8), (4, 4), (4, 4), (8, 8)]
    keep = TurboQuantCache(model.config, TurboQuantConfig(boundary_layers=1, boundary_bits=None))
    assert cache.compressed_layers() == [0, 1, 2, 3] and keep.compressed_layers() == [1, 2]


def test_bad_configurations_are_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="preset"):
        TurboQuantCache(model.config, "k5v5")
    with pytest.raises(ValueError, match="mse"):
        TurboQuantCache(model.config, TurboQuantConfig(key_quantizer="prod"))
    with pytest.raises(ValueError, match="decoder-only"):
        TurboQuantCache(transformers.T5Config(), "k4v4")
    with pytest.raises(ValueError, match="mode"):
        TurboQuantCache(model.config, "k4v4", mode="fast")
    mla = tiny_mla().config
    with pytest.raises(ValueError, match="MLA"):  # refused up front, not mid-generate (the latent, or per-head)
        TurboQuantCache(mla, "k4v4", mode="fused")


def tiny_mla():
    torch.manual_seed(0)
    config = transformers.DeepseekV2Config(
        vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, first_k_dense_replace=3, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_mla_latent_is_compressed_and_its_rope_key_kept(monkeypatch):
    from turboquant.hf import cache as cache_module
    from turboquant.hf.verify import verify_ids

    model = tiny_mla()
    if not cache_module.caches_mla_latent(model.config):
        pytest.skip("this transformers caches MLA per head, not the latent")
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    config = TurboQuantConfig.from_preset("k4v4", sink_tokens=4, residual_window=16)
    report = verify_ids(model, ids, config, prefill=136, progress=False)
    middle = report.layers[1]  # a 4-bit layer; the first and last store 8-bit codes
    assert middle.status == "compressed" and 0.99 <= middle.key_cosine < 0.9999 and middle.value_cosine == 1.0
    assert all(layer.attention_cosine >= 0.99 for layer in report.layers)  # the gate at 4 bits
    cache = TurboQuantCache(model.config, config)
    with torch.no_grad():
        model(ids[:, :136], **cache_kwargs(model, cache))
    layer = cache.layers[1]
    assert layer.latent and layer.packed_values is None and layer.exact_values.dtype == torch.float32
    # kv_c [1, 1, tokens, 64] as 4-bit codes + norm; k_pe [.., 16] as it is
    assert layer.packed_keys.shape == (1, 1, 136 - 4 - 16, 32) and layer.exact_values.shape[-1] == 16
    assert cache.nbytes() < cache.dynamic_cache_nbytes()
    monkeypatch.setattr(cache_module, "caches_mla_latent", lambda text_config: False)
    with pytest.raises(ValueError, match="caches per-head keys and values"):
        TurboQuantCache(model.config, "k4v4")


def test_cache_kwargs_names_the_keyword_the_model_forward_takes():
    class Renamed:  # transformers ≥ 5.24
        def forward(self, input_ids, cache=None, use_cache=None): ...

    class Original:
        def forward(self, input_ids, past_key_values=None, use_cache=None): ...

    cache = DynamicCache()
    assert cache_kwargs(Renamed(), cache) == {"cache": cache}
    assert cache_kwargs(Original(), cache) == {"past_key_values": cache}
