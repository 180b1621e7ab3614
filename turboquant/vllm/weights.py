"""`vllm serve MODEL --quantization turboquant`: Linear weights stored as TurboQuant codes.

    vllm serve MODEL --quantization turboquant                                  # 4 bits, groups of 128
    TURBOQUANT_WEIGHT_BITS=3 TURBOQUANT_WEIGHT_GROUP_SIZE=64 vllm serve MODEL --quantization turboquant

A bf16/fp16 checkpoint loads as vLLM loads it (each Linear weight of this GPU's partition, merged
qkv/gate_up included, in the model's dtype); after loading, each is quantized group by group along its
input (`TQLinear.from_weight`) and freed, so the load peaks at the bf16 size. A layer then computes
`codes_linear` through the custom op `turboquant::codes_linear`, which torch.compile leaves opaque (and
CUDA graphs capture): the Triton GEMV for decode-sized inputs, a dequantized weight and one matmul for
prefill-sized ones. Embeddings, the output head and MoE experts are not Linear layers in vLLM and stay
in the model's dtype.
"""

from __future__ import annotations

import functools
import os

import torch
from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase, UnquantizedLinearMethod,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ..weights.linear import (TQLinear, codes_linear, largest_fitting_group_size, prepare_codes_linear,
                              weight_quantizer)
from .settings import WEIGHT_BITS_ENV, WEIGHT_GROUP_SIZE_ENV, WeightSettings

METHOD = "turboquant"


def key_compile_cache_by_settings() -> None:
    """Idempotent: make the weight settings' environment variables part of vLLM's torch.compile cache key.
    vLLM keys that cache by its own environment variables (`vllm.envs.compile_factors`) and configs,
    which hold the method's name but not its settings; the bits and group size are constants of the
    compiled graph (arguments of the custom op), so without this an engine at 3 bits loaded the graph an
    earlier 4-bit engine on the machine had compiled and failed at start ("packed has 48 bytes in its
    last dimension, expected 64")."""
    from vllm import envs

    for name in (WEIGHT_BITS_ENV, WEIGHT_GROUP_SIZE_ENV):
        envs.environment_variables.setdefault(name, functools.partial(os.environ.get, name))


@torch.library.custom_op("turboquant::codes_linear", mutates_args=())
def codes_linear_op(x: torch.Tensor, packed: torch.Tensor, norms: torch.Tensor, bits: int, group_size: int,
                    seed: int) -> torch.Tensor:
    return codes_linear(x, packed, norms, weight_quantizer(group_size, bits, seed))


@codes_linear_op.register_fake
def _(x, packed, norms, bits, group_size, seed):
    return x.new_empty(*x.shape[:-1], norms.shape[0])


@register_quantization_config(METHOD)
class TurboQuantWeightConfig(QuantizationConfig):
    def __init__(self, settings: WeightSettings | None = None):
        super().__init__()
        self.settings = settings or WeightSettings.from_environment(os.environ)

    def get_name(self):
        return METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the GEMV's fp16 tensor-core tiles

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # a bf16 checkpoint has none: the method is built with no arguments

    @classmethod
    def from_config(cls, config: dict) -> "TurboQuantWeightConfig":
        return cls(WeightSettings.from_checkpoint(config))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        return TurboQuantLinearMethod(self.settings, prefix) if isinstance(layer, LinearBase) else None


# its weight is UnquantizedLinearMethod's parameter, so it takes the same (v2) loaders
@register_weight_loader_v2_supported_method
class TurboQuantLinearMethod(LinearMethodBase):
    def __init__(self, settings: WeightSettings, prefix: str):
        self.settings, self.prefix = settings, prefix

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        group_size = self.settings.group_size
        if input_size_per_partition % group_size:
            fit = largest_fitting_group_size(input_size_per_partition)
            raise ValueError(f"turboquant weights: group size {group_size} does not divide the input width "
                             f"{input_size_per_partition} of {self.prefix} (on each GPU); set "
                             f"{WEIGHT_GROUP_SIZE_ENV} to one that does" + (f", e.g. {fit}" if fit else ""))
        # the checkpoint's weight as vLLM loads it; quantized in process_weights_after_loading
        UnquantizedLinearMethod().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                                                 output_size, params_dtype, **extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        codes = TQLinear.from_weight(layer.weight.data, None, self.settings.bits, self.settings.group_size)
        del layer.weight
        layer.register_buffer("tq_packed", codes.packed, persistent=False)
        layer.register_buffer("tq_norms", codes.norms, persistent=False)
        prepare_codes_linear(weight_quantizer(self.settings.group_size, self.settings.bits), codes.packed.device)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = codes_linear_op(x, layer.tq_packed, layer.tq_norms, self.settings.bits, self.settings.group_size, 0)
        return out if bias is None else out + bias
