"""`quantize_model`: swap every `nn.Linear` of a model (but the output head) for a `TQLinear`.

Optional per-tensor bits from the weight's excess kurtosis (`heavy_tail=(to_4bit, to_keep)`): a
heavy-tailed tensor has outliers that a shared grid spends its levels on, so above `to_4bit` it gets 4
bits (when `bits` is lower) and above `to_keep` it stays unquantized. `HEAVY_TAIL` holds the documented
defaults; on SmolLM2-135M they move 3 of 210 tensors to 4 bits (kurtosis 13–23) and keep none.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from .linear import TQLinear, largest_fitting_group_size, weight_quantizer

# The output head (often tied to the embedding) stays in the model's dtype, like the embeddings.
KEEP = ("lm_head",)
# (to_4bit, to_keep) excess-kurtosis thresholds; a Gaussian has 0, most of SmolLM2's tensors 0.1–8.
HEAVY_TAIL = (10.0, 30.0)


def excess_kurtosis(weight: torch.Tensor) -> float:
    """E[z⁴] − 3 of the tensor's standardized entries (0 for a Gaussian)."""
    z = weight.detach().float().flatten()
    z = (z - z.mean()) / z.std().clamp_min(1e-12)
    return (z.pow(4).mean() - 3).item()


def tensor_bits(weight: torch.Tensor, bits: int, heavy_tail: tuple[float, float] | None) -> int | None:
    """Bits for one tensor under the kurtosis rule; None = keep it unquantized."""
    if heavy_tail is None:
        return bits
    to_4bit, to_keep = heavy_tail
    kurtosis = excess_kurtosis(weight)
    if kurtosis > to_keep:
        return None
    return max(bits, 4) if kurtosis > to_4bit else bits


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128, keep: tuple[str, ...] = KEEP,
                   progress: bool = True, heavy_tail: tuple[float, float] | None = None) -> nn.Module:
    """Quantize in place and return `model`. Raises before changing anything on a bad argument.
    `heavy_tail`: (to_4bit, to_keep) kurtosis thresholds, e.g. `HEAVY_TAIL`; None = every tensor at `bits`."""
    weight_quantizer(group_size, bits)  # validates bits and group_size
    if heavy_tail is not None and not (len(heavy_tail) == 2 and 0 <= heavy_tail[0] <= heavy_tail[1]):
        raise ValueError(f"heavy_tail must be (to_4bit, to_keep) with 0 <= to_4bit <= to_keep, got {heavy_tail!r}")
    if any(isinstance(m, TQLinear) for m in model.modules()):
        raise ValueError("the model is already quantized (it has TQLinear layers)")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(name == k or name.endswith("." + k) for k in keep)]
    wrong = [f"{name} (in_features {m.in_features})" for name, m in targets if m.in_features % group_size]
    if wrong:
        width = math.gcd(*(m.in_features for _, m in targets))
        fit = largest_fitting_group_size(width)
        hint = f"group_size {fit} divides every width" if fit else "no group size of 16-128 divides every width"
        raise ValueError(f"group_size {group_size} does not divide in_features of {len(wrong)} layers, e.g. "
                         f"{wrong[0]}; {hint}")
    for name, linear in tqdm(targets, desc=f"TQ{bits} g{group_size}", disable=not progress):
        chosen = tensor_bits(linear.weight, bits, heavy_tail)
        if chosen is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, TQLinear.from_linear(linear, chosen, group_size))
    return model
