"""The tensor-core weight kernel's sm_90 machine code, compiled on the CPU (no GPU needed): registers,
instructions per loop step and the shared-memory traffic of one tiling, to compare code changes before
spending GPU time on them.

    python benchmarks/gemv_sass.py --bits 3 [--rows 64 --step-groups 2 --warps 4 --batch-tile 32] [--sass FILE]

Compiles `_gemv_kernel` as a launch would (pointers 16-byte aligned, sizes divisible by 16, partial sums,
programmatic launch) with the installed Triton, disassembles it with the `cuobjdump` that Triton ships and
counts the loop body's instructions (between the loop's first instruction and its backward branch). The
GPU host runs Triton 3.6: counts from another version can differ.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from turboquant.kernels.lut_asm import code_levels_fp16, dequant_asm  # noqa: E402
from turboquant.weights import TQLinear  # noqa: E402
from turboquant.weights.gemv import _gemv_kernel, vector_codes  # noqa: E402

POINTERS = dict(x_ptr="*fp16", packed_ptr="*u8", norms_ptr="*fp16", centroids_ptr="*fp16", bias_ptr="*fp16",
                out_ptr="*fp32")
SIZES = dict(out_features="i32", groups="i32", batch="i32", groups_per_split="i32", stride_x_batch="i32")
SHARED_MEMORY = ("STS", "LDS", "LDSM", "STSM")


def compile_gemv(bits: int, rows: int, step_groups: int, warps: int, batch_tile: int, group_size: int = 128):
    layer = TQLinear.from_weight(torch.randn(rows, step_groups * group_size) * 0.02, None, bits, group_size)
    constants = dict(GROUP_SIZE=group_size, GROUP_BYTES=layer.packed.shape[-1], BITS=bits,
                     LUT=dequant_asm(code_levels_fp16(layer.quantizer.codebook.centroids)), ROWS=rows,
                     BATCH_TILE=batch_tile, STEP_GROUPS=step_groups, HAS_BIAS=False, PARTIAL=True,
                     WAIT_FOR_INPUT=True, LAUNCH_DEPENDENTS=True,
                     VECTOR_CODES=bits == 3 and vector_codes(rows, step_groups * group_size, warps))
    signature = {**POINTERS, **SIZES, **{name: "constexpr" for name in constants}}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(POINTERS) + len(SIZES))}
    source = ASTSource(_gemv_kernel, signature, constants, aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=warps, num_stages=1))


def disassemble(cubin: bytes) -> tuple[str, str]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return sass, usage


def _instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text) of every instruction in a cuobjdump listing."""
    return [(int(m.group(1), 16), m.group(2)) for m in
            (re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line) for line in sass.splitlines()) if m]


def opcode_counts(sass: str, start: int = 0, end: int | None = None) -> collections.Counter:
    """Opcodes (predicates dropped) of the instructions at addresses start..end, by default all of them."""
    counts = collections.Counter()
    for address, text in _instructions(sass):
        if start <= address and (end is None or address <= end):
            words = text.split()
            counts[words[1] if words[0].startswith("@") else words[0]] += 1
    return counts


LOCAL_MEMORY = ("LDL", "STL")


def resource_summary(kernel) -> dict:
    """A compiled kernel's registers a thread, local-memory (spill) instructions and instructions."""
    sass, usage = disassemble(kernel.asm["cubin"])
    counts = opcode_counts(sass)
    registers = re.search(r"REG:(\d+)", usage)
    return {"registers": int(registers.group(1)) if registers else None,
            "local_memory_instructions": sum(n for op, n in counts.items() if op.split(".")[0] in LOCAL_MEMORY),
            "instructions": sum(counts.values())}


def print_and_save(rows: list[dict], out: str | None) -> None:
    """Each row as a JSON line; with `out`, all of them as one JSON file (sm_90, this Triton)."""
    for row in rows:
        print(json.dumps(row), flush=True)
    if out:
        Path(out).write_text(json.dumps({"triton": triton.__version__, "target": "sm_90", "rows": rows}, indent=1)
                             + "\n")


def loop_counts(sass: str) -> collections.Counter:
    """Opcodes of the longest loop: from the target of the predicated backward branch that spans most, to
    the branch (an unconditional one jumps back from out-of-line code, such as a divergent shuffle's
    fallback, and closes no loop)."""
    loops = [(int(m.group(1), 16), address) for address, text in _instructions(sass)
             if (m := re.search(r"@!?U?P\d\s+BRA\s+0x([0-9a-f]+)", text)) and int(m.group(1), 16) < address]
    if not loops:
        raise SystemExit("no loop found in the kernel")
    return opcode_counts(sass, *max(loops, key=lambda loop: loop[1] - loop[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, choices=(2, 3, 4), default=3)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--step-groups", type=int, default=2)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--batch-tile", type=int, choices=(16, 32), default=32)
    parser.add_argument("--sass", help="also write the disassembly here")
    args = parser.parse_args()
    kernel = compile_gemv(args.bits, args.rows, args.step_groups, args.warps, args.batch_tile)
    sass, usage = disassemble(kernel.asm["cubin"])
    if args.sass:
        Path(args.sass).write_text(sass)
    loop = loop_counts(sass)
    registers = re.search(r"REG:(\d+)", usage)
    print(json.dumps({
        "triton": triton.__version__, "tiling": vars(args) | {"sass": None},
        "registers": int(registers.group(1)) if registers else None,
        "loop_instructions": sum(loop.values()),
        "loop_shared_memory": {op: n for op, n in sorted(loop.items()) if op.split(".")[0] in SHARED_MEMORY},
        "loop_top": dict(loop.most_common(12)),
    }, indent=1))


if __name__ == "__main__":
    main()
