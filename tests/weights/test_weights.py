"""Weight compression: TQLinear against its own definition, quantize_model's swaps and its errors."""

import pytest
import torch
from torch import nn

from turboquant.weights import HEAVY_TAIL, TQLinear, quantize_model
from turboquant.weights.model import excess_kurtosis


@pytest.fixture
def generator(request) -> torch.Generator:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def linear(in_features, out_features, generator, bias=True):
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.05)
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=generator))
    return layer


# Mean cosine of a group with its reconstruction, a little under sqrt(1 − D(b)) for the Lloyd–Max
# distortion of a unit vector (D ≈ 0.009, 0.034, 0.117 at 4, 3, 2 bits).
@pytest.mark.parametrize("bits, mean_cosine", [(4, 0.993), (3, 0.978), (2, 0.93)])
def test_forward_is_the_dequantized_weight_and_close_to_the_original(bits, mean_cosine, generator):
    original = linear(256, 48, generator)
    layer = TQLinear.from_linear(original, bits, group_size=128)
    x = torch.randn(5, 256, generator=generator)
    # forward (in the rotated space) == x·Ŵᵀ + b to float32 rounding, and Ŵ is close to W row group by row group
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T + original.bias, rtol=1e-5, atol=1e-5)
    cosine = nn.functional.cosine_similarity(layer.dequantize().view(-1, 128), original.weight.view(-1, 128), dim=-1)
    assert cosine.mean() >= mean_cosine
    # storage: bits per weight plus one fp16 norm per group
    assert layer.packed.numel() == 48 * 256 * bits // 8 and layer.norms.dtype == torch.float16


def test_quantize_model_swaps_every_linear_but_the_head(generator):
    model = nn.Sequential()
    model.add_module("block", nn.Sequential(linear(128, 256, generator), nn.ReLU(), linear(256, 128, generator)))
    model.add_module("lm_head", linear(128, 64, generator, bias=False))
    quantize_model(model, bits=3, group_size=128, progress=False)
    assert [type(m).__name__ for m in (model.block[0], model.block[2], model.lm_head)] == ["TQLinear", "TQLinear", "Linear"]
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, bits=3, group_size=128, progress=False)


@pytest.mark.parametrize("bits, group_size, message", [
    (5, 128, "bits must be one of"),
    (4, 96, "does not divide in_features"),
    (3, 20, "group_size must be"),
])
def test_bad_arguments_fail_before_anything_changes(bits, group_size, message, generator):
    model = nn.Sequential(linear(128, 32, generator), linear(32, 128, generator))
    with pytest.raises(ValueError, match=message):
        quantize_model(model, bits=bits, group_size=group_size, progress=False)
    assert all(type(m) is nn.Linear for m in model)


def test_kurtosis_rule_gives_heavy_tailed_tensors_more_bits_or_none(generator):
    gaussian = linear(128, 128, generator)
    heavy, heavier = linear(128, 128, generator), linear(128, 128, generator)
    with torch.no_grad():  # sparse large entries: excess kurtosis ~16 and ~100
        for layer, every in ((heavy, 40), (heavier, 200)):
            flat = layer.weight.view(-1)
            flat[::every] *= 5 if every == 40 else 12
    kurtosis = [excess_kurtosis(m.weight) for m in (gaussian, heavy, heavier)]
    assert abs(kurtosis[0]) < 1 and HEAVY_TAIL[0] < kurtosis[1] < HEAVY_TAIL[1] < kurtosis[2]
    model = nn.Sequential(gaussian, heavy, heavier)
    quantize_model(model, bits=3, group_size=128, progress=False, heavy_tail=HEAVY_TAIL)
    assert [getattr(m, "bits", None) for m in model] == [3, 4, None]
    assert type(model[2]) is nn.Linear  # kept as it was
    with pytest.raises(ValueError, match="heavy_tail must be"):
        quantize_model(nn.Sequential(linear(128, 32, generator)), bits=3, group_size=128, heavy_tail=(30.0, 10.0))


def test_one_weight_quantizer_per_shape_however_it_is_asked_for():
    from turboquant.weights.linear import weight_quantizer

    shared = weight_quantizer(64, 4)
    assert weight_quantizer(64, 4, 0) is shared and weight_quantizer(group_size=64, bits=4, seed=0) is shared
    assert weight_quantizer(64, 4, 1) is not shared and weight_quantizer(64, 3) is not shared
