import pytest
import torch

from turboquant.core.rotation import hadamard_matrix, make_rotation


@pytest.mark.parametrize("dim,kind", [(64, "hadamard"), (128, "hadamard"), (256, "hadamard"), (80, "qr"), (96, "qr"), (128, "qr")])
def test_rotation_is_orthogonal_and_inverse_undoes_it(dim, kind):
    rotation = make_rotation(dim, seed=7, kind=kind)
    m = rotation.matrix().double()
    assert torch.allclose(m @ m.T, torch.eye(dim, dtype=torch.float64), atol=1e-6)
    x = torch.randn(3, 5, dim)
    y = rotation.apply(x)
    assert torch.allclose(y, x @ rotation.matrix().T, atol=1e-5)
    assert torch.allclose(rotation.inverse(y), x, atol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_hadamard_rotation_is_the_sylvester_matrix_with_random_column_signs():
    h = hadamard_matrix(16)
    assert torch.equal(h @ h.T, 16 * torch.eye(16, dtype=torch.float64))
    assert torch.equal(h[1], torch.tensor([1.0, -1.0] * 8, dtype=torch.float64))  # Sylvester order
    signs = make_rotation(16, seed=5, kind="hadamard").matrix().double() * 4 / h  # R = H · diag(s) / √16
    assert (signs.abs() == 1).all() and (signs == signs[0]).all()
    assert (signs[0] == 1).any() and (signs[0] == -1).any()


def test_same_seed_same_rotation_different_seed_different():
    a, b, c = (make_rotation(96, s, "qr").matrix() for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    h1, h2 = make_rotation(128, 1).matrix(), make_rotation(128, 2).matrix()
    assert not torch.allclose(h1, h2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_same_rotation_on_gpu():
    rotation = make_rotation(96, 3)
    x = torch.randn(10, 96)
    assert torch.allclose(rotation.apply(x.cuda()).cpu(), rotation.apply(x), atol=1e-5)


def test_bad_rotation_arguments():
    with pytest.raises(ValueError, match="rotation"):
        make_rotation(64, 0, "fourier")
    with pytest.raises(ValueError, match="power-of-two"):
        make_rotation(96, 0, "hadamard")
