"""The TurboQuant math: codebooks, rotations, quantizers, bit packing, config. Imports only torch
(and numpy/scipy, lazily, to solve codebooks that are not in the shipped table)."""

from .codebook import Codebook, byte_grid, lloyd_max_codebook
from .config import PRESETS, TurboQuantConfig, vector_bytes
from .packing import PACKABLE_BITS, code_order, pack_indices, packed_bytes, sign_magnitude, unpack_indices
from .quantizer import MSECode, MSEQuantizer, ProdCode, ProdQuantizer, check_vectors, qjl_correction
from .rotation import Rotation, make_rotation

__all__ = [
    "Codebook", "byte_grid", "lloyd_max_codebook", "PRESETS", "TurboQuantConfig", "vector_bytes", "PACKABLE_BITS",
    "code_order", "pack_indices", "packed_bytes", "sign_magnitude", "unpack_indices", "MSECode", "MSEQuantizer",
    "ProdCode", "ProdQuantizer", "check_vectors", "qjl_correction", "Rotation", "make_rotation",
]
