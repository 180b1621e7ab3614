"""The Triton decode split kernel's sm_90 machine code (`turboquant/kernels/decode.py`), compiled on the CPU
(no GPU needed), in the variants `benchmarks/decode_variants.py` times: its orientation (TOKEN_ROWS) and its
byte-permute tables (in registers, or constants of the PTX). Per variant: registers, local-memory bytes
(spills), instructions in the token loop (one tile), its matrix-multiply instructions and barriers.

    python benchmarks/split_sass.py [--cases k4v4:128,k3v3:128,...] [--max-registers 96]
        [--out benchmarks/results/split-sass.json]

Compiled as `decode.launch_triton_split` launches it (GQA group 4, page size 16, 8 kv heads, key starts on,
launched after a store), with `decode.decode_launch`'s tile and warps for the case. Run it without
TRITON_INTERPRET; the GPU host runs Triton 3.6 (put that version first on PYTHONPATH to match it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemv_sass import disassemble, loop_counts  # noqa: E402
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.kernels import decode  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402
from turboquant.kernels.launch import page_constants  # noqa: E402
from turboquant.kernels.lut_asm import LUT_BITS  # noqa: E402

CASES = "k4v4:128,k4v4:256,k4v4:64,k3v3:128,k3v3:256,k4v3:128,k2v2:128,k8v4:128"
# (name, TOKEN_ROWS, table words as inputs), as in benchmarks/decode_variants.py
VARIANTS = (("token_rows", True, True), ("head_rows", False, True), ("token_rows_constant_tables", True, False),
            ("head_rows_constant_tables", False, False))
POINTERS = dict(query_ptr="*fp32", cache_ptr="*u8", block_table_ptr="*i32", seq_lens_ptr="*i32", key_starts_ptr="*i32",
                key_centroids_ptr="*fp16", value_centroids_ptr="*fp16", lut_tables_ptr="*i32", rotation_ptr="*fp32",
                partial_out_ptr="*fp32", partial_lse_ptr="*fp32")
SCALARS = dict(stride_query_seq="i32", stride_query_head="i32", stride_table_seq="i32", scale="fp32", softcap="fp32",
               sliding_window="i32", min_span="i32", max_span="i32")


def compile_split_kernel(codec: KernelCodec, token_rows: bool, table_inputs: bool, max_registers: int | None = None):
    layout = codec.layout

    def lut(role: str) -> str:
        if getattr(layout, f"{role}_bits") not in LUT_BITS:
            return ""
        return getattr(codec, f"{role}_table_lut_asm" if table_inputs else f"{role}_lut_asm")
    lookups = dict(KEY_LUT=lut("key"), VALUE_LUT=lut("value"))
    launch = decode.triton_split_launch(codec, lookups)
    constants = page_constants(layout) | lookups | dict(
        GROUP=4, GROUP_PAD=16, NUM_SPLITS=2, PARTIAL_SPLITS=2, USE_SOFTCAP=False, USE_WINDOW=False, USE_STARTS=True,
        TILE=launch["TILE"], REDUCTION_NEXT=False, READERS_NEXT=True, WAIT_FOR_QUERY=True, TOKEN_ROWS=token_rows,
        ROTATE_QUERY=False, PART_SCALE=0.0, SIGN_SCALE=0.0)
    kernel = decode._decode_split_kernel
    names = list(kernel.arg_names)
    signature = {name: (POINTERS | SCALARS).get(name, "constexpr") for name in names}
    constants = {name: constants[name] for name in names if name in constants}  # in the kernel's order
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in ("query_ptr", "cache_ptr")}
    source = ASTSource(kernel, signature, constants, aligned)
    options = dict(num_warps=launch["num_warps"], num_stages=launch["num_stages"])
    max_registers = max_registers or launch.get("maxnreg")  # Triton's register cap: the default's, or the given
    if max_registers is not None:
        options["maxnreg"] = max_registers
    return triton.compile(source, target=GPUTarget("cuda", 90, 64), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=CASES, help="PRESET:HEAD_DIM items (default: %(default)s)")
    parser.add_argument("--max-registers", type=int, help="compile with this register cap (Triton's maxnreg)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    rows = []
    for case in args.cases.split(","):
        preset, head_dim = case.split(":")
        codec = KernelCodec.from_config(TurboQuantConfig.from_preset(preset), int(head_dim), 8, 16)
        for name, token_rows, table_inputs in VARIANTS:
            kernel = compile_split_kernel(codec, token_rows, table_inputs, args.max_registers)
            sass, usage = disassemble(kernel.asm["cubin"])
            loop = loop_counts(sass)
            row = {"preset": preset, "head_dim": int(head_dim), "variant": name,
                   "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
                   "stack_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)),
                   "loop_instructions": sum(loop.values()),
                   "loop_mma": {op: n for op, n in sorted(loop.items()) if "MMA" in op},
                   "loop_barriers": loop.get("BAR.SYNC.DEFER_BLOCKING", 0)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"triton": triton.__version__, "target": "sm_90",
                                              "max_registers": args.max_registers, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
