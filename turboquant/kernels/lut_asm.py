"""Codebook lookups by byte permutation (PTX `prmt`), built per codebook as an inline-asm string.

Decode and extend attention are bound by the instructions that turn packed codes into fp16 levels,
not by memory. A global-memory gather costs an address computation, a load and a 16-bit shared-memory
store per coordinate. `prmt` instead selects four bytes out of an 8-byte table held in two registers,
so one instruction looks up the low (or high) bytes of four levels: 8 fp16 levels cost 16 (3 bits)
or 15 (4 bits) integer instructions and no memory access.

- 3 bits: 8 levels, one table; the 24 bits of 8 codes are spread to one code per nibble.
- 4 bits: 16 levels, but the codebook is antisymmetric (c[15 − i] = −c[i]), so an 8-entry table of
  magnitudes plus a sign bit suffices: a code's top bit is its sign and its low three bits rank the
  magnitude (`core.packing.sign_magnitude`).

Levels here are indexed by stored code (`code_levels_fp16`), not by the codebook's ascending index.

`dot_asm` goes on from the looked-up levels to their dot product with eight input coordinates, for the
weight GEMV's FMA kernel. The strings are built once per codec (`KernelCodec`, the GEMV's `DeviceCodec`)
and are constants of the kernels (one specialization per codebook). The Triton interpreter cannot run
PTX, so on the CPU the kernels gather from the codebook instead.
"""

from __future__ import annotations

import os

import torch

from ..core import code_order

LUT_BITS = (3, 4)


def code_levels_fp16(levels: torch.Tensor) -> torch.Tensor:
    """Ascending levels of a symmetric law as fp16 on the CPU, made exactly antisymmetric (c[−i] = −c[i])
    so a 4-bit lookup can store magnitudes only, and indexed by stored code (`core.packing.code_order`):
    what kernels gather from and build their lookup tables of."""
    antisymmetric = ((levels - levels.flip(0)) / 2).half().cpu()
    return antisymmetric[code_order(levels.numel().bit_length() - 1)]


def _byte_tables(levels: torch.Tensor) -> tuple[int, int, int, int]:
    """8 fp16 levels → (low bytes of levels 0–3, of 4–7, high bytes of 0–3, of 4–7) as 32-bit words."""
    bits = levels.to(torch.float16).cpu().view(torch.int16).int() & 0xFFFF
    low, high = (bits & 0xFF).tolist(), (bits >> 8).tolist()
    word = lambda four: sum(byte << (8 * i) for i, byte in enumerate(four))  # noqa: E731
    return word(low[:4]), word(low[4:]), word(high[:4]), word(high[4:])


def _lookup_half(selector: str, sign: str | None, emit_pair, tables: tuple[str, str, str, str]) -> str:
    """Four levels selected by the nibbles of `selector`'s low 16 bits, as two fp16 pairs in register t
    (the lower level in the low half); `emit_pair(k)` is the PTX that uses pair k (levels 2k, 2k + 1)."""
    tl0, tl1, th0, th1 = tables
    flip = (f"not.b32 t, {sign};\nand.b32 t, t, 0x80808080;\nxor.b32 hi, hi, t;\n" if sign else "")
    return (f"prmt.b32 lo, {tl0}, {tl1}, {selector};\nprmt.b32 hi, {th0}, {th1}, {selector};\n{flip}"
            f"prmt.b32 t, lo, hi, 0x5140;\n{emit_pair(0)}prmt.b32 t, lo, hi, 0x7362;\n{emit_pair(1)}")


def lookup_tables(centroids: torch.Tensor) -> tuple[int, int, int, int]:
    """The four table words of a byte-permute lookup (`_byte_tables` of the levels it stores)."""
    return _byte_tables(_stored_levels(centroids)[0])


def _stored_levels(centroids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the 8 fp16 levels a lookup's tables hold, bits) of levels indexed by code (`code_levels_fp16`):
    a 3-bit codebook, or a 4-bit one's magnitudes."""
    levels = centroids.to(torch.float16)
    bits = {8: 3, 16: 4}.get(levels.numel())
    if bits is None:
        raise ValueError(f"byte-permute lookups serve 3- and 4-bit codebooks, got {levels.numel()} levels")
    if bits == 4:
        if not torch.equal(levels[:8], -levels[8:]):
            raise ValueError("a 4-bit byte-permute lookup needs an antisymmetric codebook, indexed by code")
        levels = levels[8:]  # magnitudes; code c ≥ 8 → +levels[c − 8], c < 8 → −levels[c]
    return levels, bits


def _lookups(centroids: torch.Tensor, word: str, emit_pair, tables: tuple[str, str, str, str] | None = None) -> str:
    """PTX that looks up the eight levels of the packed codes in `word` (a word of eight 4-bit codes,
    or eight 3-bit codes in its low 24 bits, the high 8 ignored) as four fp16 pairs, handing pair p
    (levels 2p, 2p + 1) to `emit_pair(p)`; its registers are declared inside. `tables` names registers
    that hold the table words (`lookup_tables`); without them the words are constants of the PTX."""
    levels, bits = _stored_levels(centroids)
    if tables is None:
        tables = ("tl0", "tl1", "th0", "th1")
        head = (".reg .b32 j, jh, lo, hi, t, tl0, tl1, th0, th1;\n"
                + "".join(f"mov.b32 {name}, {value:#010x};\n" for name, value in zip(tables, _byte_tables(levels))))
    else:
        head = ".reg .b32 j, jh, lo, hi, t;\n"
    low, high = emit_pair, (lambda k: emit_pair(2 + k))  # pairs 0, 1 from the low nibbles, 2, 3 from the high
    if bits == 3:
        # fields at bits 3k → nibble k: halves apart (the high half up 4), then pairs apart (odd pairs up 2),
        # then fields apart (odd fields up 1). Each stage is a shift and one bit select (lop3 0xe2: the bits
        # of the mask from j, the others from j shifted), carrying along stray bits that the last mask
        # clears; bits 24–31 of the word never reach a field.
        return head + (f"shl.b32 t, {word}, 4;\nlop3.b32 j, {word}, 0x0000ffff, t, 0xe2;\n"
                       "shl.b32 t, j, 2;\nlop3.b32 j, j, 0x00ff00ff, t, 0xe2;\n"
                       "shl.b32 t, j, 1;\nlop3.b32 j, j, 0x0f0f0f0f, t, 0xe2;\n"
                       "and.b32 j, j, 0x77777777;\n"
                       "shr.b32 jh, j, 16;\n" + _lookup_half("j", None, low, tables) + _lookup_half("jh", None, high, tables))
    # magnitude rank j = c & 7; bit 3 of each nibble (1: positive), moved to bit 7 of a byte, is the sign
    return head + (f".reg .b32 up, slo, shi;\nand.b32 j, {word}, 0x77777777;\n"
                   f"shr.b32 jh, j, 16;\nshl.b32 up, {word}, 4;\nprmt.b32 slo, up, {word}, 0x5140;\n"
                   f"prmt.b32 shi, up, {word}, 0x7362;\n" + _lookup_half("j", "slo", low, tables)
                   + _lookup_half("jh", "shi", high, tables))


def dequant_asm(centroids: torch.Tensor, table_inputs: bool = False) -> str:
    """PTX mapping one 32-bit input ($8: a word of eight 4-bit codes, or eight 3-bit codes in its
    low 24 bits) to its eight fp16 levels, $0..$7 in the word's order. Each output is a function of the
    one input, so the asm is elementwise whatever layout Triton gives the tensors. `table_inputs`: the
    four table words (`lookup_tables`) are inputs $9..$12 instead of constants, so a kernel that loads
    them once keeps them in registers (a constant, or a value every lane shares, is copied into a
    register before every byte permute)."""
    tables = ("$9", "$10", "$11", "$12") if table_inputs else None
    return "{\n" + _lookups(centroids, "$8", lambda k: f"mov.b32 {{${2 * k}, ${2 * k + 1}}}, t;\n", tables) + "}"


def dequant_pairs_asm(centroids: torch.Tensor) -> str:
    """`dequant_asm` for `inline_asm_elementwise(..., pack=2)` over a word given twice ($4, $5): the
    eight levels as four fp16 pairs $0..$3 (pair k: levels 2k, 2k + 1), the table words
    (`lookup_tables`) as inputs $6, $8, $10, $12 (each given twice too). A pair stays one 32-bit
    register from the byte permute that makes it to the MMA that reads it, and tables that a kernel
    loads once stay in registers (constants are re-materialized before every byte permute)."""
    return "{\n" + _lookups(centroids, "$4", lambda k: f"mov.b32 ${k}, t;\n", ("$6", "$8", "$10", "$12")) + "}"


def scaled_dequant_asm(centroids: torch.Tensor, split_scale: bool = False) -> str:
    """`dequant_asm` with the eight levels multiplied by an fp16 scale ($9, given again as $10): each pair
    by one `mul.f16x2`, for kernels that fold a row's norm into its levels (the Hopper extend kernel's
    values). The four table words (`lookup_tables`) are inputs $11..$14, so they stay in registers.
    `split_scale`: the scale is an fp16 pair hi + lo ($9/$10 hi, $11/$12 lo, tables $13..$16) and each level
    becomes fma(level, hi, level · lo), rounded to fp16 once: the product with an fp32 norm, not with the
    norm rounded to fp16, whose error would move every level of the row alike (the extend kernel's keys)."""
    if split_scale:
        head, tables = ".reg .b32 nhi, nlo, nu;\nmov.b32 nhi, {$9, $10};\nmov.b32 nlo, {$11, $12};\n", range(13, 17)

        def emit_pair(k: int) -> str:
            return f"mul.rn.f16x2 nu, t, nlo;\nfma.rn.f16x2 t, t, nhi, nu;\nmov.b32 {{${2 * k}, ${2 * k + 1}}}, t;\n"
    else:
        head, tables = ".reg .b32 scale;\nmov.b32 scale, {$9, $10};\n", range(11, 15)

        def emit_pair(k: int) -> str:
            return f"mul.rn.f16x2 t, t, scale;\nmov.b32 {{${2 * k}, ${2 * k + 1}}}, t;\n"
    return "{\n" + head + _lookups(centroids, "$8", emit_pair, tuple(f"${i}" for i in tables)) + "}"


def dot_asm(centroids: torch.Tensor) -> str:
    """PTX for Σ_k level_k · x_k over one run of eight packed codes ($1, as for `dequant_asm`) and
    their eight input coordinates, given as four fp16 pairs ($2..$5, x_2p in the low half): the products
    are summed as fp16 pairs (four `fma.f16x2`), the two halves in fp32 ($0). Half the instructions of a
    lookup followed by eight fp32 conversions and FMAs; four-term fp16 sums lose ~1e-3 relative at most."""
    def emit_pair(p: int) -> str:
        return f"mul.rn.f16x2 acc, t, ${2 + p};\n" if p == 0 else f"fma.rn.f16x2 acc, t, ${2 + p}, acc;\n"
    return ("{\n.reg .b32 acc;\n.reg .b16 h0, h1;\n.reg .f32 f0, f1;\n" + _lookups(centroids, "$1", emit_pair)
            + "mov.b32 {h0, h1}, acc;\ncvt.f32.f16 f0, h0;\ncvt.f32.f16 f1, h1;\nadd.f32 $0, f0, f1;\n}")


# Eight 4-bit codes ($2, given four times) → two registers of four int8 levels L of a byte grid
# (`core.byte_grid`): $0 the codes 0–3, $1 the codes 4–7, byte i of a register from code i of its half; the
# table words (`signed_byte_tables`) are inputs $6 and $10. The magnitude rank (c & 7) picks a negative
# level's byte from the table, and the code's sign bit, moved to the top of a byte and copied to all eight
# bits by `prmt`'s sign mode (selector nibble bit 3), flips it to the positive level (−L − 1 = ~L): 9
# integer instructions, where an fp16 lookup makes its pairs in 15.
SIGNED_BYTE_LOOKUP = ("{\n.reg .b32 j, jh, up, slo, shi, lo, hi;\nand.b32 j, $2, 0x77777777;\nshr.b32 jh, j, 16;\n"
                      "shl.b32 up, $2, 4;\nprmt.b32 slo, up, $2, 0xD9C8;\nprmt.b32 shi, up, $2, 0xFBEA;\n"
                      "prmt.b32 lo, $6, $10, j;\nprmt.b32 hi, $6, $10, jh;\nxor.b32 $0, lo, slo;\n"
                      "xor.b32 $1, hi, shi;\n}")


def signed_byte_tables(centroids: torch.Tensor, scale: float) -> tuple[int, int]:
    """The two table words of `SIGNED_BYTE_LOOKUP` for 4-bit levels on a byte grid of step `scale`
    (`core.byte_grid`), indexed by code: the bytes ~L of the negative levels −scale · (L + 1/2), by rank."""
    magnitudes, bits = _stored_levels(centroids)
    if bits != 4:
        raise ValueError(f"the signed byte lookup reads 4-bit codes, got {bits} bits")
    ranks = (magnitudes.double() / scale - 0.5).round()
    if not (ranks >= 0).all() or not (ranks <= 127).all():
        raise ValueError("the levels are not on a byte grid of this scale")
    stored = (~ranks.long() & 0xFF).tolist()
    return tuple(sum(b << (8 * i) for i, b in enumerate(stored[k:k + 4])) for k in (0, 4))


def byte_permute_available(device: torch.device) -> bool:
    """PTX runs on CUDA devices, not in the Triton interpreter."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
