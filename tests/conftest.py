"""Without a GPU, Triton kernels run in Triton's interpreter. TRITON_INTERPRET must be set before
`triton.jit` wraps the kernels, i.e. before any test module imports `turboquant.kernels`."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
