"""The fragment decode kernel's sm_90 machine code (`turboquant/kernels/decode_fragments.py`), compiled on
the CPU (no GPU needed): registers, instructions per loop step (16 tokens of one warp) and shared-memory
instructions, to compare code changes before spending GPU time on them.

    python benchmarks/decode_sass.py [--head-dim 128] [--sass FILE]

Compiles `_fragment_split_kernel` as `decode_fragments.launch_split` would (k4v4, GQA group 4, page size
16, window, softcap and key starts on) with the installed Triton, which also checks that every layout
conversion in the kernel moves no data (`convert_layout(..., assert_trivial=True)`). Run it without
TRITON_INTERPRET: the interpreter's library functions cannot be compiled. The GPU host runs Triton 3.6.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemv_sass import SHARED_MEMORY, disassemble, loop_counts, opcode_counts  # noqa: E402
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.kernels import decode_fragments  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402
from turboquant.kernels.launch import page_constants  # noqa: E402

POINTERS = dict(query_ptr="*fp32", cache_ptr="*u8", tables_ptr="*i32", block_table_ptr="*i32", seq_lens_ptr="*i32",
                key_starts_ptr="*i32", partial_out_ptr="*fp32", partial_lse_ptr="*fp32")
SCALARS = dict(stride_query_seq="i32", stride_query_head="i32", stride_table_seq="i32", scale="fp32", softcap="fp32",
               sliding_window="i32", min_split="i32", min_span="i32")
# as torch allocates them, and the query's strides, multiples of head_dim (64, 128 or 256), which Triton
# specializes as multiples of 16 at launch (16-byte query loads)
ALIGNED = ("query_ptr", "cache_ptr", "tables_ptr", "partial_out_ptr", "partial_lse_ptr", "stride_query_seq",
           "stride_query_head")


def compile_fragment_kernel(head_dim: int, kernel=None, pointers: dict | None = None):
    """`kernel` (decode_fragments' own by default; `decode_timeline.py` passes its stamped copy) for sm_90,
    `pointers` the types of any pointer arguments it adds."""
    from triton.experimental.gluon._runtime import GluonASTSource

    codec = KernelCodec.from_config(TurboQuantConfig(key_bits=4, value_bits=4), head_dim, 8, 16)
    pages = page_constants(codec.layout)
    constants = pages | dict(GROUP=4, NUM_SPLITS=8, KEY_LEVEL_SCALE=codec.key_byte_scale,
                             VALUE_LUT=codec.value_pairs_lut_asm, USE_SOFTCAP=True, USE_WINDOW=True, USE_STARTS=True,
                             AFTER_SPLIT=False)
    kernel = kernel or decode_fragments._fragment_split_kernel
    names = list(kernel.arg_names)
    signature = {name: (POINTERS | (pointers or {}) | SCALARS).get(name, "constexpr") for name in names}
    constants = {name: constants[name] for name in names if name in constants}  # in the kernel's order
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in ALIGNED}
    source = GluonASTSource(kernel, signature, constants, aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dim", type=int, choices=decode_fragments.HEAD_DIMS, default=128)
    parser.add_argument("--sass", help="also write the disassembly here")
    args = parser.parse_args()
    sass, usage = disassemble(compile_fragment_kernel(args.head_dim).asm["cubin"])
    if args.sass:
        Path(args.sass).write_text(sass)
    loop = loop_counts(sass)
    every = opcode_counts(sass)
    registers = re.search(r"REG:(\d+)", usage)
    print(json.dumps({
        "triton": triton.__version__, "head_dim": args.head_dim,
        "registers": int(registers.group(1)) if registers else None,
        "loop_instructions": sum(loop.values()),
        "loop_mma": sum(n for op, n in loop.items() if op.split(".")[0] in ("HMMA", "IMMA")),
        "loop_shared_memory": {op: n for op, n in sorted(loop.items()) if op.split(".")[0] in SHARED_MEMORY},
        "kernel_shared_memory": {op: n for op, n in sorted(every.items()) if op.split(".")[0] in SHARED_MEMORY},
        "loop_top": dict(loop.most_common(12)),
    }, indent=1))


if __name__ == "__main__":
    main()
