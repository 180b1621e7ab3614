"""A CPU interpreter for the PTX of `lut_asm`'s lookups (mov, and, or, xor, not, shl, shr, mul.lo, lop3,
prmt on .b32, and the fp16 pair operations mul.rn.f16x2 and fma.rn.f16x2 of `scaled_dequant_asm`), so CI checks the
byte-permute lookups without a GPU. Every register holds a
torch int64 tensor of 32-bit values: one program run covers many input words at once."""

from __future__ import annotations

import re

import numpy
import torch

MASK = 0xFFFFFFFF


def _prmt(a: torch.Tensor, b: torch.Tensor, selector: torch.Tensor) -> torch.Tensor:
    """PTX prmt (default mode): result byte i is byte (nibble i of selector) & 7 of b:a, or with the
    nibble's bit 3 set, that byte's sign bit copied to all eight bits."""
    source = [(a >> (8 * k)) & 0xFF for k in range(4)] + [(b >> (8 * k)) & 0xFF for k in range(4)]
    stacked = torch.stack(source, dim=-1)
    out = torch.zeros_like(a)
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = torch.gather(stacked, -1, (nibble & 7).unsqueeze(-1)).squeeze(-1)
        byte = torch.where((nibble & 8) != 0, torch.where((byte & 0x80) != 0, 0xFF, 0), byte)
        out |= byte << (8 * i)
    return out


def _lop3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, table: int) -> torch.Tensor:
    """PTX lop3: bit j of the result is bit (4·a_j + 2·b_j + c_j) of the 8-bit table."""
    out = torch.zeros_like(a)
    for minterm in range(8):
        if table >> minterm & 1:
            out |= ((a if minterm & 4 else ~a) & (b if minterm & 2 else ~b) & (c if minterm & 1 else ~c)) & MASK
    return out


def _halves(word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A register's two fp16 halves as fp32 (low, high)."""
    low, high = (word & 0xFFFF).to(torch.int16), (word >> 16).to(torch.int16)  # wraps to the same 16 bits
    return low.view(torch.float16).float(), high.view(torch.float16).float()


def _mul_f16x2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two fp16 products rounded to nearest even: a product of fp16 values is exact in fp32, so one
    rounding to fp16 gives the instruction's result."""
    (a0, a1), (b0, b1) = _halves(a), _halves(b)
    bits = [(x * y).half().view(torch.int16).to(torch.int64) & 0xFFFF for x, y in ((a0, b0), (a1, b1))]
    return bits[0] | bits[1] << 16


def _fma_f16x2(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Two fp16 a·b + c rounded once to nearest even: exact in fp64 (a 22-bit product plus an fp16), then
    numpy's direct fp64 → fp16 rounding (torch's goes through fp32, which would round twice)."""
    out = []
    for x, y, z in zip(_halves(a), _halves(b), _halves(c)):
        exact = x.double().numpy() * y.double().numpy() + z.double().numpy()
        out.append(torch.from_numpy(exact.astype(numpy.float16)).view(torch.int16).to(torch.int64) & 0xFFFF)
    return out[0] | out[1] << 16


def run(ptx: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run `ptx` on `inputs` ({"$8": words}); returns every register, the 16-bit outputs of
    `mov.b32 {$i, $j}, t` included."""
    registers = {name: value.to(torch.int64) & MASK for name, value in inputs.items()}
    like = next(iter(registers.values()))

    def value(operand: str) -> torch.Tensor:
        operand = operand.strip()
        if operand in registers:
            return registers[operand]
        return torch.full_like(like, int(operand, 0) & MASK)

    for statement in ptx.replace("\n", " ").split(";"):
        statement = statement.strip().strip("{}").strip()
        if not statement or statement.startswith(".reg"):
            continue
        unpack = re.fullmatch(r"mov\.b32 \{(\S+), (\S+)\}, (\S+)", statement)
        if unpack:
            low, high, source = unpack.groups()
            registers[low], registers[high] = value(source) & 0xFFFF, value(source) >> 16
            continue
        pack = re.fullmatch(r"mov\.b32 (\S+), \{(\S+), ([^\s}]+)\}?", statement)  # the strip above may eat "}"
        if pack:
            dest, low, high = pack.groups()
            registers[dest] = (value(low) & 0xFFFF) | (value(high) & 0xFFFF) << 16
            continue
        opcode, operands = statement.split(None, 1)
        dest, *args = [operand.strip() for operand in operands.split(",")]
        x = [value(arg) for arg in args[:3]]
        if opcode == "mov.b32":
            result = x[0]
        elif opcode == "and.b32":
            result = x[0] & x[1]
        elif opcode == "or.b32":
            result = x[0] | x[1]
        elif opcode == "xor.b32":
            result = x[0] ^ x[1]
        elif opcode == "not.b32":
            result = ~x[0]
        elif opcode == "shl.b32":
            result = x[0] << x[1]
        elif opcode == "shr.b32":
            result = x[0] >> x[1]
        elif opcode == "mul.lo.u32":
            result = x[0] * x[1]
        elif opcode == "lop3.b32":
            result = _lop3(x[0], x[1], x[2], int(args[3], 0))
        elif opcode == "prmt.b32":
            result = _prmt(x[0], x[1], x[2])
        elif opcode == "mul.rn.f16x2":
            result = _mul_f16x2(x[0], x[1])
        elif opcode == "fma.rn.f16x2":
            result = _fma_f16x2(x[0], x[1], x[2])
        else:
            raise NotImplementedError(f"no interpreter for {opcode!r}")
        registers[dest] = result & MASK
    return registers
