import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant.core import MSEQuantizer, ProdQuantizer, TurboQuantConfig, make_rotation

DIMS = [64, 80, 96, 128, 256]


def random_unit(n, dim, seed):
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@settings(max_examples=40, deadline=None)
@given(dim=st.sampled_from(DIMS), bits=st.sampled_from([1, 2, 3, 4, 8]), norm_correction=st.booleans(),
       lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1),
       scale=st.floats(1e-3, 1e3))
def test_mse_round_trip(dim, bits, norm_correction, lead, seed, scale):
    quantizer = MSEQuantizer(dim, bits, make_rotation(dim, seed % 97), norm_correction)
    x = torch.randn(*lead, dim, generator=torch.Generator().manual_seed(seed)) * scale
    code = quantizer.quantize(x)
    assert code.indices.shape == x.shape and code.indices.dtype == torch.uint8
    assert code.norms.shape == x.shape[:-1] and code.norms.dtype == torch.float32
    # Every rotated coordinate took its nearest level (a value on a decision boundary, within float
    # rounding, may take either neighbour: hypothesis found one at dim 80, 3 bits, seed 381526).
    unit_rotated = quantizer.rotation.apply(x / x.norm(dim=-1, keepdim=True))
    centroids = quantizer.codebook.centroids
    nearest = (unit_rotated.unsqueeze(-1) - centroids).abs().argmin(-1)
    chosen_distance = (unit_rotated - centroids[code.indices.long()]).abs()
    torch.testing.assert_close(chosen_distance, (unit_rotated - centroids[nearest]).abs(), rtol=0, atol=1e-6)
    x_hat = quantizer.dequantize(code)
    assert x_hat.shape == x.shape
    if norm_correction:
        assert torch.allclose(x_hat.norm(dim=-1), x.norm(dim=-1), rtol=1e-4)
    # Scale equivariance: the code of c·x is the code of x with norms times c.
    scaled = quantizer.quantize(x * 2.0)
    assert torch.equal(scaled.indices, code.indices)
    assert torch.allclose(scaled.norms, code.norms * 2.0, rtol=1e-5)


@pytest.mark.parametrize("dim", DIMS)
def test_mse_4bit_cosine_on_random_vectors(dim):
    quantizer = MSEQuantizer(dim, 4, make_rotation(dim, 0), norm_correction=True)
    x = torch.randn(2000, dim, dtype=torch.bfloat16)
    cos = torch.nn.functional.cosine_similarity(quantizer.dequantize(quantizer.quantize(x)), x.float(), dim=-1)
    assert cos.mean() > 0.99  # 1 − E‖u − û‖²/2 ≈ 0.995 at 4 bits


def test_zero_vector_round_trips_to_zero():
    for norm_correction in (False, True):
        quantizer = MSEQuantizer(64, 3, make_rotation(64, 0), norm_correction)
        x = torch.zeros(4, 64)
        assert torch.equal(quantizer.dequantize(quantizer.quantize(x)), x)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(3, 64, dtype=torch.int32), "floating"),
    (torch.full((3, 64), float("nan")), "NaN"),
    (torch.full((3, 64), float("inf")), "NaN or Inf"),
    (torch.zeros(3, 32), r"shape \[\.\.\., 64\]"),
])
def test_bad_input_is_one_value_error(bad, match):
    quantizer = MSEQuantizer(64, 4, make_rotation(64, 0))
    with pytest.raises(ValueError, match=match):
        quantizer.quantize(bad)


def test_mismatched_code_shapes_are_rejected():
    quantizer = MSEQuantizer(64, 4, make_rotation(64, 0))
    code = quantizer.quantize(torch.randn(5, 64))
    with pytest.raises(ValueError, match="disagree"):
        quantizer.dequantize(type(code)(code.indices, code.norms[:3]))


def correlated_pairs(n, dim, seed):
    """Pairs with large ⟨q, x⟩, so a biased estimator shows its bias (random pairs would hide it)."""
    x = random_unit(n, dim, seed)
    q = x + 0.5 * random_unit(n, dim, seed + 1)
    return q, x


def prod_errors(dim, bits, num_sketches, pairs_per_sketch, seed):
    """Estimator errors for correlated pairs, a fresh QJL matrix S for each group of pairs: the paper's
    unbiasedness is over the draw of S (with one fixed S the error has a small conditional bias)."""
    rotation = make_rotation(dim, seed)
    q, x = correlated_pairs(num_sketches * pairs_per_sketch, dim, seed)
    errors, mse_errors, predicted = [], [], []
    for group, (q_part, x_part) in enumerate(zip(q.split(pairs_per_sketch), x.split(pairs_per_sketch))):
        quantizer = ProdQuantizer(dim, bits, rotation, qjl_seed=seed * 100_000 + group)
        code = quantizer.quantize(x_part)
        truth = (q_part * x_part).sum(-1)
        errors.append(quantizer.inner_product(q_part, code) - truth)
        mse_errors.append((q_part * quantizer.mse.dequantize(code.mse)).sum(-1) - truth)
        # Lemma 4: Var = π/(2m)·‖r‖²(‖q‖² − (2/π)⟨q, r/‖r‖⟩²) with m = d sketch rows.
        residual = x_part - quantizer.mse.dequantize(code.mse)
        cos_qr = (q_part * residual).sum(-1) / (q_part.norm(dim=-1) * residual.norm(dim=-1))
        predicted.append(math.pi / (2 * dim) * residual.norm(dim=-1) ** 2 * q_part.norm(dim=-1) ** 2
                         * (1 - 2 / math.pi * cos_qr**2))
    return q, torch.stack(errors), torch.stack(mse_errors), torch.cat(predicted)


def mean_and_standard_error(errors):
    """Mean over all pairs; standard error from the independent per-sketch means."""
    group_means = errors.mean(-1)
    return errors.mean().item(), group_means.std().item() / math.sqrt(len(group_means))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_inner_product_is_unbiased_and_meets_the_variance_bound(bits):
    dim = 128
    q, errors, mse_errors, predicted = prod_errors(dim, bits, num_sketches=1000, pairs_per_sketch=100, seed=bits)
    mean, standard_error = mean_and_standard_error(errors)
    assert abs(mean) < 3 * standard_error
    # The MSE stage alone is biased (it shrinks ⟨q, x⟩): the same check catches that bias.
    mse_mean, mse_standard_error = mean_and_standard_error(mse_errors)
    assert abs(mse_mean) > 10 * mse_standard_error
    observed = (errors.flatten() ** 2).mean()
    assert abs(observed / predicted.mean() - 1) < 0.05
    # Theorem 2 for unit x, per unit ‖q‖²: D_prod ≤ √3·π²/d · 4^(−b).
    normalized = ((errors.flatten() / q.norm(dim=-1)) ** 2).mean().item()
    assert normalized <= math.sqrt(3) * math.pi**2 / dim * 4.0**-bits


def test_prod_dequantize_matches_the_inner_product_estimator():
    dim = 64
    quantizer = ProdQuantizer(dim, 3, make_rotation(dim, 1), qjl_seed=2)
    q, x = correlated_pairs(1000, dim, seed=9)
    code = quantizer.quantize(x)
    via_vector = (q * quantizer.dequantize(code)).sum(-1)
    assert torch.allclose(via_vector, quantizer.inner_product(q, code), atol=1e-4)


def test_prod_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        ProdQuantizer(64, 1, make_rotation(64, 0), qjl_seed=0)


def test_config_builds_matching_quantizers():
    config = TurboQuantConfig(key_bits=4, key_quantizer="prod", value_bits=3)
    key, value = config.make_quantizer("key", 128, layer_idx=2), config.make_quantizer("value", 128, layer_idx=2)
    assert isinstance(key, ProdQuantizer) and key.mse.bits == 3
    assert isinstance(value, MSEQuantizer) and value.bits == 3
    assert torch.equal(key.mse.rotation.matrix(), value.rotation.matrix())
    other_layer = config.make_quantizer("value", 128, layer_idx=3)
    assert not torch.allclose(other_layer.rotation.matrix(), value.rotation.matrix())
