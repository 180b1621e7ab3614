"""Seeded random orthogonal transforms applied to the last dimension.

The rotation makes every coordinate of a unit vector follow the same known law, whatever the input
(paper, Section 3.1). Two kinds:
- "hadamard": y = H · diag(s) · x / √d with random signs s and the Walsh–Hadamard matrix H, applied
  by the fast transform in O(d log d); d must be a power of two.
- "qr": a Haar-random dense orthogonal matrix (QR of a Gaussian matrix, signs fixed), for any d.
Both are drawn on the CPU from a seeded generator, so the same seed gives the same rotation on
every device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

ROTATION_KINDS = ("auto", "hadamard", "qr")


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def resolve_rotation_kind(kind: str, dim: int) -> str:
    if kind not in ROTATION_KINDS:
        raise ValueError(f"rotation must be one of {ROTATION_KINDS}, got {kind!r}")
    if kind == "auto":
        return "hadamard" if is_power_of_two(dim) else "qr"
    if kind == "hadamard" and not is_power_of_two(dim):
        raise ValueError(f"rotation='hadamard' needs a power-of-two head_dim, got {dim}; use 'qr' or 'auto'")
    return kind


def fast_walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform (Sylvester order) of the last dimension."""
    dim = x.shape[-1]
    lead = x.shape[:-1]
    half = 1
    while half < dim:
        pairs = x.reshape(*lead, dim // (2 * half), 2, half)
        x = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
        half *= 2
    return x.reshape(*lead, dim)


@dataclass(frozen=True, eq=False)
class Rotation:
    """An orthogonal map R of R^dim; `apply` computes x Rᵀ (row vectors), `inverse` x R."""

    kind: str
    dim: int
    seed: int
    signs: torch.Tensor | None  # [dim] ±1, for "hadamard"
    dense: torch.Tensor | None  # [dim, dim], for "qr"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return x @ self.dense.to(x.device, x.dtype).T
        return fast_walsh_hadamard(x * self.signs.to(x.device, x.dtype)) * self.dim**-0.5

    def to(self, device: torch.device | str) -> "Rotation":
        """The same rotation with its tensors on `device`: applying it there then copies nothing."""
        return replace(self, signs=None if self.signs is None else self.signs.to(device),
                       dense=None if self.dense is None else self.dense.to(device))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return y @ self.dense.to(y.device, y.dtype)
        # H is symmetric and H·H = d·I, so R⁻¹ = diag(s) · H / √d.
        return fast_walsh_hadamard(y) * self.dim**-0.5 * self.signs.to(y.device, y.dtype)

    def matrix(self) -> torch.Tensor:
        """R as a dense float32 [dim, dim] matrix (row i is the i-th rotated coordinate), for kernels."""
        device = (self.dense if self.dense is not None else self.signs).device
        return self.apply(torch.eye(self.dim, dtype=torch.float64, device=device)).T.contiguous().float()


@functools.lru_cache(maxsize=256)
def make_rotation(dim: int, seed: int, kind: str = "auto") -> Rotation:
    kind = resolve_rotation_kind(kind, dim)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "hadamard":
        signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int64) * 2 - 1
        return Rotation(kind, dim, seed, signs.float(), None)
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # Multiplying column j by sign(r_jj) makes the distribution exactly Haar (Mezzadri 2007).
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return Rotation(kind, dim, seed, None, q.float().contiguous())
