"""Lloyd–Max codebooks for one coordinate of a uniformly random unit vector.

After a random rotation, each coordinate x of a unit vector in R^d has the density
    f_d(x) ∝ (1 - x²)^((d-3)/2),  x ∈ [-1, 1],
i.e. x = 2y - 1 with y ~ Beta(a, a), a = (d-1)/2 (paper, Lemma 1). The MSE-optimal scalar quantizer
for that density is found by Lloyd–Max iteration on its exact CDF and partial first moment (both
regularized incomplete beta functions), not on the Gaussian limit, which is off for d = 64.

Solving takes scipy and up to a second for 8 bits, so the common (dim, bits) pairs ship precomputed
in `codebooks.json` (written by `python -m turboquant.core.codebook`); others are solved once and
cached in memory.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

SUPPORTED_CODEBOOK_BITS = tuple(range(1, 9))
MIN_DIM = 16
# Head dims of real models; their codebooks ship in the table for every bit width.
TABLE_DIMS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256, 512)
TABLE_PATH = Path(__file__).with_name("codebooks.json")


@dataclass(frozen=True)
class Codebook:
    """Sorted reconstruction levels and the decision boundaries (midpoints) between them."""

    dim: int
    bits: int
    centroids: torch.Tensor  # [2**bits] float32, ascending, symmetric around 0
    boundaries: torch.Tensor  # [2**bits - 1] float32

    def quantize(self, values: torch.Tensor) -> torch.Tensor:
        """Index (uint8) of the nearest level for each element."""
        return torch.bucketize(values.contiguous(), self.boundaries.to(values.device, values.dtype)).to(torch.uint8)

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        return self.centroids.to(indices.device)[indices.int()]  # int32: half the memory of int64 indices

    def to(self, device: torch.device | str) -> "Codebook":
        return replace(self, centroids=self.centroids.to(device), boundaries=self.boundaries.to(device))

    def distortion(self) -> float:
        """Expected squared error ‖u - û‖² for a random unit vector u in R^dim (exact, not sampled)."""
        return _unit_vector_distortion(self.dim, self.centroids.double().tolist())


def byte_grid(codebook: Codebook) -> tuple[Codebook, float]:
    """(the codebook with each level moved to the nearest s · (L + 1/2), L an integer in −128..127, and
    boundaries at the new midpoints; s), for kernels that multiply levels as int8 (L ↔ −L − 1 is a bit
    flip, so a level's sign costs one XOR). s is the scale, among those that fit the largest level, whose
    grid lies closest to the levels: at 4 bits and d = 64..256 the levels move by at most 2.6e-3 of the
    largest and the distortion grows by 0.05–0.09% (the levels stay the centroids of their cells to first order)."""
    if 2 ** codebook.bits > 256:
        raise ValueError(f"a byte grid holds at most 256 levels, got {2 ** codebook.bits}")
    levels = codebook.centroids.double()
    magnitudes = levels[levels.numel() // 2:]
    if not torch.equal(levels, -levels.flip(0)):
        raise ValueError("a byte grid needs a codebook symmetric around 0")
    scales = magnitudes.max() / torch.linspace(96.0, 127.5, 31501, dtype=torch.float64)
    ranks = (magnitudes[None, :] / scales[:, None] - 0.5).round().clamp(0, 127)
    best = int(((ranks + 0.5) * scales[:, None] - magnitudes).abs().amax(dim=1).argmin())
    scale = float(scales[best])
    grid = (ranks[best] + 0.5) * scales[best]
    centroids = torch.cat([-grid.flip(0), grid])
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    return replace(codebook, centroids=centroids.float(), boundaries=boundaries.float()), scale


def validate_dim_bits(dim: int, bits: int) -> None:
    if not isinstance(dim, int) or dim < MIN_DIM:
        raise ValueError(f"head_dim must be an integer >= {MIN_DIM}, got {dim!r}")
    if bits not in SUPPORTED_CODEBOOK_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_CODEBOOK_BITS}, got {bits!r}")


@functools.lru_cache(maxsize=None)
def lloyd_max_codebook(dim: int, bits: int) -> Codebook:
    """The optimal codebook for (dim, bits): from the shipped table if present, else solved now."""
    validate_dim_bits(dim, bits)
    levels = _shipped_table().get(_table_key(dim, bits))
    if levels is None:
        levels = solve_lloyd_max(dim, bits)
    centroids = torch.tensor(levels, dtype=torch.float64)
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    return Codebook(dim, bits, centroids.float(), boundaries.float())


def _table_key(dim: int, bits: int) -> str:
    return f"d{dim}_b{bits}"


@functools.lru_cache(maxsize=1)
def _shipped_table() -> dict[str, list[float]]:
    if not TABLE_PATH.exists():
        return {}
    halves = json.loads(TABLE_PATH.read_text())
    # The table stores the positive half only; the codebook is symmetric.
    return {key: [-x for x in reversed(half)] + half for key, half in halves.items()}


def solve_lloyd_max(dim: int, bits: int, tol: float = 1e-8, max_iter: int = 200_000) -> list[float]:
    """Lloyd–Max iteration on the exact coordinate density; returns ascending levels (float64)."""
    import numpy as np
    from scipy.special import betainc, betaincinv

    validate_dim_bits(dim, bits)
    a = (dim - 1) / 2
    n = 2**bits

    def cdf_and_moment(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # P(X <= t) and E[X; X <= t] for X = 2Y - 1, Y ~ Beta(a, a); E[Y; Y <= u] = I_u(a+1, a) / 2.
        u = np.clip((t + 1) / 2, 0.0, 1.0)
        p = betainc(a, a, u)
        return p, betainc(a + 1, a, u) - p

    # Start from the high-resolution optimum (Panter–Dite: level density ∝ f^(1/3), again a symmetric
    # Beta law), which is close enough that Lloyd's slow linear convergence needs few steps.
    a_init = (dim - 3) / 6 + 1
    q = betaincinv(a_init, a_init, (np.arange(n) + 0.5) / n) * 2 - 1
    for _ in range(max_iter):
        edges = np.concatenate(([-1.0], (q[1:] + q[:-1]) / 2, [1.0]))
        p, m = cdf_and_moment(edges)
        new = np.diff(m) / np.maximum(np.diff(p), 1e-300)
        new = (new - new[::-1]) / 2  # exact symmetry, so rounding never drifts the levels
        if np.max(np.abs(new - q)) < tol * math.sqrt(1 / dim):
            q = new
            break
        q = new
    return q.tolist()


def _unit_vector_distortion(dim: int, levels: list[float]) -> float:
    import numpy as np
    from scipy.special import betainc

    a = (dim - 1) / 2
    q = np.asarray(levels)
    edges = np.concatenate(([-1.0], (q[1:] + q[:-1]) / 2, [1.0]))
    u = (edges + 1) / 2
    p = np.diff(betainc(a, a, u))
    m1 = np.diff(betainc(a + 1, a, u) - betainc(a, a, u))
    # E[X²; cell] from E[Y²; Y <= u] = I_u(a+2, a) (a+1) / (2(2a+1)).
    ey2 = betainc(a + 2, a, u) * (a + 1) / (2 * (2 * a + 1))
    ey1 = betainc(a + 1, a, u) / 2
    m2 = np.diff(4 * ey2 - 4 * ey1 + betainc(a, a, u))
    per_coordinate = np.sum(m2 - 2 * q * m1 + q**2 * p)
    return float(dim * per_coordinate)


def write_table(path: Path = TABLE_PATH) -> None:
    """Regenerate the shipped table (positive halves, 12 significant digits)."""
    table = {}
    for dim in TABLE_DIMS:
        for bits in SUPPORTED_CODEBOOK_BITS:
            levels = solve_lloyd_max(dim, bits)
            table[_table_key(dim, bits)] = [float(f"{x:.12g}") for x in levels[len(levels) // 2 :]]
    path.write_text(json.dumps(table, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    write_table()
    print(f"wrote {TABLE_PATH}")
