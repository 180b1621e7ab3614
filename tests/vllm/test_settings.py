"""The vLLM plugin's configuration and registration logic, without vLLM."""

import subprocess
import sys
import tomllib
from types import SimpleNamespace
from pathlib import Path

import pytest

from turboquant.vllm.settings import VllmSettings

ROOT = Path(__file__).resolve().parents[2]


def layer_bits(settings: VllmSettings, num_layers: int = 4) -> list[tuple[int, int]]:
    return [(c.key_bits, c.value_bits) for c in (settings.layer_config(i, num_layers, 128) for i in range(num_layers))]


def test_default_is_k4v4_in_every_layer():
    settings = VllmSettings.from_additional_config({})
    assert settings == VllmSettings(preset="k4v4", boundary_layers=0)
    assert layer_bits(settings) == [(4, 4)] * 4


@pytest.mark.parametrize("value, counts", [
    ("k4v4", (4, 32)),  # the default
    ({"exact_recent": 16}, (4, 16)),  # the other count keeps its default
    ({"exact_sinks": 0, "exact_recent": 0}, (0, 0)),
])
def test_exact_token_counts_default_to_4_sinks_and_32_latest(value, counts):
    assert VllmSettings.from_additional_config({"turboquant": value}).exact_counts() == counts


def test_exact_tokens_where_a_layer_cannot_read_them_turn_off_by_default_and_refuse_set_counts():
    why = "on sliding-window layers"
    assert VllmSettings().exact_counts(why) == (0, 0)
    assert VllmSettings(exact_sinks=0, exact_recent=0).exact_counts(why) == (0, 0)
    with pytest.raises(ValueError, match="cannot be served on sliding-window layers"):
        VllmSettings(exact_recent=8).exact_counts(why)


def test_boundary_layers_store_8_bit_codes_when_asked():
    settings = VllmSettings.from_additional_config({"turboquant": {"boundary_layers": 1}})
    assert layer_bits(settings) == [(8, 8), (4, 4), (4, 4), (8, 8)]


@pytest.mark.parametrize("value, expected", [
    ("k3v3", VllmSettings(preset="k3v3")),
    ({"preset": "k4v3", "boundary_layers": 2}, VllmSettings(preset="k4v3", boundary_layers=2)),
    ({"boundary_bits": 4, "seed": 7}, VllmSettings(boundary_bits=4, seed=7)),
    ({"exact_sinks": 4, "exact_recent": 32}, VllmSettings(exact_sinks=4, exact_recent=32)),
])
def test_parses_a_preset_name_or_a_dict(value, expected):
    assert VllmSettings.from_additional_config({"turboquant": value, "other_plugin": 1}) == expected


@pytest.mark.parametrize("value, message", [
    ("k5v5", "preset must be one of"),
    ({"preset": "k4v4", "window": 128}, "unknown key"),
    ({"boundary_bits": None}, "boundary_bits must be one of"),
    ({"boundary_layers": -1}, "boundary_layers must be a non-negative integer"),
    ({"exact_recent": -8}, "exact_recent must be a non-negative integer"),
    (4, "must be a preset name or a dict"),
])
def test_bad_settings_are_value_errors_that_name_the_setting(value, message):
    with pytest.raises(ValueError, match=message):
        VllmSettings.from_additional_config({"turboquant": value})


def test_layer_codec_stores_every_token_compressed_with_the_preset_bits():
    config = VllmSettings(preset="k3v3", boundary_layers=0).layer_config(5, 32, 128)
    assert (config.key_bits, config.value_bits, config.key_quantizer, config.value_quantizer) == (3, 3, "mse", "mse")
    assert (config.sink_tokens, config.residual_window, config.center_keys, config.center_values) == (0, 0, False, False)
    assert config.bytes_per_token_per_head(128) == 48 + 48 + 8  # what vLLM's page size is built from


@pytest.mark.parametrize("head_dim, layer_idx", [(72, 0), (512, 0), (128, 32)])
def test_unservable_head_dim_or_layer_is_refused(head_dim, layer_idx):
    with pytest.raises(ValueError):
        VllmSettings().layer_config(layer_idx, 32, head_dim)


def test_entry_point_is_declared_and_importing_the_plugin_does_not_import_vllm():
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert entry_points["vllm.general_plugins"] == {"turboquant": "turboquant.vllm.plugin:register"}
    code = ("import sys, turboquant.vllm, turboquant.vllm.plugin as p, turboquant.vllm.settings; "
            "assert callable(p.register); assert 'vllm' not in sys.modules, 'vllm was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_mla_layers_store_the_latent_at_the_key_bits_of_any_width():
    settings = VllmSettings.from_additional_config({"turboquant": {"preset": "k3v3", "boundary_layers": 1}})
    assert [settings.latent_config(i, 4).key_bits for i in range(4)] == [8, 3, 3, 8]
    with pytest.raises(ValueError, match="outside the model"):
        settings.latent_config(4, 4)


@pytest.mark.parametrize("dtype, kv_cache_dtype, sparse, message", [
    ("bfloat16", "auto", True, "sparse MLA"),
    ("float32", "auto", False, "float16 or bfloat16"),
    ("bfloat16", "fp8", False, "leave --kv-cache-dtype at 'auto'"),
])
def test_mla_layers_we_cannot_serve_are_refused_with_what_to_change(dtype, kv_cache_dtype, sparse, message):
    from turboquant.vllm.plugin import check_latent_layer

    backend = SimpleNamespace(supported_dtypes=["float16", "bfloat16"], supported_kv_cache_dtypes=["auto", "bfloat16"])
    with pytest.raises(ValueError, match=message):
        check_latent_layer(backend, dtype, kv_cache_dtype, sparse)
    check_latent_layer(backend, "bfloat16", "auto", False)  # what we serve passes


def test_weight_settings_from_the_environment():
    from turboquant.vllm.settings import WeightSettings

    assert WeightSettings.from_environment({}) == WeightSettings(bits=4, group_size=128)
    assert WeightSettings.from_environment({"TURBOQUANT_WEIGHT_BITS": "3", "TURBOQUANT_WEIGHT_GROUP_SIZE": "64"}) == \
        WeightSettings(bits=3, group_size=64)
    with pytest.raises(ValueError, match="TURBOQUANT_WEIGHT_BITS must be an integer, got 'four'"):
        WeightSettings.from_environment({"TURBOQUANT_WEIGHT_BITS": "four"})
    with pytest.raises(ValueError, match="turboquant weights .*bits must be one of"):
        WeightSettings.from_environment({"TURBOQUANT_WEIGHT_BITS": "5"})
    with pytest.raises(ValueError, match="group_size"):
        WeightSettings.from_environment({"TURBOQUANT_WEIGHT_GROUP_SIZE": "12"})
    assert WeightSettings.from_checkpoint({"quant_method": "turboquant", "bits": 2}) == WeightSettings(bits=2)
