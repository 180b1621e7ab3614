"""`TQLinear`: a Linear layer whose weight is stored as TurboQuant codes, group by group along each row.

weight [out, in] → groups [out, in / group_size, group_size]; per group: the fp16 norm (with norm
correction, ‖w‖/‖ŵ‖) and packed b-bit indices of R·w/‖w‖. Because R is orthogonal,
W·x = Σ_g norm_g · levels(idx_g) · (R·x_g), so a GEMV kernel can rotate the input once per group instead
of un-rotating the weight. This PyTorch path dequantizes the weight: it is the reference (and slow).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..core import MSEQuantizer, make_rotation, packed_bytes

WEIGHT_BITS = (2, 3, 4)


@functools.lru_cache(maxsize=None)
def weight_quantizer(group_size: int, bits: int, seed: int = 0) -> MSEQuantizer:
    """One quantizer (rotation + codebook) per shape, shared by every layer: a dense QR rotation is
    not rebuilt for each of a model's hundreds of Linear layers."""
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
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, seed,
                     device=weight.device, dtype=weight.dtype)
        groups = weight.float().view(linear.out_features, -1, group_size)
        packed, norms = module.quantizer.quantize_packed(groups)
        module.packed.copy_(packed)
        module.norms.copy_(norms.to(torch.float16))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] float32 that this layer multiplies by."""
        groups = self.quantizer.dequantize_packed(self.packed, self.norms.float())
        return groups.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize().to(x.dtype)
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
