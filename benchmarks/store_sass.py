"""The compress-store kernel's sm_90 machine code (`store._compress_store_kernel`), compiled on the CPU (no
GPU needed): registers, local-memory (spill) instructions and all instructions, for 16- and 64-row tiles
rotated in one block of dots or in 64-column blocks, by a Hadamard rotation's sign matrix (one dot) or a
dense rotation's three 16-bit parts (`codec.sign_form`). It backs `store.ONE_BLOCK_MAX_TOKENS`: one block
fits a decode step's 16-row tiles, and fills every register of a prefill's 64-row ones.

    python benchmarks/store_sass.py [--out benchmarks/results/store-sass.json]

Run it without TRITON_INTERPRET. The GPU host runs Triton 3.6.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemv_sass import print_and_save, resource_summary  # noqa: E402
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.kernels.codec import KernelCodec, PackedBits  # noqa: E402
from turboquant.kernels.launch import head_dim_pad, page_constants  # noqa: E402
from turboquant.kernels.store import _compress_store_kernel  # noqa: E402

POINTERS = dict(keys_ptr="*bf16", values_ptr="*bf16", rotation_ptr="*bf16", queries_ptr="*bf16",
                slot_mapping_ptr="*i64", cache_ptr="*u8", rotated_queries_ptr="*fp32", key_centroids_ptr="*fp32",
                key_boundaries_ptr="*fp32", value_centroids_ptr="*fp32", value_boundaries_ptr="*fp32",
                entries_ptr="*i32", ring_keys_ptr="*fp16", ring_values_ptr="*fp16", ring_key_norms_ptr="*fp32",
                ring_value_norms_ptr="*fp32", slot_of_entry_ptr="*i64",
                entry_of_slot_ptr="*i32")
PART_SCALE_BF16 = 256.0  # codec.PART_SCALES[torch.bfloat16]


def compile_store(head_dim: int, bits: int, rows: int, columns: int, rotation: str) -> dict:
    config = TurboQuantConfig(key_bits=bits, value_bits=bits, rotation="hadamard" if rotation == "signs" else "qr")
    codec = KernelCodec.from_config(config, head_dim, 8, 16)
    packed = PackedBits.of(bits)
    names = list(_compress_store_kernel.arg_names)
    constants = page_constants(codec.layout) | dict(
        GROUP=4, NORM_CORRECTION=True, ROWS=rows, PART_SCALE=PART_SCALE_BF16, SIGN_SCALE=codec.rotation_sign_scale,
        KEY_COORDS=packed.coords, KEY_GROUP_BYTES=packed.group_bytes, VALUE_COORDS=packed.coords,
        VALUE_GROUP_BYTES=packed.group_bytes, COLUMNS=columns, LAUNCH_DEPENDENTS=False, RING=False)
    pointers = POINTERS | (dict(rotation_ptr="*i8") if rotation == "signs" else {})
    signature = {name: pointers.get(name, "constexpr" if name in constants else "i32") for name in names}
    constants = {name: constants[name] for name in names if name in constants}
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in POINTERS}
    kernel = triton.compile(ASTSource(_compress_store_kernel, signature, constants, aligned),
                            target=GPUTarget("cuda", 90, 64), options=dict(num_warps=4))
    return ({"head_dim": head_dim, "bits": bits, "rows": rows, "columns": columns, "rotation": rotation}
            | resource_summary(kernel))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    print_and_save([compile_store(head_dim, bits, tile_rows, columns, rotation)
                    for head_dim, bits, rotations in ((128, 4, ("signs", "dense")), (128, 3, ("signs", "dense")),
                                                      (128, 8, ("signs", "dense")), (96, 2, ("dense",)))
                    for rotation in rotations for tile_rows in (16, 64) for columns in (64, head_dim_pad(head_dim))],
                   args.out)


if __name__ == "__main__":
    main()
