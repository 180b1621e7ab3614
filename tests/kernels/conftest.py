"""Kernel tests run the Triton kernels natively on a GPU and in Triton's interpreter on the CPU
(TRITON_INTERPRET is set in tests/conftest.py, before any test module imports the kernels)."""

import os

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def generator(request) -> torch.Generator:
    """Fresh random inputs on every run; the seed is printed with any failure to reproduce it."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item()) ^ os.getpid()
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
