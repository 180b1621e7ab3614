"""TurboQuant vector quantizers (paper, Algorithms 1 and 2).

MSE: x -> (‖x‖ in fp32, b-bit Lloyd–Max index of each coordinate of R·x/‖x‖). Norms stay fp32:
fp16 norms lose whole tokens past ~10K positions of large-norm keys.
Prod: (b−1)-bit MSE code plus a 1-bit QJL sketch sign(S·r) of the residual r and ‖r‖, which makes
⟨q, x⟩ unbiased. It pays only where the score is computed from the sketch; a dequantize-then-attend
path does better with all b bits in the MSE stage.

Codes live in the rotated space: attention rotates q once and never un-rotates keys.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .codebook import lloyd_max_codebook
from .packing import PACKABLE_BITS, pack_indices, unpack_indices
from .rotation import Rotation

PROD_BITS = tuple(b + 1 for b in PACKABLE_BITS if b + 1 <= 5)  # MSE stage must be packable: 2, 3, 4, 5


def check_vectors(x: torch.Tensor, dim: int, name: str = "x") -> None:
    """Raise ValueError unless x is a finite floating tensor [..., dim]."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape [..., {dim}], got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


@dataclass(frozen=True, eq=False)
class MSECode:
    indices: torch.Tensor  # [..., dim] uint8, codebook index of each rotated coordinate
    norms: torch.Tensor  # [...] float32, the length the unit reconstruction is scaled by


@dataclass(frozen=True, eq=False)
class ProdCode:
    mse: MSECode
    signs: torch.Tensor  # [..., dim] uint8 in {0, 1}: sign(S·r) > 0
    residual_norms: torch.Tensor  # [...] float32, ‖r‖


class MSEQuantizer:
    """b-bit TurboQuant_mse. With `norm_correction`, the stored norm is ‖x‖/‖û‖ so that the
    reconstruction keeps the exact length of x (one fp32 either way)."""

    def __init__(self, dim: int, bits: int, rotation: Rotation, norm_correction: bool = False):
        if bits not in PACKABLE_BITS:
            raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits!r}")
        if rotation.dim != dim:
            raise ValueError(f"rotation is for head_dim {rotation.dim}, not {dim}")
        self.dim, self.bits, self.rotation, self.norm_correction = dim, bits, rotation, norm_correction
        self.codebook = lloyd_max_codebook(dim, bits)

    def quantize(self, x: torch.Tensor, check: bool = True) -> MSECode:
        """`check=False` skips `check_vectors`, whose NaN scan waits for the device: for callers whose x
        they computed themselves, e.g. a cache storing the model's keys and values."""
        if check:
            check_vectors(x, self.dim)
        x = x.float()
        norms = torch.linalg.vector_norm(x, dim=-1)
        # A zero vector has no direction; any index works since its norm scales the result to 0.
        unit = x / norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        indices = self.codebook.quantize(self.rotation.apply(unit))
        return MSECode(indices, self.stored_norms(norms, indices))

    def stored_norms(self, norms: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The fp32 norm stored beside `indices` for vectors of length `norms`: the length itself, or with
        norm correction ‖x‖/‖û‖. Kernel tests check stored norms against it for the codes the kernel chose."""
        if not self.norm_correction:
            return norms
        recon_norms = torch.linalg.vector_norm(self.codebook.dequantize(indices), dim=-1)
        return norms / recon_norms.clamp_min(torch.finfo(torch.float32).tiny)

    def dequantize_rotated(self, code: MSECode) -> torch.Tensor:
        """[..., dim] float32 reconstruction in the rotated space (R·x̂)."""
        if code.indices.shape[:-1] != code.norms.shape or code.indices.shape[-1] != self.dim:
            raise ValueError(
                f"code shapes disagree: indices {tuple(code.indices.shape)}, norms {tuple(code.norms.shape)}"
            )
        return self.codebook.dequantize(code.indices) * code.norms.unsqueeze(-1)

    def dequantize(self, code: MSECode) -> torch.Tensor:
        return self.rotation.inverse(self.dequantize_rotated(code))

    def quantize_packed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., dim] -> (packed indices [..., dim·bits/8] uint8, norms [...] float32): the stored form."""
        code = self.quantize(x)
        return pack_indices(code.indices, self.bits), code.norms

    def dequantize_packed(self, packed: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        return self.dequantize(MSECode(unpack_indices(packed, self.bits, self.dim), norms))

    def to(self, device: torch.device | str) -> "MSEQuantizer":
        """The same quantizer with its rotation and codebook on `device`, so that (de)quantizing there copies
        nothing from the CPU (a CUDA graph cannot capture such a copy)."""
        moved = copy.copy(self)
        moved.rotation, moved.codebook = self.rotation.to(device), self.codebook.to(device)
        return moved


def make_qjl_matrix(dim: int, seed: int) -> torch.Tensor:
    """S ∈ R^{dim×dim} with i.i.d. N(0, 1) entries, drawn on the CPU so every device agrees."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(dim, dim, generator=generator, dtype=torch.float32)


def qjl_correction(projected_query: torch.Tensor, signs: torch.Tensor, residual_norms: torch.Tensor) -> torch.Tensor:
    """√(π/2)/m · ‖r‖ · ⟨S·q, sign(S·r)⟩, the unbiased estimate of ⟨q, r⟩ (paper, Lemma 4);
    m = number of sketch rows. projected_query = S·q [..., m], signs [..., m] in {0, 1}."""
    num_rows = signs.shape[-1]
    sign_values = signs.float() * 2 - 1
    return math.sqrt(math.pi / 2) / num_rows * residual_norms * (projected_query * sign_values).sum(-1)


class ProdQuantizer:
    """b-bit TurboQuant_prod: (b−1)-bit MSE stage + 1-bit QJL sketch of the residual."""

    def __init__(self, dim: int, bits: int, rotation: Rotation, qjl_seed: int, norm_correction: bool = False):
        if bits not in PROD_BITS:
            raise ValueError(f"bits must be one of {PROD_BITS} for the prod quantizer, got {bits!r}")
        self.dim, self.bits = dim, bits
        self.mse = MSEQuantizer(dim, bits - 1, rotation, norm_correction)
        self.qjl = make_qjl_matrix(dim, qjl_seed)

    def quantize(self, x: torch.Tensor) -> ProdCode:
        code = self.mse.quantize(x)
        residual = self.mse.rotation.apply(x.float()) - self.mse.dequantize_rotated(code)
        sketch = residual @ self.qjl.to(residual.device).T
        return ProdCode(code, (sketch > 0).to(torch.uint8), torch.linalg.vector_norm(residual, dim=-1))

    def dequantize(self, code: ProdCode) -> torch.Tensor:
        """Unbiased reconstruction x̂_mse + √(π/2)/d · ‖r‖ · Sᵀ sign(S·r) (high variance per vector)."""
        sign_values = code.signs.float() * 2 - 1
        sketch_part = sign_values @ self.qjl.to(sign_values.device)
        rotated = self.mse.dequantize_rotated(code.mse) + (
            math.sqrt(math.pi / 2) / self.dim * code.residual_norms.unsqueeze(-1) * sketch_part
        )
        return self.mse.rotation.inverse(rotated)

    def inner_product(self, query: torch.Tensor, code: ProdCode) -> torch.Tensor:
        """Unbiased ⟨query, x⟩ for query [..., dim] broadcast against the code's leading shape."""
        check_vectors(query, self.dim, "query")
        rotated_query = self.mse.rotation.apply(query.float())
        mse_part = (rotated_query * self.mse.dequantize_rotated(code.mse)).sum(-1)
        projected = rotated_query @ self.qjl.to(rotated_query.device).T
        return mse_part + qjl_correction(projected, code.signs, code.residual_norms)
