"""The Hopper extend kernel's sm_90 machine code (`turboquant/kernels/extend_hopper.py`), compiled on the CPU
(no GPU needed) at each program shape it serves, as `extend_hopper.launch` would launch it
(`extend_hopper.program_shape`): shared memory, registers and local-memory (spill) instructions, to check a
change of tiles, ring stages or register counts before spending GPU time on it.

    python benchmarks/extend_sass.py [--shapes 64x64,64x128,128x64,128x128,256x64] [--sass-dir DIR]

A shape is HEAD_DIMxROWS (query rows per program: 64 per consumer warpgroup). Each compiles twice: unsplit
with no options (16-bit output un-rotated in the kernel where it can be), and split with soft-capping, a
window and key starts (the most registers). k4v4, GQA group 4, page size 16. Run it without
TRITON_INTERPRET. The GPU host runs Triton 3.6; other releases allocate registers differently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemv_sass import disassemble, opcode_counts  # noqa: E402
from kernels import parse_cells  # noqa: E402
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.kernels import extend_hopper  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402
from turboquant.kernels.launch import page_constants  # noqa: E402

SHAPES = "64x64,64x128,128x64,128x128,256x64"
POINTERS = dict(query_ptr="*fp16", keys_ptr="*fp16", values_ptr="*fp16", cache_ptr="*u8", tables_ptr="*i32",
                block_table_ptr="*i32", seq_lens_ptr="*i32", query_start_ptr="*i32", key_starts_ptr="*i32",
                signs_ptr="*i8", lse_ptr="*fp32")
SCALARS = dict(stride_query_token="i32", stride_query_head="i32", stride_kv_token="i32", stride_kv_head="i32",
               stride_out_token="i32", stride_out_head="i32", stride_table_seq="i32", scale="fp32", softcap="fp32",
               sliding_window="i32", num_splits="i32")
# as torch allocates them, and strides that are multiples of head_dim, which Triton specializes at launch
ALIGNED = ("query_ptr", "keys_ptr", "values_ptr", "cache_ptr", "tables_ptr", "out_ptr", "lse_ptr",
           "stride_query_token", "stride_query_head", "stride_kv_token", "stride_kv_head")
SHARED_MEMORY_LIMIT = 232448  # bytes a program may take on sm_90 (227 KB)


def compile_extend_kernel(head_dim: int, rows: int, split: bool, options: bool):
    """`_extend_hopper_kernel` for sm_90 as `launch` would run it for `rows` query rows; `options`: soft-capping,
    a window and key starts on."""
    from triton.experimental.gluon._runtime import GluonASTSource

    codec = KernelCodec.from_config(TurboQuantConfig(key_bits=4, value_bits=4), head_dim, 8, 16)
    unrotate = not split and extend_hopper.unrotates(codec, 1, torch.bfloat16)
    shape = extend_hopper.program_shape(codec, rows)
    launch_options = {key: shape.pop(key) for key in ("num_warps", "maxnreg")}
    constants = shape | page_constants(codec.layout) | dict(
        GROUP=4, GROUP_PAD=4, VALUE_LUT=codec.value_scaled_lut_asm, USE_SOFTCAP=options, USE_WINDOW=options,
        USE_STARTS=options, RETURN_LSE=False, SPLIT=split, UNROTATE=unrotate,
        SIGN_SCALE=codec.rotation_sign_scale if unrotate else 0.0)
    kernel = extend_hopper._extend_hopper_kernel
    names = list(kernel.arg_names)
    pointers = POINTERS | dict(out_ptr="*bf16" if unrotate else "*fp32")
    signature = {name: (pointers | SCALARS).get(name, "constexpr") for name in names}
    constants = {name: constants[name] for name in names if name in constants}  # in the kernel's order
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in ALIGNED}
    source = GluonASTSource(kernel, signature, constants, aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 64), options=launch_options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=SHAPES, help="HEAD_DIMxROWS items, comma-separated (default: %(default)s)")
    parser.add_argument("--sass-dir", help="also write each disassembly into this folder")
    args = parser.parse_args()
    try:
        shapes = parse_cells(args.shapes, 2)
    except ValueError:
        parser.error("--shapes takes HEAD_DIMxROWS items")
    for head_dim, rows in shapes:
        if not extend_hopper.shape_served(head_dim, rows):
            parser.error(f"the kernel does not serve {head_dim}x{rows} (extend_hopper.serves)")
        for split, options in ((False, False), (True, True)):
            compiled = compile_extend_kernel(head_dim, rows, split, options)
            sass, _ = disassemble(compiled.asm["cubin"])
            if args.sass_dir:
                Path(args.sass_dir, f"extend-{head_dim}x{rows}-{'split' if split else 'plain'}.sass").write_text(sass)
            opcodes = opcode_counts(sass)
            print(json.dumps({
                "triton": triton.__version__, "head_dim": head_dim, "rows": rows, "split_and_options": split,
                "shared_memory": compiled.metadata.shared, "fits": compiled.metadata.shared <= SHARED_MEMORY_LIMIT,
                "local_memory_instructions": sum(n for op, n in opcodes.items() if op.startswith(("LDL", "STL"))),
            }), flush=True)


if __name__ == "__main__":
    main()
