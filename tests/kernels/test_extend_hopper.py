"""The Hopper extend kernel (`extend_hopper.py`, Gluon) against the PyTorch reference, through
`extend_attention`, which runs it where `extend_hopper.serves` says. Gluon does not run in Triton's
interpreter: these tests need a Hopper GPU."""

import pytest
import torch
import triton

from turboquant.kernels import extend, extend_hopper
from turboquant.kernels.extend import extend_attention
from turboquant.kernels.reference import extend_reference

from .test_decode import TOLERANCE
from .test_extend import CHUNK_TOLERANCE, chunked_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                                reason="the Gluon kernel runs on Hopper GPUs only")

# (head_dim, key_bits, value_bits, block_size, num_q_heads, num_kv_heads): Llama-3.1-8B's heads, d=64 with
# 32-token blocks, a GQA group of 5 (padded to 8 rows per token), Gemma-2-9B's (d=256, narrow programs only)
CASES = [(128, 4, 4, 16, 32, 8), (64, 4, 4, 32, 16, 4), (128, 4, 4, 16, 40, 8), (256, 4, 4, 16, 16, 8)]
# (case, wide): every program shape the kernel serves
PROGRAMS = [(case, wide) for case in CASES for wide in (True, False)
            if not (wide and extend_hopper.narrow_only(case[0]))]
OPTIONS = [{}, {"sliding_window": 150}, {"softcap": 4.0}, {"key_starts": [60, 0, 3, 0], "return_lse": True}]


def run_case(case, options, wide: bool, num_splits, monkeypatch, generator, key_norm_step: int = 0,
             query_dtype: torch.dtype = torch.float32, tolerance: dict = CHUNK_TOLERANCE) -> torch.Tensor:
    """extend_attention on the kernel's wide (128 rows, as where programs fill the SMs) or narrow (64 rows)
    programs against the reference: a chunk after a long prefix (every tile kind: first, full, last), one
    after a short prefix, a first chunk, one token; its output. `key_norm_step`: the cached keys before that
    position shrink to a tenth of their norms, those after grow by half. The query and output are fp32
    unless `query_dtype` says otherwise; it must match the reference's within `tolerance`."""
    head_dim, num_q_heads = case[0], case[4]
    # a device of one SM: every grid fills it; of 10,000: none does (the group of 5's programs would fill 132)
    monkeypatch.setattr(extend, "multiprocessor_count", lambda device: 1 if wide else 10_000)
    codec, cache, table, inputs = chunked_case(case, [700, 5, 0, 130], [37, 3, 100, 1], "cuda", generator,
                                               key_scale=2.0)
    if key_norm_step:
        key_norms = codec.layout.views(cache)[2]  # [blocks, kv heads, block size] fp32, the cache's own bytes
        for sequence, length in enumerate(inputs[4].tolist()):
            positions = torch.arange(length, device="cuda")
            blocks = table[sequence, positions // codec.layout.block_size].long()
            factors = torch.where(positions < key_norm_step, 0.1, 1.5)[:, None]
            key_norms[blocks, :, positions % codec.layout.block_size] *= factors
    inputs = (inputs[0].to(query_dtype),) + inputs[1:]
    options = dict(options)
    if "key_starts" in options:
        options["key_starts"] = torch.tensor(options["key_starts"], dtype=torch.int32, device="cuda")
    launch, query_tokens, default_splits = extend.program_plan(codec.layout, num_q_heads, 4, 100, table.shape[1] * 16,
                                                               False, extend.multiprocessor_count(cache.device))
    rows = query_tokens * triton.next_power_of_2(num_q_heads // case[5])
    assert rows == (128 if wide else 64) and extend_hopper.serves(codec.layout, cache.device, False, rows)
    out = extend_attention(*inputs, cache, codec, table, head_dim**-0.5, 100, num_splits=num_splits, **options)
    expected = extend_reference(*inputs, cache, codec, table, head_dim**-0.5, **options)
    if options.get("return_lse"):
        (out, lse), (expected, expected_lse) = out, expected
        torch.testing.assert_close(lse, expected_lse, **TOLERANCE)
    assert out.dtype == query_dtype
    torch.testing.assert_close(out.float(), expected, **tolerance)
    return out


@pytest.mark.parametrize("case, wide", PROGRAMS)
@pytest.mark.parametrize("options", OPTIONS)
def test_hopper_extend_matches_reference(case, options, wide, monkeypatch, generator):
    run_case(case, options, wide, None, monkeypatch, generator)


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:])
@pytest.mark.parametrize("options", OPTIONS)
def test_hopper_extend_split_prefix_matches_reference(case, options, monkeypatch, generator):
    """Narrow programs that each take a share of the prefix, merged after (short chunks); with 7 splits
    of the 700-token prefix some see one tile, those of the short ones none."""
    run_case(case, options, False, 7, monkeypatch, generator)


@pytest.mark.parametrize("wide", [True, False])
def test_hopper_extend_rising_scores_match_reference(wide, monkeypatch, generator):
    """Key norms that step up fifteenfold after the first 256 cached keys (scores up to ~12 in log2
    units): the fp32 norms hold decode's 4e-3 there, where keys scaled by fp16 norms did not (the
    rounding of a norm moves every score of its key alike; `kernels-extend-h200-scaled-keys.md`)."""
    run_case(CASES[0], {}, wide, None, monkeypatch, generator, key_norm_step=256, tolerance=TOLERANCE)


@pytest.mark.parametrize("case", CASES[:2])
@pytest.mark.parametrize("options", OPTIONS[::3])
@pytest.mark.parametrize("wide", [True, False])
@pytest.mark.parametrize("query_dtype", [torch.bfloat16, torch.float16])
def test_hopper_extend_unrotates_16_bit_outputs_itself(case, options, wide, query_dtype, monkeypatch, generator):
    """A 16-bit output is un-rotated by the kernel (two bf16 parts of the fp32 output times the rotation's
    signs on the tensor cores): it matches the reference, and, to within a rounding of the output dtype,
    the same output un-rotated by a launch of its own (fp32-accurate)."""
    codec = chunked_case(case, [1], [1], "cuda", generator)[0]
    assert extend_hopper.unrotates(codec, 1, query_dtype) and not extend_hopper.unrotates(codec, 2, query_dtype)
    out = run_case(case, options, wide, None, monkeypatch, generator.manual_seed(7), query_dtype=query_dtype)
    monkeypatch.setattr(extend_hopper, "unrotates", lambda *args: False)
    separate = run_case(case, options, wide, None, monkeypatch, generator.manual_seed(7), query_dtype=query_dtype)
    ulp = torch.finfo(query_dtype).eps
    torch.testing.assert_close(out.float(), separate.float(), atol=ulp, rtol=ulp)
