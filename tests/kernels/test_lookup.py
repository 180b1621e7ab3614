"""The two ways the attention kernels turn packed indices into fp16 levels agree exactly: the
byte-permute PTX (`lut_asm.py`; in Triton kernels on the GPU only, its integer instructions also under
a CPU interpreter, `ptx_integer.py`) and the gather from the codebook (what the Triton interpreter runs)."""

import numpy
import pytest
import torch
import triton
import triton.language as tl

from turboquant.core import unpack_indices
from turboquant.kernels.codec import KEY_BYTE_TABLE_ROW, KEY_TABLE_ROW, VALUE_TABLE_ROW
from turboquant.kernels.lut_asm import SIGNED_BYTE_LOOKUP, dequant_asm, scaled_dequant_asm
from turboquant.kernels.packed_tile import load_levels

from . import ptx_integer
from .paged import make_codec


@triton.jit
def _levels_kernel(codes_ptr, centroids_ptr, out_ptr, num_rows, BITS: tl.constexpr, ROW_BYTES: tl.constexpr,
                   HEAD_DIM_PAD: tl.constexpr, ROWS: tl.constexpr, LUT_ASM: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    levels = load_levels(codes_ptr + rows * ROW_BYTES, rows < num_rows, centroids_ptr, BITS, ROW_BYTES,
                         HEAD_DIM_PAD, LUT_ASM)
    dims = tl.arange(0, HEAD_DIM_PAD)
    tl.store(out_ptr + rows[:, None] * HEAD_DIM_PAD + dims[None, :], levels, mask=(rows < num_rows)[:, None])


def levels(codes: torch.Tensor, centroids: torch.Tensor, bits: int, head_dim: int, lut_asm: str) -> torch.Tensor:
    pad = triton.next_power_of_2(head_dim)
    out = torch.full((codes.shape[0], pad), float("nan"), dtype=torch.float16, device=codes.device)
    _levels_kernel[(triton.cdiv(codes.shape[0], 32),)](codes, centroids, out, codes.shape[0], BITS=bits,
                                                        ROW_BYTES=codes.shape[1], HEAD_DIM_PAD=pad, ROWS=32,
                                                        LUT_ASM=lut_asm)
    return out[:, :head_dim]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PTX needs CUDA")
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("bits", [3, 4])
def test_byte_permute_lookup_equals_gather(head_dim, bits, generator):
    codec = make_codec(head_dim, bits, bits, num_kv_heads=1, block_size=16, device="cuda")
    centroids = codec.key_centroids_fp16
    codes = torch.randint(0, 256, (1000, head_dim * bits // 8), generator=generator, dtype=torch.uint8).cuda()
    gathered = levels(codes, centroids, bits, head_dim, "")
    permuted = levels(codes, centroids, bits, head_dim, dequant_asm(centroids))
    assert not gathered.isnan().any()
    torch.testing.assert_close(permuted, gathered, rtol=0, atol=0)


def test_gather_lookup_matches_unpacked_indices(generator, device):
    """The gather path against core/packing's unpack, for every packable width the kernels take."""
    # 3 bits: 16 coordinates (a weight group; two words per group), d=80 (30-byte rows, read by bytes),
    # d=96 (a padded row: its last word triple is past the row), whole word triples at 64, 128, 256
    widths = [(64, 2), (16, 3), (64, 3), (80, 3), (96, 3), (128, 3), (256, 3), (64, 4), (64, 8)]
    for head_dim, bits in widths:
        codec = make_codec(64, bits, bits, num_kv_heads=1, block_size=16, device=device)
        codes = torch.randint(0, 256, (40, head_dim * bits // 8), generator=generator, dtype=torch.uint8).to(device)
        # the codebook's ascending levels, made antisymmetric in fp16 as the codec's are, at the unpacked indices
        ascending = codec.key_quantizer.codebook.centroids
        expected = ((ascending - ascending.flip(0)) / 2).half().to(device)[unpack_indices(codes, bits, head_dim).long()]
        got = levels(codes, codec.key_centroids_fp16, bits, head_dim, "")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("table_inputs", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_lookup_ptx_interpreted_on_the_cpu_gives_the_codebook_levels(bits, table_inputs, generator):
    """The integer PTX of `dequant_asm`, run by a CPU interpreter of its instructions: the eight fp16
    outputs of a word are the codebook levels of its eight indices (3 bits: the low 24 bits, whatever
    the high 8 hold), bit for bit. Fresh random words each run, all indices included. `table_inputs`:
    the codec's form that takes the table words as inputs, given the key rows of `lut_lane_tables`."""
    codec = make_codec(64, bits, bits, num_kv_heads=1, block_size=16, device="cpu")
    centroids = codec.key_centroids_fp16.cpu()
    words = torch.randint(0, 2**32, (4096,), generator=generator, dtype=torch.int64)
    # the first words repeat one index in all eight fields, so every index is looked up; the rest are random
    words[:2**bits] = torch.arange(2**bits) * sum(1 << (bits * k) for k in range(8))
    if table_inputs:
        lanes = codec.lut_lane_tables.to(torch.int64) & 0xFFFFFFFF
        tables = {f"${9 + i}": torch.full_like(words, int(lanes[KEY_TABLE_ROW + i, 0])) for i in range(4)}
        registers = ptx_integer.run(codec.key_table_lut_asm, {"$8": words, **tables})
    else:
        registers = ptx_integer.run(dequant_asm(centroids), {"$8": words})
    level_bits = centroids.view(torch.int16).to(torch.int64) & 0xFFFF
    for k in range(8):
        index = (words >> (bits * k)) & (2**bits - 1)
        assert torch.equal(registers[f"${k}"], level_bits[index]), f"level {k} of the run"


def test_pair_lookup_ptx_gives_level_pairs_from_tables_in_registers(generator):
    """`dequant_pairs_asm`, the fragment decode kernel's value lookup, interpreted on the CPU: output k holds
    levels 2k (low half) and 2k + 1 of the word's indices, with the table words read from the codec's
    per-lane copies (`lut_lane_tables`), bit for bit."""
    codec = make_codec(128, 4, 4, num_kv_heads=1, block_size=16, device="cpu")
    centroids = codec.value_centroids_fp16.cpu()
    words = torch.randint(0, 2**32, (4096,), generator=generator, dtype=torch.int64)
    words[:16] = torch.arange(16) * 0x11111111  # every index
    lanes = codec.lut_lane_tables.to(torch.int64) & 0xFFFFFFFF
    assert (lanes == lanes[:, :1]).all()  # the same words in every lane
    tables = {name: torch.full_like(words, int(lanes[VALUE_TABLE_ROW + i, 0]))
              for i, name in enumerate(("$6", "$8", "$10", "$12"))}
    registers = ptx_integer.run(codec.value_pairs_lut_asm, {"$4": words, **tables})
    level_bits = centroids.view(torch.int16).to(torch.int64) & 0xFFFF
    for k in range(4):
        low, high = (words >> (8 * k)) & 15, (words >> (8 * k + 4)) & 15
        assert torch.equal(registers[f"${k}"], level_bits[low] | level_bits[high] << 16), f"pair {k}"


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_signed_byte_lookup_ptx_gives_the_key_level_of_each_code(head_dim, generator):
    """`SIGNED_BYTE_LOOKUP`, the fragment decode kernel's key lookup, interpreted on the CPU with the codec's
    per-lane table words: byte i of output h is the int8 L of code 4h + i, and s · (L + 1/2) is that code's
    level in the key codebook (on the byte grid)."""
    codec = make_codec(head_dim, 4, 4, num_kv_heads=1, block_size=16, device="cpu")
    words = torch.randint(0, 2**32, (4096,), generator=generator, dtype=torch.int64)
    words[:16] = torch.arange(16) * 0x11111111  # every code
    lanes = codec.lut_lane_tables.to(torch.int64) & 0xFFFFFFFF
    tables = {name: torch.full_like(words, int(lanes[KEY_BYTE_TABLE_ROW + i, 0]))
              for i, name in enumerate(("$6", "$10"))}
    registers = ptx_integer.run(SIGNED_BYTE_LOOKUP, {"$2": words, **tables})
    centroids = codec.key_centroids.cpu().double()  # indexed by code
    for k in range(8):
        code = (words >> (4 * k)) & 15
        byte = (registers[f"${k // 4}"] >> (8 * (k % 4))) & 0xFF
        level = (byte - 256 * (byte >= 128) + 0.5).double() * codec.key_byte_scale
        torch.testing.assert_close(level, centroids[code], rtol=1e-6, atol=0, msg=f"code {k} of the word")


@pytest.mark.parametrize("bits", [3, 4])
def test_scaled_lookup_ptx_gives_levels_times_the_scale(bits, generator):
    """`scaled_dequant_asm` (the Hopper extend kernel's value lookup), interpreted on the CPU with the table
    words of the codec's `lut_lane_tables`: each output is the fp16 product of a level and the word's fp16
    scale (norms up to ~300 and below 1), bit for bit."""
    codec = make_codec(128, bits, bits, num_kv_heads=1, block_size=16, device="cpu")
    centroids = codec.value_centroids_fp16.cpu()
    words = torch.randint(0, 2**32, (4096,), generator=generator, dtype=torch.int64)
    words[:2**bits] = torch.arange(2**bits) * sum(1 << (bits * k) for k in range(8))
    scales = (torch.rand(4096, generator=generator) * 300).half()
    scale_bits = scales.view(torch.int16).to(torch.int64) & 0xFFFF
    lanes = codec.lut_lane_tables.to(torch.int64) & 0xFFFFFFFF
    tables = {f"${11 + i}": torch.full_like(words, int(lanes[VALUE_TABLE_ROW + i, 0])) for i in range(4)}
    registers = ptx_integer.run(scaled_dequant_asm(centroids), {"$8": words, "$9": scale_bits, "$10": scale_bits,
                                                                **tables})
    for k in range(8):
        index = (words >> (bits * k)) & (2**bits - 1)
        expected = (centroids[index].float() * scales.float()).half().view(torch.int16).to(torch.int64) & 0xFFFF
        assert torch.equal(registers[f"${k}"], expected), f"level {k} of the run"


@pytest.mark.parametrize("bits", [3, 4])
def test_split_scaled_lookup_ptx_rounds_the_product_with_the_fp32_norm_once(bits, generator):
    """`scaled_dequant_asm(..., split_scale=True)` (the Hopper extend kernel's keys), interpreted on the CPU:
    with an fp32 norm given as fp16 hi + lo, each output is fma(level, hi, fp16(level · lo)) rounded once,
    bit for bit. That is within half a unit in the last place of level × the fp32 norm, plus the roundings
    of lo and of level · lo (half their fp16 spacing each: small for normal halves, up to ~0.1 unit of the
    output where a small norm makes level · lo subnormal); level × fp16(norm) strays up to a whole unit."""
    codec = make_codec(128, bits, bits, num_kv_heads=1, block_size=16, device="cpu")
    centroids = codec.key_centroids_fp16.cpu()
    words = torch.randint(0, 2**32, (4096,), generator=generator, dtype=torch.int64)
    norms = torch.rand(4096, generator=generator, dtype=torch.float64).float() * 300
    hi = norms.half()
    lo = (norms - hi.float()).half()
    as_bits = lambda halves: halves.view(torch.int16).to(torch.int64) & 0xFFFF  # noqa: E731
    spacing = lambda x: numpy.spacing(numpy.abs(x).astype(numpy.float16)).astype(numpy.float64)  # noqa: E731
    lanes = codec.lut_lane_tables.to(torch.int64) & 0xFFFFFFFF
    tables = {f"${13 + i}": torch.full_like(words, int(lanes[KEY_TABLE_ROW + i, 0])) for i in range(4)}
    registers = ptx_integer.run(scaled_dequant_asm(centroids, split_scale=True),
                                {"$8": words, "$9": as_bits(hi), "$10": as_bits(hi), "$11": as_bits(lo),
                                 "$12": as_bits(lo), **tables})
    worst_split = worst_plain = 0.0
    for k in range(8):
        level = centroids[(words >> (bits * k)) & (2**bits - 1)].double().numpy()
        partial = (level * lo.double().numpy()).astype(numpy.float16).astype(numpy.float64)
        expected = (level * hi.double().numpy() + partial).astype(numpy.float16)
        got = registers[f"${k}"].to(torch.int16).numpy().view(numpy.float16)
        assert numpy.array_equal(got.view(numpy.int16), expected.view(numpy.int16)), f"level {k} of the run"
        exact = level * norms.double().numpy()
        unit = spacing(exact)
        roundings = (spacing(partial) + numpy.abs(level) * spacing(lo.double().numpy())) / 2
        plain = (level * hi.double().numpy()).astype(numpy.float16).astype(numpy.float64)
        worst_split = max(worst_split, float(numpy.max((numpy.abs(got.astype(numpy.float64) - exact) - roundings)
                                                       / unit)))
        worst_plain = max(worst_plain, float(numpy.max(numpy.abs(plain - exact) / unit)))
    assert worst_split <= 0.5 < 0.75 < worst_plain


def test_asm_refuses_codebooks_it_cannot_hold():
    with pytest.raises(ValueError, match="3- and 4-bit"):
        dequant_asm(torch.linspace(-1, 1, 4))
    with pytest.raises(ValueError, match="antisymmetric"):
        dequant_asm(torch.linspace(-1, 2, 16))
