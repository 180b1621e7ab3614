"""The fused mode (attention over the compressed pages by the Triton kernels) against the reference
path (dequantize, then SDPA) of the same cache configuration. Runs natively on a GPU and in Triton's
interpreter on the CPU."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("triton")

import turboquant.hf  # noqa: E402,F401  registers attn_implementation="turboquant"
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.hf.cache import TurboQuantCache, cache_kwargs  # noqa: E402

from .test_cache import tiny_gemma  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = TurboQuantConfig.from_preset("k4v4", sink_tokens=2, residual_window=6, boundary_layers=0)


def tiny_model(head_dim=64, **extra):
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=4 * head_dim, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512, **extra)
    config._attn_implementation = "turboquant"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().to(DEVICE)


def step_logits(model, cache, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Feed the chunks one after another through the cache; the logits of every chunk."""
    out = []
    with torch.no_grad():
        for chunk in chunks:
            out.append(model(chunk.to(DEVICE), **cache_kwargs(model, cache), use_cache=True).logits.float().cpu())
    return out


def assert_fused_follows_reference(fused, reference, dynamic):
    """The fused logits stay within a tenth of what compression itself changes (fp16 operands in the
    kernels against fp32 dequantization in the reference path)."""
    for got, want, exact in zip(fused, reference, dynamic):
        compression = (want - exact).abs().max()
        assert compression > 1e-3  # compressed tokens were read: there is something to follow
        assert (got - want).abs().max() < 0.1 * compression


@pytest.mark.parametrize("head_dim,preset", [(64, "k4v4"), (128, "k3v3")])
def test_fused_decode_and_chunked_prefill_follow_the_reference(head_dim, preset):
    model = tiny_model(head_dim)
    config = TurboQuantConfig.from_preset(preset, sink_tokens=2, residual_window=6, boundary_layers=0)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ids = torch.randint(0, 128, (1, 47), generator=generator)
    # a prefill, a chunk into the compressed cache (extend kernel), then single tokens (decode kernel)
    chunks = [ids[:, :30], ids[:, 30:41], *ids[:, 41:].split(1, dim=1)]
    fused = TurboQuantCache(model.config, config, mode="fused")
    got = step_logits(model, fused, chunks)
    want = step_logits(model, TurboQuantCache(model.config, config), chunks)
    exact = step_logits(model, transformers.DynamicCache(config=model.config), chunks)
    assert_fused_follows_reference(got[1:], want[1:], exact[1:])  # the prefill attends to nothing compressed
    layer = fused.layers[0]
    assert layer.pages.num_tokens == 47 - 2 - 6 and layer.packed_keys is None and layer.dequantized_keys is None


def test_fused_batch_with_left_padding_follows_the_reference():
    model = tiny_model()
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ids = torch.randint(1, 128, (2, 26), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0  # the second sequence is 9 tokens shorter
    options = dict(attention_mask=mask.to(DEVICE), max_new_tokens=5, do_sample=False, pad_token_id=0,
                   return_dict_in_generate=True, output_logits=True)
    logits = {}
    with torch.no_grad():
        for name, cache in (("fused", TurboQuantCache(model.config, CONFIG, mode="fused")),
                            ("reference", TurboQuantCache(model.config, CONFIG)),
                            ("dynamic", transformers.DynamicCache(config=model.config))):
            out = model.generate(ids.to(DEVICE), **cache_kwargs(model, cache), **options)
            logits[name] = [step.float().cpu() for step in out.logits]
    assert_fused_follows_reference(logits["fused"][1:], logits["reference"][1:], logits["dynamic"][1:])


def test_fused_memory_holds_compressed_pages_only():
    model = tiny_model()
    cache = TurboQuantCache(model.config, CONFIG, mode="fused")
    step_logits(model, cache, [torch.randint(0, 128, (1, 300))])
    layer = cache.layers[0]
    held = layer.pages.nbytes() + sum(t.numel() * t.element_size() for t in (
        layer.sink_keys, layer.sink_values, layer.keys, layer.values, layer.key_center, layer.value_center))
    assert cache.layers[0].nbytes() == held
    # 292 compressed tokens; capacity grows in 256-token steps → 512 tokens × 2 heads × (32 + 32 + 8) bytes
    assert layer.pages.nbytes() == 512 * 2 * (32 + 32 + 8)


def test_fused_mode_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="attn_implementation='turboquant'"):
        config = transformers.LlamaConfig(vocab_size=16, hidden_size=64, num_hidden_layers=1, num_attention_heads=1)
        config._attn_implementation = "sdpa"
        TurboQuantCache(config, CONFIG, mode="fused")
    with pytest.raises(ValueError, match="layer 0: head_dim must be one of"):
        TurboQuantCache(tiny_model(head_dim=48).config, CONFIG, mode="fused")
    with pytest.raises(ValueError, match="kernels do not split outlier"):
        TurboQuantCache(tiny_model().config, CONFIG.replace(key_outlier_channels=4), mode="fused")
    gemma = tiny_gemma(2).config
    gemma._attn_implementation = "turboquant"
    with pytest.raises(ValueError, match="center_keys=False"):
        TurboQuantCache(gemma, CONFIG, mode="fused")
