"""`quantize_model`: swap every `nn.Linear` of a model (but the output head) for a `TQLinear`."""

from __future__ import annotations

import math

from torch import nn
from tqdm import tqdm

from .linear import TQLinear, weight_quantizer

# The output head (often tied to the embedding) stays in the model's dtype, like the embeddings.
KEEP = ("lm_head",)


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128, keep: tuple[str, ...] = KEEP,
                   progress: bool = True) -> nn.Module:
    """Quantize in place and return `model`. Raises before changing anything on a bad argument."""
    weight_quantizer(group_size, bits)  # validates bits and group_size
    if any(isinstance(m, TQLinear) for m in model.modules()):
        raise ValueError("the model is already quantized (it has TQLinear layers)")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(name == k or name.endswith("." + k) for k in keep)]
    wrong = [f"{name} (in_features {m.in_features})" for name, m in targets if m.in_features % group_size]
    if wrong:
        width = math.gcd(*(m.in_features for _, m in targets))
        fits = [g for g in (128, 64, 32, 16) if width % g == 0]
        hint = f"group_size {fits[0]} divides every width" if fits else "no group size of 16-128 divides every width"
        raise ValueError(f"group_size {group_size} does not divide in_features of {len(wrong)} layers, e.g. "
                         f"{wrong[0]}; {hint}")
    for name, linear in tqdm(targets, desc=f"TQ{bits} g{group_size}", disable=not progress):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, TQLinear.from_linear(linear, bits, group_size))
    return model
