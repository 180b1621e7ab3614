import pytest
import torch

from turboquant.core.rotation import make_rotation
from turboquant.kernels.codec import PART_SCALES, rotation_parts, sign_form
from turboquant.kernels.rotate import rotate

from .paged import make_codec


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotation_parts_sum_to_the_rotation(dtype):
    rotation = torch.linalg.qr(torch.randn(96, 96, dtype=torch.float64))[0].float()
    parts = rotation_parts(rotation, dtype).double()
    scale = PART_SCALES[dtype]
    rebuilt = parts[0] + parts[1] / scale + parts[2] / scale**2
    assert (rebuilt - rotation.double()).abs().max() < 2**-24 * rotation.abs().max()


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_a_hadamard_rotation_is_a_scaled_sign_matrix_and_a_dense_one_is_not(dim, generator):
    seed = int(torch.randint(0, 2**31, (), generator=generator))
    hadamard = make_rotation(dim, seed, "hadamard").matrix()
    signs, scale = sign_form(hadamard)
    assert signs.dtype == torch.int8 and set(signs.unique().tolist()) == {-1, 1}
    assert torch.equal(signs.float() * scale, hadamard)  # exactly: the kernels multiply by S, then by c
    assert sign_form(make_rotation(dim, seed, "qr").matrix()) == (None, 0.0)


@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [5, 300])  # 16-row and 64-row programs
def test_rotate_matches_fp32_matmul(head_dim, dtype, tokens, device, generator):
    if tokens == 300 and head_dim in (80, 256) and device == "cpu":
        pytest.skip("the 64-row programs are covered at head_dim 64 and 128 under the interpreter")
    codec = make_codec(head_dim, 4, 4, num_kv_heads=2, block_size=16, device=device)
    # A strided view, as vLLM hands over q out of the fused qkv projection.
    packed = torch.randn(tokens, 7, head_dim, generator=generator).mul(3).to(dtype).to(device)
    x = packed[:, 1:6]
    got = rotate(x, codec)
    want = x.double() @ codec.rotation.double().T
    assert got.dtype == torch.float32 and got.shape == x.shape
    # fp32 accuracy: a tf32 or single-bf16 rotation would be off by ~1e-3 relative and fail this.
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-6

    back = torch.empty(tokens, 5, head_dim, dtype=dtype, device=device)
    assert rotate(got, codec, inverse=True, out=back) is back
    torch.testing.assert_close(back.float(), x.float(), rtol=1e-2, atol=2e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotate_rotates_a_second_tensor_in_the_same_launch(dtype, device, generator):
    """`second` (a chunk's values beside its keys): its rows come out as the heads after x's, each exactly as
    a launch of its own rotates them; both strided views of one buffer, as vLLM's keys and values are."""
    codec = make_codec(64, 4, 4, num_kv_heads=2, block_size=16, device=device)
    packed = torch.randn(20, 7, 64, generator=generator).to(dtype).to(device)
    keys, values = packed[:, 1:3], packed[:, 4:6]
    out = torch.empty(20, 4, 64, dtype=torch.float16, device=device)
    assert rotate(keys, codec, second=values, out=out) is out
    for rows, x in ((out[:, :2], keys), (out[:, 2:], values)):
        alone = rotate(x, codec, out=torch.empty(20, 2, 64, dtype=torch.float16, device=device))
        torch.testing.assert_close(rows, alone, rtol=0, atol=0)
    with pytest.raises(ValueError, match="second must have shape"):
        rotate(keys, codec, second=values[:5], out=out)
    with pytest.raises(ValueError, match="second must have dtype"):
        rotate(keys, codec, second=values.float(), out=out)
    with pytest.raises(ValueError, match="out must have shape"):
        rotate(keys, codec, second=values, out=out[:, :2])


def test_rotate_rejects_bad_input(device):
    codec = make_codec(64, 4, 4, num_kv_heads=2, block_size=16, device=device)
    with pytest.raises(ValueError, match="x must be"):
        rotate(torch.zeros(3, 2, 32, device=device), codec)
    with pytest.raises(ValueError, match="x must be"):
        rotate(torch.zeros(3, 2, 64, dtype=torch.int32, device=device), codec)
    with pytest.raises(ValueError, match="out must have shape"):
        rotate(torch.zeros(3, 2, 64, device=device), codec, out=torch.zeros(3, 2, 32, device=device))
