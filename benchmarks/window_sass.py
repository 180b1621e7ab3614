"""The exact window kernel's sm_90 machine code (`exact_ring._exact_window_kernel`), compiled on the CPU (no
GPU needed): registers, local-memory (spill) instructions and all instructions, with its 4 sinks in one
tile of 16 rows and its latest 32 tokens in tiles of 32 or 16 rows, for the shapes `ring_cost.py` times. The
kernel shares the GPU with the split kernels (`decode.WINDOW_STREAM_MIN_PAIRS`), so what a program holds
matters beyond its own time.

    python benchmarks/window_sass.py [--out benchmarks/results/window-sass.json]

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
from turboquant.kernels.codec import KernelCodec  # noqa: E402
from turboquant.kernels.exact_ring import _exact_window_kernel, window_launch, window_tile_rows  # noqa: E402
from turboquant.kernels.launch import page_constants  # noqa: E402

POINTERS = dict(query_ptr="*fp32", cache_ptr="*u8", block_table_ptr="*i32", seq_lens_ptr="*i32",
                ring_keys_ptr="*fp16", ring_values_ptr="*fp16", ring_key_norms_ptr="*fp32",
                ring_value_norms_ptr="*fp32", slot_of_entry_ptr="*i64", entry_of_slot_ptr="*i32",
                key_centroids_ptr="*fp16", value_centroids_ptr="*fp16", out_ptr="*fp32", lse_ptr="*fp32")
SCALARS = dict(stride_query_seq="i32", stride_query_head="i32", stride_table_seq="i32", scale="fp32", softcap="fp32")
# (head_dim, bits, kv heads, q heads per kv head), as ring_cost.py's shapes
SHAPES = [(128, 4, 8, 4), (128, 3, 8, 4), (64, 4, 3, 3), (256, 3, 4, 2)]


def compile_window(head_dim: int, bits: int, num_kv_heads: int, group: int, tile: int) -> dict:
    codec = KernelCodec.from_config(TurboQuantConfig(key_bits=bits, value_bits=bits), head_dim, num_kv_heads, 16)
    names = list(_exact_window_kernel.arg_names)
    launch = window_launch(head_dim)
    # the byte-permute lookups, as on an H100/H200 (`launch.lookup_constants`)
    constants = page_constants(codec.layout) | dict(
        GROUP=group, GROUP_PAD=16, KEY_LUT=codec.key_lut_asm, VALUE_LUT=codec.value_lut_asm, SINKS=4, RECENT=32,
        SINK_TILE=window_tile_rows(4, head_dim), RECENT_TILE=tile, USE_SOFTCAP=False, PARTS=launch.pop("PARTS"))
    signature = {name: (POINTERS | SCALARS).get(name, "constexpr") for name in names}
    constants = {name: constants[name] for name in names if name in constants}
    kernel = triton.compile(ASTSource(_exact_window_kernel, signature, constants),
                            target=GPUTarget("cuda", 90, 64), options=launch)
    return ({"head_dim": head_dim, "bits": bits, "recent_tile": tile,
             "default_tile": tile == window_tile_rows(32, head_dim)}
            | resource_summary(kernel))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    print_and_save([compile_window(*shape, tile) for shape in SHAPES for tile in (32, 16)], args.out)


if __name__ == "__main__":
    main()
