"""A vision-language model with a long run of image tokens (> 11K, one video-clip's worth in Molmo2)
through TurboQuantCache: it generates, stays close to DynamicCache, and holds exactly the bytes the
layout says."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.hf.cache import TurboQuantCache, cache_kwargs  # noqa: E402

SIDE = 106  # a 106 × 106 patch grid: 11,236 image tokens
IMAGE_TOKEN = 63


def tiny_llava():
    config = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             head_dim=64, max_position_embeddings=16384),
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=SIDE * 4, patch_size=4),
        image_token_index=IMAGE_TOKEN, vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval()


def test_eleven_thousand_image_tokens_then_text():
    model = tiny_llava()
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    text = torch.randint(2, 60, (1, 20), generator=generator)
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, SIDE * SIDE), IMAGE_TOKEN), text], dim=1)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, SIDE * 4, SIDE * 4, generator=generator),
                  attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                  return_dict_in_generate=True, output_logits=True)
    config = TurboQuantConfig.from_preset("k4v4", boundary_layers=0)
    cache = TurboQuantCache(model.config, config)
    with torch.no_grad():
        ours = model.generate(**inputs, **cache_kwargs(model, cache))
        exact = model.generate(**inputs, **cache_kwargs(model, transformers.DynamicCache(config=model.config)))
    logits, exact_logits = torch.cat(ours.logits), torch.cat(exact.logits)
    assert torch.nn.functional.cosine_similarity(logits, exact_logits, dim=-1).min() > 0.99
    # the memory report: sinks and window at full precision (fp32 here), the rest compressed, two centers
    tokens = ids.shape[1] + 5
    full = config.sink_tokens + config.residual_window
    per_layer = ((tokens - full) * config.bytes_per_token_per_head(64) + 2 * full * 64 * 4 + 2 * 64 * 4)
    assert [layer.num_tokens for layer in cache.layers] == [tokens, tokens]
    assert cache.nbytes() == 2 * per_layer
    assert cache.dynamic_cache_nbytes() / cache.nbytes() > 3.5


def tiny_mllama():
    config = transformers.MllamaConfig(
        text_config=dict(vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, cross_attention_layers=[1], bos_token_id=1,
                         eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_global_layers=1,
                           attention_heads=2, image_size=28, patch_size=14, vision_output_dim=64, max_num_tiles=1,
                           supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0]),
        image_token_index=IMAGE_TOKEN)
    torch.manual_seed(0)
    return transformers.MllamaForConditionalGeneration(config).eval()


def test_cross_attention_layers_stay_uncompressed():
    """Mllama's cross-attention layer holds the image's K/V, written once and read back through
    `layer.keys` every step: it is kept as transformers keeps it, and said so; the others compress."""
    model = tiny_mllama()
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ids = torch.cat([torch.tensor([[1, IMAGE_TOKEN]]), torch.randint(3, 60, (1, 300), generator=generator)], dim=1)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 1, 1, 3, 28, 28, generator=generator),
                  aspect_ratio_ids=torch.tensor([[1]]), aspect_ratio_mask=torch.ones(1, 1, 1, dtype=torch.long),
                  cross_attention_mask=torch.ones(1, ids.shape[1], 1, 1, dtype=torch.long),
                  attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                  return_dict_in_generate=True, output_logits=True)
    cache = TurboQuantCache(model.config, TurboQuantConfig.from_preset("k4v4", boundary_layers=0))
    assert cache.compressed_layers() == [0, 2, 3]
    assert cache.uncompressed == {1: "cross-attention: uncompressed"}
    with torch.no_grad():
        ours = model.generate(**inputs, **cache_kwargs(model, cache))
        exact_cache = transformers.DynamicCache(config=model.config)
        exact = model.generate(**inputs, **cache_kwargs(model, exact_cache))
    assert cache.layers[1].keys.shape[2] == exact_cache.layers[1].keys.shape[2] > 0  # the image's K/V
    assert torch.equal(cache.layers[1].keys, exact_cache.layers[1].keys)
    logits, exact_logits = torch.cat(ours.logits), torch.cat(exact.logits)
    assert torch.nn.functional.cosine_similarity(logits, exact_logits, dim=-1).min() > 0.99
