"""Seeded random orthogonal transforms applied to the last dimension.

The rotation makes every coordinate of a unit vector follow the same known law, whatever the input
(paper, Section 3.1). Two kinds:
- "hadamard": y = H · diag(s) · x / √d with random signs s and the Walsh–Hadamard matrix H; d must be
  a power of two.
- "qr": a Haar-random dense orthogonal matrix (QR of a Gaussian matrix, signs fixed), for any d.
Both are drawn on the CPU from a seeded generator, so the same seed gives the same rotation on
every device. Both are applied as one matmul by the stored matrix R: the fast O(d log d) Hadamard
transform, a dozen small ops, was 7–17x slower on a CPU at every size tried, most of all for the few
rows of a decode step (`benchmarks/rotation_cpu.py` → rotation-cpu.md).
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


def hadamard_matrix(dim: int) -> torch.Tensor:
    """The Walsh–Hadamard matrix of order `dim` (a power of two; Sylvester order), float64, entries ±1."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@dataclass(frozen=True, eq=False)
class Rotation:
    """An orthogonal map R of R^dim; `apply` computes x Rᵀ (row vectors), `inverse` x R."""

    kind: str
    dim: int
    seed: int
    dense: torch.Tensor  # R, float32 [dim, dim]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dense.to(x.device, x.dtype).T

    def to(self, device: torch.device | str) -> "Rotation":
        """The same rotation with R on `device`: applying it there then copies nothing."""
        return replace(self, dense=self.dense.to(device))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.dense.to(y.device, y.dtype)

    def matrix(self) -> torch.Tensor:
        """A copy of R, float32 [dim, dim] (row i is the i-th rotated coordinate), for kernels: rotations
        are shared (`make_rotation` caches them), so a caller never holds the shared tensor itself."""
        return self.dense.clone()


@functools.lru_cache(maxsize=256)
def make_rotation(dim: int, seed: int, kind: str = "auto") -> Rotation:
    kind = resolve_rotation_kind(kind, dim)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "hadamard":
        signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int64) * 2 - 1
        return Rotation(kind, dim, seed, (hadamard_matrix(dim) * signs * dim**-0.5).float().contiguous())
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # Multiplying column j by sign(r_jj) makes the distribution exactly Haar (Mezzadri 2007).
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return Rotation(kind, dim, seed, q.float().contiguous())
