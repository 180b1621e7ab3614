"""The weight GEMV kernel against `TQLinear.forward` (its PyTorch reference): the CPU runs it in
Triton's interpreter, a GPU natively."""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from turboquant.weights import TQLinear  # noqa: E402
from turboquant.weights.gemv import tq_linear_gemv  # noqa: E402


@pytest.mark.parametrize("bits, group_size, bias", [(4, 128, True), (3, 64, False), (2, 64, True), (3, 128, True)])
@pytest.mark.parametrize("batch", [(1,), (2, 3)])
def test_gemv_matches_the_dequantized_linear(bits, group_size, bias, batch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    linear = nn.Linear(256, 80, bias=bias)  # 80 rows: the last program is partly masked
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 256, generator=generator) * 0.05)
    layer = TQLinear.from_linear(linear, bits, group_size).to(device)
    x = torch.randn(*batch, 256, generator=generator).to(device)
    want = nn.functional.linear(x, layer.dequantize(), layer.bias)
    got = tq_linear_gemv(x, layer)
    assert got.shape == want.shape and got.dtype == x.dtype
    # fp16 codebook levels against the fp32 codebook of the reference: ~1e-3 relative
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("launch", [dict(rows=16, step_groups=2, splits=1), dict(rows=64, step_groups=1, splits=3),
                                    dict(rows=32, step_groups=2, splits=2),
                                    dict(rows=64, step_groups=1, splits=3, batch_tile=32),
                                    dict(rows=16, step_groups=2, splits=1, tensor_cores=False),
                                    dict(rows=64, step_groups=1, splits=3, tensor_cores=False),
                                    dict(rows=32, step_groups=2, splits=2, tensor_cores=False)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_launch_tiling_matches_the_dequantized_linear(launch, bits):
    """Both kernels: row blocks, groups per loop step and splits along the groups (partial sums) change
    only the order of fp32 sums."""
    from turboquant.weights.gemv import GemvLaunch, codes_gemv

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    layer = TQLinear.from_weight(torch.randn(80, 384, generator=generator) * 0.05, torch.randn(80, generator=generator),
                                 bits, 64).to(device)  # 6 groups: 3 splits of 2, or splits of 4 and 2 groups
    # 40: two tensor-core programs along the batch (32 rows each); the FMA kernel takes one per row
    for rows in (3, 40) if launch.get("tensor_cores", True) else (1, 3):
        x = torch.randn(rows, 384, generator=generator).to(device)
        want = nn.functional.linear(x, layer.dequantize(), layer.bias)
        got = codes_gemv(x, layer.packed, layer.norms, layer.quantizer, layer.bias, GemvLaunch(**launch))
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("rows, splits", [(64, 1), (64, 2), (128, 3)])
def test_three_bit_vector_loads_match_the_dequantized_linear(rows, splits):
    """3-bit codes read as 16-byte vectors (two 128-coordinate blocks a step), the last step of a split
    cut short by the split's end or the layer's."""
    from turboquant.weights.gemv import GemvLaunch, codes_gemv, vector_codes

    assert vector_codes(rows, 2 * 128, num_warps=4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    layer = TQLinear.from_weight(torch.randn(80, 768, generator=generator) * 0.05, None, 3, 128).to(device)
    x = torch.randn(5, 768, generator=generator).to(device)
    want = nn.functional.linear(x, layer.dequantize())
    got = codes_gemv(x, layer.packed, layer.norms, layer.quantizer, None, GemvLaunch(rows, 2, splits))
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel path of forward runs on CUDA")
def test_forward_reads_the_codes_for_decode_sized_inputs(monkeypatch):
    from turboquant.weights import gemv, linear as linear_module

    calls = []
    kernel = gemv.codes_gemv
    monkeypatch.setattr(gemv, "codes_gemv", lambda x, *codes: calls.append(x.shape) or kernel(x, *codes))
    layer = TQLinear.from_linear(nn.Linear(256, 80), 4, 64).cuda()
    rows = linear_module.KERNEL_MAX_ROWS
    for shape in [(1, 1, 256), (rows, 256), (rows + 1, 256)]:
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        want = nn.functional.linear(x.float(), layer.dequantize(), layer.bias.float())
        torch.testing.assert_close(layer(x).float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert calls == [(1, 1, 256), (rows, 256)]  # more rows than KERNEL_MAX_ROWS: dequantize once instead


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_launch_picks_the_fma_kernel_for_decode_rows_and_tiles_whole_groups(bits):
    from turboquant.weights.gemv import FMA_MAX_BATCH, gemv_launch, vector_codes

    for groups, group_size in [(32, 128), (112, 128), (9, 64), (6, 32), (4, 16), (9, 128)]:
        for batch in (1, FMA_MAX_BATCH, FMA_MAX_BATCH + 1, 64):
            launch = gemv_launch(4096, groups, group_size, batch, num_sms=132, bits=bits)
            assert launch.tensor_cores == (batch > FMA_MAX_BATCH or group_size < 32)
            assert groups % launch.step_groups == 0 and 1 <= launch.splits <= groups // launch.step_groups
            if not launch.tensor_cores:
                assert launch.step_groups * group_size <= 2048
            else:  # 3-bit codes of whole 128-coordinate groups, two per step: read in 16-byte vectors
                vectors = vector_codes(launch.rows, launch.step_groups * group_size, launch.num_warps)
                assert vectors == (bits == 3 and group_size == 128 and groups % 2 == 0)
    few_rows = gemv_launch(192, 32, 128, 1, num_sms=132, bits=bits)  # 48 row programs: the groups are split
    assert not few_rows.tensor_cores and few_rows.splits > 1


def test_gemv_rejects_bad_input():
    layer = TQLinear.from_linear(nn.Linear(128, 16), 4, 64)
    with pytest.raises(ValueError, match="x must be"):
        tq_linear_gemv(torch.zeros(2, 64), layer)
    with pytest.raises(TypeError, match="expected a TQLinear"):
        tq_linear_gemv(torch.zeros(2, 128), nn.Linear(128, 16))
    with pytest.raises(ValueError, match="power-of-two"):
        tq_linear_gemv(torch.zeros(1, 192), TQLinear.from_linear(nn.Linear(192, 16), 4, 96))
    from turboquant.weights.gemv import GemvLaunch, codes_gemv

    with pytest.raises(ValueError, match="batch_tile must be"):
        codes_gemv(torch.zeros(3, 128), layer.packed, layer.norms, layer.quantizer, launch=GemvLaunch(16, 1, 1,
                                                                                                     batch_tile=8))
    small_groups = TQLinear.from_linear(nn.Linear(64, 16), 4, 16)
    with pytest.raises(ValueError, match="runs of 32 coordinates"):
        codes_gemv(torch.zeros(1, 64), small_groups.packed, small_groups.norms, small_groups.quantizer,
                   launch=GemvLaunch(16, 1, 1, tensor_cores=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_codes_linear_is_captured_in_a_cuda_graph_at_every_batch():
    """Decode-sized inputs (the kernel) and prefill-sized ones (dequantize, then cuBLAS), as vLLM captures
    them; replays equal the eager result, bit for bit."""
    from turboquant.weights.linear import codes_linear, prepare_codes_linear

    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    layer = TQLinear.from_weight(torch.randn(96, 256, generator=generator).cuda(), None, 4, 64)
    prepare_codes_linear(layer.quantizer, layer.packed.device)
    for rows in (1, 200):
        x = torch.randn(rows, 256, generator=generator).to("cuda", torch.bfloat16)
        eager = codes_linear(x, layer.packed, layer.norms, layer.quantizer)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = codes_linear(x, layer.packed, layer.norms, layer.quantizer)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
