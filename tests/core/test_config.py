import pytest

from turboquant.core import PRESETS, TurboQuantConfig


def test_k4v4_bytes_and_ratio_at_d128():
    config = TurboQuantConfig.from_preset("k4v4")
    assert config.bytes_per_token_per_head(128) == 136
    assert config.compression_ratio(128) == pytest.approx(512 / 136)


@pytest.mark.parametrize("name,expected", [("k4v3", 68 + 52), ("k3v3", 104), ("k2v2", 72), ("k8v4", 132 + 68), ("k3v4", 52 + 68)])
def test_preset_bytes_at_d128(name, expected):
    assert TurboQuantConfig.from_preset(name).bytes_per_token_per_head(128) == expected


def test_prod_keys_cost_one_sketch_bit_and_a_residual_norm():
    config = TurboQuantConfig(key_bits=4, key_quantizer="prod")
    assert config.key_bytes(128) == 48 + 16 + 8


def test_presets_are_data_and_overrides_apply():
    assert {"k4v4", "k4v3", "k3v3", "k3v4", "k2v2", "k8v4"} <= set(PRESETS)
    assert TurboQuantConfig.from_preset("k3v3", norm_correction=False).norm_correction is False


@pytest.mark.parametrize("kwargs,match", [
    (dict(key_bits=5), "key_bits"),
    (dict(value_bits=0), "value_bits"),
    (dict(key_quantizer="qjl"), "key_quantizer"),
    (dict(key_quantizer="prod", key_bits=8), "key_bits"),
    (dict(rotation="fft"), "rotation"),
    (dict(seed=-1), "seed"),
])
def test_bad_config_names_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TurboQuantConfig(**kwargs)


def test_unknown_preset_and_bad_head_dim():
    with pytest.raises(ValueError, match="preset"):
        TurboQuantConfig.from_preset("k5v5")
    with pytest.raises(ValueError, match="head_dim"):
        TurboQuantConfig().check_head_dim(8)
    with pytest.raises(ValueError, match="multiple of 8"):
        TurboQuantConfig(key_bits=3).check_head_dim(20)
