"""The decode reduction's sm_90 machine code (`decode._decode_reduce_kernel`), compiled on the CPU (no GPU
needed): registers, local-memory (spill) instructions and all instructions, for the tilings
`paged_decode_attention` launches. It chose `decode.UNROTATE_MAX_HEAD_DIM`: un-rotating inside the
reduction spills at head_dim 256.

    python benchmarks/reduce_sass.py [--out benchmarks/results/reduce-sass.json] [--column-programs 4]
        [--lse-and-extra]

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
from turboquant.kernels.decode import _decode_reduce_kernel, reduce_constants  # noqa: E402

POINTERS = dict(partial_out_ptr="*fp32", partial_lse_ptr="*fp32", extra_out_ptr="*fp32", extra_lse_ptr="*fp32",
                rotation_ptr="*fp32", out_ptr="*bf16", lse_ptr="*fp32")
SCALARS = dict(num_rows="i32", stride_out_seq="i32", stride_out_head="i32")


def compile_reduction(head_dim: int, num_splits: int, unrotate: bool, column_programs: int = 1,
                      lse_and_extra: bool = False) -> dict:
    names = list(_decode_reduce_kernel.arg_names)
    constants = reduce_constants(num_splits, head_dim, unrotate, column_programs) | dict(
        HEADS=32, HEAD_DIM=head_dim, RETURN_LSE=lse_and_extra, CHAINED=False, EXTRA=int(lse_and_extra))
    signature = {name: (POINTERS | SCALARS).get(name, "constexpr") for name in names}
    constants = {name: constants[name] for name in names if name in constants}
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in POINTERS}
    kernel = triton.compile(ASTSource(_decode_reduce_kernel, signature, constants, aligned),
                            target=GPUTarget("cuda", 90, 64), options=dict(num_warps=4))
    return {"head_dim": head_dim, "splits": num_splits, "unrotate": unrotate} | resource_summary(kernel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--column-programs", type=int, default=1, help="programs per row block of the un-rotation")
    parser.add_argument("--lse-and-extra", action="store_true",
                        help="compile with the log-sum-exp output and the exact ring's extra split")
    args = parser.parse_args()
    print_and_save([compile_reduction(head_dim, splits, unrotate, args.column_programs, args.lse_and_extra)
                    for head_dim in (64, 128, 256)
                    for splits, unrotate in ((4, True), (16, True), (4, False), (16, False), (128, False))], args.out)


if __name__ == "__main__":
    main()
