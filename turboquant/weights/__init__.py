"""Weight compression: each row of a Linear weight, in groups of `group_size` columns, stored as a
TurboQuant MSE code (the group's norm + b-bit Lloyd–Max indices of its rotated direction), the scalar
case of HIGGS. No calibration data. `quantize_model` swaps `nn.Linear` for `TQLinear`."""

from .linear import TQLinear
from .model import HEAVY_TAIL, quantize_model

__all__ = ["HEAVY_TAIL", "TQLinear", "quantize_model"]
