"""What the vLLM plugin stores, read from vLLM's `additional_config` (no vLLM import: CPU-testable).

    vllm serve MODEL --attention-backend CUSTOM                                   # k4v4, the default
    vllm serve MODEL --attention-backend CUSTOM --additional-config '{"turboquant": "k3v3"}'
    vllm serve MODEL --attention-backend CUSTOM \
        --additional-config '{"turboquant": {"preset": "k3v3", "boundary_layers": 1}}'

`additional_config` is vLLM's per-engine dictionary for plugins: it travels to every worker and is part
of vLLM's compile-cache hash. Inside vLLM the cache holds every token compressed (paged blocks are
shared by prefix caching, so there is no per-request centering mean); the tokens of the chunk being
prefilled are attended to in full precision, and with `exact_sinks` / `exact_recent` decode steps read a
sequence's first and latest tokens exactly, from a ring beside the cache (`exact_tokens.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core import PRESETS, TurboQuantConfig
from ..kernels.codec import KERNEL_BITS, KERNEL_HEAD_DIMS

CONFIG_KEY = "turboquant"


@dataclass(frozen=True)
class VllmSettings:
    preset: str = "k4v4"
    # The first and last `boundary_layers` layers store `boundary_bits` codes. 0 here (the HF cache keeps
    # 1): in vLLM two 8-bit layers cost 5% of the KV tokens (3.56x → 3.76x bf16's at k4v4 on the 8B
    # shape) and bought no measurable fidelity (96.99% vs 96.94% agreement, vllm-fidelity-h100.md).
    boundary_layers: int = 0
    boundary_bits: int = 8
    seed: int = 0
    # Decode steps read each sequence's first `exact_sinks` and latest `exact_recent` tokens in the model's
    # dtype, from a ring beside the cache (`exact_tokens.py`; a PyTorch prototype, off by default).
    exact_sinks: int = 0
    exact_recent: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"turboquant preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("boundary_layers", "seed", "exact_sinks", "exact_recent"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"turboquant {name} must be a non-negative integer, got {value!r}")
        if self.boundary_bits not in KERNEL_BITS:
            raise ValueError(f"turboquant boundary_bits must be one of {KERNEL_BITS} in vLLM, got {self.boundary_bits!r}")

    @classmethod
    def from_additional_config(cls, additional_config) -> "VllmSettings":
        """Parse `additional_config["turboquant"]`: a preset name or a dict of this class's fields."""
        value = (additional_config or {}).get(CONFIG_KEY, {}) if isinstance(additional_config, dict) else {}
        if isinstance(value, str):
            value = {"preset": value}
        if not isinstance(value, dict):
            raise ValueError(f'additional_config["{CONFIG_KEY}"] must be a preset name or a dict, got {value!r}')
        accepted = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(value) - accepted)
        if unknown:
            raise ValueError(f'unknown key(s) {unknown} in additional_config["{CONFIG_KEY}"]; accepted: {sorted(accepted)}')
        return cls(**value)

    @property
    def exact_tokens(self) -> bool:
        return bool(self.exact_sinks or self.exact_recent)

    def layer_config(self, layer_idx: int, num_layers: int, head_dim: int) -> TurboQuantConfig:
        """The codec of one attention layer; raises ValueError for a head_dim the kernels do not serve."""
        if head_dim not in KERNEL_HEAD_DIMS:
            raise ValueError(f"turboquant serves head_dim {KERNEL_HEAD_DIMS} in vLLM, this model has {head_dim}")
        return self._config(layer_idx, num_layers)

    def latent_config(self, layer_idx: int, num_layers: int) -> TurboQuantConfig:
        """The codec of one MLA layer: its latent kv_c takes the key bits (any width that packs)."""
        return self._config(layer_idx, num_layers)

    def _config(self, layer_idx: int, num_layers: int) -> TurboQuantConfig:
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"layer index {layer_idx} is outside the model's {num_layers} layers")
        base = TurboQuantConfig.from_preset(
            self.preset, seed=self.seed, boundary_layers=self.boundary_layers, boundary_bits=self.boundary_bits,
            sink_tokens=0, residual_window=0, center_keys=False, center_values=False)
        return base.for_layer(layer_idx, num_layers)


# `vllm serve MODEL --quantization turboquant`: the weight codes' bits and group size, from the checkpoint's
# `quantization_config` when it has one, else from these environment variables (vLLM builds the method
# with no arguments for a bf16 checkpoint, and every worker process inherits the environment).
WEIGHT_BITS_ENV, WEIGHT_GROUP_SIZE_ENV = "TURBOQUANT_WEIGHT_BITS", "TURBOQUANT_WEIGHT_GROUP_SIZE"


@dataclass(frozen=True)
class WeightSettings:
    bits: int = 4
    group_size: int = 128

    def __post_init__(self) -> None:
        from ..weights.linear import weight_quantizer

        weight_quantizer(self.group_size, self.bits)  # raises ValueError on bits or a group size that cannot pack

    @classmethod
    def from_environment(cls, environ) -> "WeightSettings":
        values = {}
        for field, name in (("bits", WEIGHT_BITS_ENV), ("group_size", WEIGHT_GROUP_SIZE_ENV)):
            text = environ.get(name)
            if text is None:
                continue
            try:
                values[field] = int(text)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {text!r}") from None
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"turboquant weights ({WEIGHT_BITS_ENV}/{WEIGHT_GROUP_SIZE_ENV}): {error}") from None

    @classmethod
    def from_checkpoint(cls, quantization_config: dict) -> "WeightSettings":
        unknown = sorted(set(quantization_config) - {"quant_method", "bits", "group_size"})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in the checkpoint's turboquant quantization_config")
        return cls(**{k: v for k, v in quantization_config.items() if k != "quant_method"})
