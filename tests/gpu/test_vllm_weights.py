"""`--quantization turboquant` without an engine: vLLM's Linear method creates the bf16 weight its loader
fills, quantizes it after loading, frees it, and computes the layer from the codes as `TQLinear` does,
through a custom op that torch.compile keeps whole. Needs vLLM importable (the GPU host, or its source
on the path); runs the GEMV kernel on CUDA and the dequantizing path on the CPU."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def weights_module(monkeypatch):
    from vllm.model_executor import parameter

    from turboquant.vllm import weights

    # one GPU's partition: vLLM's weight parameters ask for the tensor-parallel rank and size
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    return weights


def linear_base(weights_module):
    """An instance of vLLM's LinearBase for the method lookup, without the tensor-parallel group its
    constructor asks for."""
    return weights_module.LinearBase.__new__(weights_module.LinearBase)


def loaded_layer(method, in_features, partition_sizes, bias):
    """A layer as vLLM builds it: create_weights, then the loader copies the checkpoint's weight in."""
    layer = torch.nn.Module()
    method.create_weights(layer, in_features, partition_sizes, in_features, sum(partition_sizes), torch.bfloat16,
                          weight_loader=lambda param, loaded: param.data.copy_(loaded))
    weight = torch.randn(sum(partition_sizes), in_features, dtype=torch.bfloat16, device=DEVICE)
    layer.weight.weight_loader(layer.weight, weight)
    return layer.to(DEVICE), weight, (torch.randn(sum(partition_sizes), dtype=torch.bfloat16, device=DEVICE)
                                      if bias else None)


@pytest.mark.parametrize("bits, group_size, rows", [(4, 128, 1), (3, 64, 5), (2, 128, 80)])
def test_linear_method_matches_tqlinear(weights_module, bits, group_size, rows):
    from turboquant.vllm.settings import WeightSettings
    from turboquant.weights import TQLinear

    method = weights_module.TurboQuantWeightConfig(WeightSettings(bits, group_size)).get_quant_method(
        linear_base(weights_module), prefix="model.layers.0.mlp.down_proj")
    assert isinstance(method, weights_module.TurboQuantLinearMethod)
    layer, weight, bias = loaded_layer(method, 256, [64, 32], bias=True)  # a merged layer of two outputs
    method.process_weights_after_loading(layer)
    assert "weight" not in dict(layer.named_parameters())  # the bf16 weight is gone
    reference = TQLinear.from_weight(weight, bias, bits, group_size)
    x = torch.randn(rows, 256, dtype=torch.bfloat16, device=DEVICE)
    expected = reference(x)
    got = method.apply(layer, x, bias)
    assert got.shape == (rows, 96) and got.dtype == torch.bfloat16
    # the bias is added in bf16 after the product (vLLM passes it separately), and the kernel rounds its
    # operands to fp16: a few bf16 ulps (2^-8 relative) of the largest output
    assert (got.float() - expected.float()).abs().max() < 5 * 2**-8 * expected.float().abs().max()
    # and the product is the quantized weight's, far closer than to the original bf16 weight's
    exact = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    assert (expected.float() - exact).abs().mean() > 10 * (got.float() - expected.float()).abs().mean()


def test_custom_op_compiles_whole(weights_module):
    from turboquant.weights import TQLinear

    codes = TQLinear.from_weight(torch.randn(48, 128, device=DEVICE), None, 4, 64)

    def layer(x):
        return torch.relu(weights_module.codes_linear_op(x, codes.packed, codes.norms, 4, 64, 0)) * 2

    x = torch.randn(3, 128, device=DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: no graph break allowed
    assert torch.allclose(compiled(x), layer(x), atol=1e-5)


def test_unquantized_layers_and_a_group_size_that_does_not_divide(weights_module):
    from turboquant.vllm.settings import WeightSettings

    config = weights_module.TurboQuantWeightConfig(WeightSettings(4, 128))
    assert config.get_quant_method(torch.nn.Embedding(10, 4), prefix="model.embed_tokens") is None
    method = config.get_quant_method(linear_base(weights_module), prefix="model.layers.0.self_attn.qkv_proj")
    with pytest.raises(ValueError, match="group size 128 does not divide the input width 576 of "
                                         "model.layers.0.self_attn.qkv_proj.*TURBOQUANT_WEIGHT_GROUP_SIZE.*e.g. 64"):
        method.create_weights(torch.nn.Module(), 576, [64], 576, 64, torch.bfloat16, weight_loader=None)


def test_registered_with_vllm_and_read_from_a_checkpoint(weights_module):
    from vllm.model_executor.layers.quantization import get_quantization_config

    assert get_quantization_config("turboquant") is weights_module.TurboQuantWeightConfig
    config = weights_module.TurboQuantWeightConfig.from_config({"quant_method": "turboquant", "bits": 3,
                                                                "group_size": 64})
    assert (config.settings.bits, config.settings.group_size) == (3, 64)
    with pytest.raises(ValueError, match="unknown key"):
        weights_module.TurboQuantWeightConfig.from_config({"bits": 3, "groups": 64})


def test_weight_settings_key_the_compile_cache(weights_module, monkeypatch):
    """Engines at 3 and 4 bits must not share a compiled graph: the bits are constants in it."""
    from vllm import envs

    weights_module.key_compile_cache_by_settings()
    weights_module.key_compile_cache_by_settings()  # idempotent
    keys = []
    for bits in ("4", "3"):
        monkeypatch.setenv(weights_module.WEIGHT_BITS_ENV, bits)
        keys.append(envs.compile_factors())
    assert keys[0] != keys[1]
    assert keys[1][weights_module.WEIGHT_BITS_ENV] == "3"


@pytest.fixture
def one_process_group():
    """vLLM's tensor-parallel state for one process (gloo), inside a config for this device."""
    import socket

    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device=DEVICE))):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


def test_merged_qkv_layer_loads_its_shards_then_compresses(one_process_group):
    """vLLM's QKVParallelLinear with the method: its own loader puts q, k and v into the merged weight,
    which is then compressed; the layer computes what one TQLinear of the concatenated weight does."""
    from vllm.model_executor.layers.linear import QKVParallelLinear

    from turboquant.vllm.settings import WeightSettings
    from turboquant.vllm.weights import TurboQuantLinearMethod, TurboQuantWeightConfig
    from turboquant.weights import TQLinear

    layer = QKVParallelLinear(128, 32, 4, 2, bias=True, params_dtype=torch.bfloat16, prefix="layers.0.qkv_proj",
                              quant_config=TurboQuantWeightConfig(WeightSettings(4, 64))).to(DEVICE)
    assert isinstance(layer.quant_method, TurboQuantLinearMethod)
    shards = {"q": 128, "k": 64, "v": 64}
    weights = {s: torch.randn(n, 128, dtype=torch.bfloat16, device=DEVICE) for s, n in shards.items()}
    biases = {s: torch.randn(n, dtype=torch.bfloat16, device=DEVICE) for s, n in shards.items()}
    for shard in ("v", "q", "k"):  # any order: each lands at its own rows
        layer.weight.weight_loader(layer.weight, weights[shard], shard)
        layer.bias.weight_loader(layer.bias, biases[shard], shard)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, 128, dtype=torch.bfloat16, device=DEVICE)
    got, _ = layer(x)
    expected = TQLinear.from_weight(torch.cat(list(weights.values())), torch.cat(list(biases.values())), 4, 64)(x)
    assert (got.float() - expected.float()).abs().max() < 5 * 2**-8 * expected.float().abs().max()
