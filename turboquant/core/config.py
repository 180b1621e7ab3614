"""`TurboQuantConfig`: what to store for keys and values, and what it costs per token.

Presets are data. "k8v4" stores keys as 8-bit Lloyd–Max indices of the rotated coordinates (one byte
each, like int8/fp8, but with the MSE-optimal levels for that coordinate law) and values at 4 bits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .codebook import MIN_DIM
from .packing import PACKABLE_BITS, packed_bytes
from .quantizer import PROD_BITS, MSEQuantizer, ProdQuantizer
from .rotation import ROTATION_KINDS, make_rotation, resolve_rotation_kind

QUANTIZER_KINDS = ("mse", "prod")
NORM_BYTES = 4  # one fp32 per vector (and one more for the residual norm of a prod code)
BASELINE_BYTES_PER_ELEMENT = 2  # bf16/fp16 cache

PRESETS: dict[str, dict] = {
    "k4v4": dict(key_bits=4, value_bits=4),
    "k4v3": dict(key_bits=4, value_bits=3),
    "k3v4": dict(key_bits=3, value_bits=4),
    "k3v3": dict(key_bits=3, value_bits=3),
    "k2v2": dict(key_bits=2, value_bits=2),
    "k8v4": dict(key_bits=8, value_bits=4),
}


def vector_bytes(dim: int, bits: int, kind: str) -> int:
    """Bytes one compressed vector of `dim` coordinates takes (packed indices + fp32 norms)."""
    if kind == "prod":
        return packed_bytes(dim, bits - 1) + packed_bytes(dim, 1) + 2 * NORM_BYTES
    return packed_bytes(dim, bits) + NORM_BYTES


@dataclass(frozen=True)
class TurboQuantConfig:
    key_bits: int = 4
    value_bits: int = 4
    key_quantizer: str = "mse"
    value_quantizer: str = "mse"
    norm_correction: bool = True
    rotation: str = "auto"
    seed: int = 0
    # Exact transforms (see `hf/cache.py`): subtract a per-channel mean shared by all tokens before
    # quantizing and add it back after; softmax is shift-invariant and Σp = 1, so kernels can fold it.
    center_keys: bool = True
    center_values: bool = True
    # Key channels with the largest spread (chosen per head from the first chunk) stay full precision;
    # the rest are TurboQuant-coded at head_dim − key_outlier_channels (paper, Section 4.3).
    key_outlier_channels: int = 0
    # Cache policy: the first `sink_tokens` and the latest `residual_window` tokens stay full precision;
    # `boundary_layers` first and last layers use `boundary_bits` (None = full precision). The default
    # (first and last layer at 8 bits) restored passkey parity on SmolLM2 at k4v4 (benchmarks/quality.py).
    sink_tokens: int = 4
    residual_window: int = 128
    boundary_layers: int = 1
    boundary_bits: int | None = 8

    def __post_init__(self) -> None:
        for role in ("key", "value"):
            kind, bits = getattr(self, f"{role}_quantizer"), getattr(self, f"{role}_bits")
            if kind not in QUANTIZER_KINDS:
                raise ValueError(f"{role}_quantizer must be one of {QUANTIZER_KINDS}, got {kind!r}")
            allowed = PROD_BITS if kind == "prod" else PACKABLE_BITS
            if bits not in allowed:
                raise ValueError(f"{role}_bits must be one of {allowed} for the {kind} quantizer, got {bits!r}")
        if self.rotation not in ROTATION_KINDS:
            raise ValueError(f"rotation must be one of {ROTATION_KINDS}, got {self.rotation!r}")
        for name in ("seed", "sink_tokens", "residual_window", "boundary_layers", "key_outlier_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.boundary_bits not in (None, *PACKABLE_BITS):
            raise ValueError(f"boundary_bits must be None (full precision) or one of {PACKABLE_BITS}, got {self.boundary_bits!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TurboQuantConfig":
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> "TurboQuantConfig":
        return dataclasses.replace(self, **changes)

    def check_head_dim(self, head_dim: int) -> None:
        if not isinstance(head_dim, int) or head_dim < MIN_DIM:
            raise ValueError(f"head_dim must be an integer >= {MIN_DIM}, got {head_dim!r}")
        resolve_rotation_kind(self.rotation, head_dim)
        self.bytes_per_token_per_head(head_dim)  # raises if the indices do not pack into whole bytes

    def for_layer(self, layer_idx: int, num_layers: int) -> "TurboQuantConfig | None":
        """The codec of one layer: self, a boundary-bits variant, or None (keep full precision)."""
        if not (layer_idx < self.boundary_layers or layer_idx >= num_layers - self.boundary_layers):
            return self
        if self.boundary_bits is None:
            return None
        return self.replace(key_bits=self.boundary_bits, value_bits=self.boundary_bits,
                            key_quantizer="mse", value_quantizer="mse")

    def key_bytes(self, head_dim: int) -> int:
        outliers = self.key_outlier_channels
        return vector_bytes(head_dim - outliers, self.key_bits, self.key_quantizer) + BASELINE_BYTES_PER_ELEMENT * outliers

    def value_bytes(self, head_dim: int) -> int:
        return vector_bytes(head_dim, self.value_bits, self.value_quantizer)

    def bytes_per_token_per_head(self, head_dim: int) -> int:
        """Compressed key + value bytes of one token in one KV head (k4v4, d=128: 68 + 68 = 136)."""
        return self.key_bytes(head_dim) + self.value_bytes(head_dim)

    def compression_ratio(self, head_dim: int) -> float:
        """bf16 K+V bytes over compressed bytes (k4v4, d=128: 512 / 136 = 3.76)."""
        return 2 * head_dim * BASELINE_BYTES_PER_ELEMENT / self.bytes_per_token_per_head(head_dim)

    def rotation_seed(self, layer_idx: int) -> int:
        return self.seed * 1_000_003 + layer_idx

    def make_quantizer(self, role: str, head_dim: int, layer_idx: int = 0) -> MSEQuantizer | ProdQuantizer:
        """The quantizer for keys (role="key") or values (role="value") of one layer."""
        if role not in ("key", "value"):
            raise ValueError(f"role must be 'key' or 'value', got {role!r}")
        if role == "key":
            head_dim -= self.key_outlier_channels  # those channels are stored as they are
        self.check_head_dim(head_dim)
        rotation = make_rotation(head_dim, self.rotation_seed(layer_idx), self.rotation)
        bits, kind = getattr(self, f"{role}_bits"), getattr(self, f"{role}_quantizer")
        if kind == "prod":
            qjl_seed = self.rotation_seed(layer_idx) + 500_009  # independent of the rotation's stream
            return ProdQuantizer(head_dim, bits, rotation, qjl_seed, self.norm_correction)
        return MSEQuantizer(head_dim, bits, rotation, self.norm_correction)
