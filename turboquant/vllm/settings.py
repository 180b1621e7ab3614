"""What the vLLM plugin stores, read from vLLM's `additional_config` (no vLLM import: CPU-testable).

    vllm serve MODEL --attention-backend CUSTOM                                   # k4v4, the default
    vllm serve MODEL --attention-backend CUSTOM --additional-config '{"turboquant": "k3v3"}'
    vllm serve MODEL --attention-backend CUSTOM \
        --additional-config '{"turboquant": {"preset": "k3v3", "boundary_layers": 1}}'
    vllm serve MODEL --attention-backend CUSTOM \
        --additional-config '{"turboquant": {"exact_sinks": 0, "exact_recent": 0}}'  # no exact tokens

`additional_config` is vLLM's per-engine dictionary for plugins: it travels to every worker and is part
of vLLM's compile-cache hash. Inside vLLM the cache holds every token compressed (paged blocks are
shared by prefix caching, so there is no per-request centering mean); the tokens of the chunk being
prefilled are attended to in full precision, and decode steps read each sequence's first 4 and latest 32
tokens exactly, from a ring beside the cache (`exact_sinks` / `exact_recent`; `exact_tokens.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core import PRESETS, TurboQuantConfig
from ..kernels.codec import KERNEL_BITS, KERNEL_HEAD_DIMS

CONFIG_KEY = "turboquant"
# Sinks and latest tokens each sequence's decode steps read exactly by default. On SmolLM2 (H200) they moved
# the greedy first divergence from 17.8 to 30.0 tokens (fp8: 24.0) and the agreement with bf16 from 96.93%
# to 97.45%; on the 8B shape their ring costs 1% of the KV tokens (vllm-fidelity-h200-exact.md,
# vllm-throughput-h200-exact.md).
DEFAULT_EXACT_TOKENS = (4, 32)


@dataclass(frozen=True)
class VllmSettings:
    preset: str = "k4v4"
    # The first and last `boundary_layers` layers store `boundary_bits` codes. 0 here (the HF cache keeps
    # 1): in vLLM two 8-bit layers cost 5% of the KV tokens (3.56x → 3.76x bf16's at k4v4 on the 8B
    # shape) and bought no measurable fidelity (96.99% vs 96.94% agreement, vllm-fidelity-h100.md).
    boundary_layers: int = 0
    boundary_bits: int = 8
    seed: int = 0
    # Decode steps read each sequence's first `exact_sinks` and latest `exact_recent` tokens uncompressed
    # (fp16 unit rows and fp32 norms), from a ring beside the cache (`exact_tokens.py`). None:
    # DEFAULT_EXACT_TOKENS' count, on the layers that can (`exact_counts`); 0 and 0 turn the ring off.
    exact_sinks: int | None = None
    exact_recent: int | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"turboquant preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("boundary_layers", "seed", "exact_sinks", "exact_recent"):
            value = getattr(self, name)
            if name.startswith("exact") and value is None:
                continue
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

    def exact_counts(self, unsupported: str | None = None) -> tuple[int, int]:
        """(sinks, recent) that a layer reads exactly. `unsupported` says why the layer cannot (None: it
        can): there the default turns itself off, and counts set in the config stop the engine."""
        if self.exact_sinks is None and self.exact_recent is None:
            return (0, 0) if unsupported else DEFAULT_EXACT_TOKENS
        counts = tuple(default if value is None else value
                       for value, default in zip((self.exact_sinks, self.exact_recent), DEFAULT_EXACT_TOKENS))
        if any(counts) and unsupported:
            raise ValueError(f"turboquant exact_sinks/exact_recent cannot be served {unsupported}; leave both "
                             "unset (the default turns itself off there) or set them to 0")
        return counts

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
