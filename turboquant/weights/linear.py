"""`TQLinear`: a Linear layer whose weight is stored as TurboQuant codes, group by group along each row.

weight [out, in] → groups [out, in / group_size, group_size]; per group: the fp16 norm (with norm
correction, ‖w‖/‖ŵ‖) and packed b-bit indices of R·w/‖w‖. Because R is orthogonal,
W·x = Σ_g norm_g · levels(idx_g) · (R·x_g), so a kernel can rotate the input once per group instead of
un-rotating the weight (`gemv.py`). `forward` runs it for decode-sized inputs on CUDA; otherwise it
computes the same product in PyTorch, in the rotated space (`rotated_linear`). The reference both are
tested against is the dequantized weight (`dequantize`); the kernel's fp16 operands round the product
differently (~1e-3 relative).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

from ..core import MSECode, MSEQuantizer, make_rotation, packed_bytes, unpack_indices

WEIGHT_BITS = (2, 3, 4)
# Inputs of at most this many rows (decode steps) read the codes in the kernel; a prefill's many rows
# dequantize the weight once for one cuBLAS matmul instead of re-reading the codes per tile of 32 rows.
KERNEL_MAX_ROWS = 64
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # the CPU-only install may lack it


def kernel_group_size(group_size: int) -> bool:
    """Whether the kernel tiles groups of this size: a power of two of at least 16 (a tensor-core tile)."""
    return group_size >= 16 and group_size & (group_size - 1) == 0


def largest_fitting_group_size(width: int) -> int | None:
    """The largest of the usual group sizes (128 down to 16) that divides `width`, for error hints."""
    return next((g for g in (128, 64, 32, 16) if width % g == 0), None)


def dequantize_codes(packed: torch.Tensor, norms: torch.Tensor, quantizer: MSEQuantizer) -> torch.Tensor:
    """The float32 weight [out, in] that `packed` [out, groups, bytes] codes and `norms` [out, groups] hold."""
    return quantizer.dequantize_packed(packed, norms.float()).reshape(norms.shape[0], -1)


def uses_kernel(x: torch.Tensor, in_features: int, group_size: int) -> bool:
    """Whether `codes_linear(x, ...)` runs the Triton kernel: a CUDA input of at most KERNEL_MAX_ROWS rows,
    a group size it tiles, and Triton installed."""
    return (TRITON_INSTALLED and x.is_cuda and x.numel() <= KERNEL_MAX_ROWS * in_features
            and kernel_group_size(group_size))


@functools.lru_cache(maxsize=None)
def quantizer_on(quantizer: MSEQuantizer, device: torch.device) -> MSEQuantizer:
    """`quantizer` with its rotation and codebook on `device`, built once per device."""
    return quantizer.to(device)


def prepare_codes_linear(quantizer: MSEQuantizer, device: torch.device) -> None:
    """Build what `codes_linear` keeps per device now, outside any CUDA-graph capture: a graph cannot
    capture the copy from the CPU that the first call on a device would make."""
    on_device = quantizer_on(quantizer, device)
    if TRITON_INSTALLED and device.type == "cuda":
        from .gemv import device_codec  # imports Triton

        device_codec(on_device, device)


def codes_linear(x: torch.Tensor, packed: torch.Tensor, norms: torch.Tensor, quantizer: MSEQuantizer,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ (+ bias) for the weight stored as `packed` [out, groups, bytes] codes and `norms` [out, groups]."""
    quantizer = quantizer_on(quantizer, packed.device)
    if uses_kernel(x, norms.shape[1] * quantizer.dim, quantizer.dim):
        from .gemv import codes_gemv  # imports Triton

        return codes_gemv(x, packed, norms, quantizer, bias)
    return rotated_linear(x, packed, norms, quantizer, bias)


def rotated_linear(x: torch.Tensor, packed: torch.Tensor, norms: torch.Tensor, quantizer: MSEQuantizer,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """`codes_linear` for many rows, in the rotated space: W·x = Σ_g (norm·levels)_g · (R·x_g), so the
    weight is looked up and scaled (float32, then x's dtype for the matmul) but never un-rotated: no
    transform over all of [out, in], one over the input's rows instead."""
    out_features, groups = norms.shape
    group_size = quantizer.dim
    rotated_x = quantizer.rotation.apply(x.reshape(*x.shape[:-1], groups, group_size).float())
    rotated_w = quantizer.dequantize_rotated(MSECode(unpack_indices(packed, quantizer.bits, group_size), norms.float()))
    return nn.functional.linear(rotated_x.to(x.dtype).flatten(-2), rotated_w.to(x.dtype).reshape(out_features, -1),
                                None if bias is None else bias.to(x.dtype))


def weight_quantizer(group_size: int, bits: int, seed: int = 0) -> MSEQuantizer:
    """One quantizer (rotation + codebook) per shape, shared by every layer: a dense QR rotation is
    not rebuilt for each of a model's hundreds of Linear layers, and what is kept per quantizer
    (`quantizer_on`, the GEMV's device codec) is built once. The cache key is the three values however
    they are passed: lru_cache alone would key `(64, 4)` and `(64, 4, 0)` apart."""
    return _shared_weight_quantizer(group_size, bits, seed)


@functools.lru_cache(maxsize=None)
def _shared_weight_quantizer(group_size: int, bits: int, seed: int) -> MSEQuantizer:
    if bits not in WEIGHT_BITS:
        raise ValueError(f"bits must be one of {WEIGHT_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or group_size < 16 or group_size * bits % 8:
        raise ValueError(f"group_size must be an integer >= 16 whose {bits}-bit codes fill whole bytes, got {group_size!r}")
    return MSEQuantizer(group_size, bits, make_rotation(group_size, seed), norm_correction=True)


class TQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int, seed: int = 0,
                 device=None, dtype=torch.bfloat16):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.seed = bits, group_size, seed
        self.quantizer = weight_quantizer(group_size, bits, seed)
        groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(out_features, groups, packed_bytes(group_size, bits),
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("norms", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, seed: int = 0) -> "TQLinear":
        if isinstance(linear, TQLinear) or not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(linear.weight.detach(), linear.bias, bits, group_size, seed)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int,
                    seed: int = 0) -> "TQLinear":
        """The layer whose codes quantize `weight` [out, in] (on its device), with `bias` copied."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, bits, group_size, seed,
                     device=weight.device, dtype=weight.dtype)
        packed, norms = module.quantizer.quantize_packed(weight.detach().float().view(out_features, -1, group_size))
        module.packed.copy_(packed)
        module.norms.copy_(norms.to(torch.float16))
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] float32 that this layer multiplies by."""
        return dequantize_codes(self.packed, self.norms, self.quantizer)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        return uses_kernel(x, self.in_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return codes_linear(x, self.packed, self.norms, self.quantizer, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
