import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant.core.packing import (PACKABLE_BITS, code_order, pack_indices, packed_bytes, sign_magnitude,
                                     unpack_indices)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(PACKABLE_BITS), lead=st.lists(st.integers(0, 4), max_size=3),  # 0: empty batches
       groups=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, lead, groups, seed):
    n = groups * 8
    indices = torch.randint(0, 2**bits, (*lead, n), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    packed = pack_indices(indices, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, n * bits // 8)
    assert torch.equal(unpack_indices(packed, bits, n), indices)


@pytest.mark.parametrize("bits,expected", [(1, 16), (2, 32), (3, 48), (4, 64), (8, 128)])
def test_packed_sizes_at_d128(bits, expected):
    assert packed_bytes(128, bits) == expected
    assert pack_indices(torch.zeros(2, 128, dtype=torch.uint8), bits).shape[-1] == expected


def test_layout_is_little_endian_bit_stream():
    # 4-bit: code 0 in the low nibble. 3-bit: 8 codes in 3 bytes, code i at bits 3i..3i+2.
    codes = lambda values, bits: sign_magnitude(torch.tensor(values, dtype=torch.uint8), bits)  # noqa: E731
    assert pack_indices(codes([1, 2], 4), 4).tolist() == [0x21]
    packed = pack_indices(codes([1, 2, 3, 4, 5, 6, 7, 0], 3), 3)
    stream = int.from_bytes(bytes(packed.tolist()), "little")
    assert [(stream >> (3 * i)) & 7 for i in range(8)] == [1, 2, 3, 4, 5, 6, 7, 0]


@pytest.mark.parametrize("bits", PACKABLE_BITS)
def test_stored_codes_are_sign_and_magnitude_rank(bits):
    """Index i of the ascending levels is stored as i in the upper half (i ≥ 2^(b−1)) and as 2^(b−1) − 1 − i
    in the lower: the top bit is the half, the low bits rank the distance from the middle, nearest first.
    `code_order` maps codes back to indices."""
    half = 1 << (bits - 1)
    expected = [i if i >= half else half - 1 - i for i in range(1 << bits)]
    rows = torch.arange(1 << bits, dtype=torch.uint8)[:, None].expand(-1, 8)  # row i: eight copies of index i
    stored = [int.from_bytes(bytes(row.tolist()), "little") & ((1 << bits) - 1) for row in pack_indices(rows, bits)]
    assert stored == expected
    assert code_order(bits).tolist() == expected  # the map is its own inverse


def test_bad_packing_input():
    with pytest.raises(ValueError, match="bits"):
        pack_indices(torch.zeros(8, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_indices(torch.zeros(5, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="bytes"):
        unpack_indices(torch.zeros(7, dtype=torch.uint8), 4, 16)
