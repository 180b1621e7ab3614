"""Completes vLLM 0.26's batch-invariant mode for the RMSNorm that adds a residual first.

In that mode (`VLLM_BATCH_INVARIANT=1`) vLLM normalizes a plain hidden state with its batch-invariant
Triton kernel, but one with a residual (twice in every decoder layer after the first norm) through the
CUDA `fused_add_rms_norm`, whose block size depends on the step's token count (1024 threads under 256
tokens, 256 from there). A token's normalized state, and every layer after it, then depends on how many
tokens shared its step: on an H200 a 160-token prompt alone and beside a 97-token one first differed at
layer 0's post-attention norm, in bf16 and in ours alike (`benchmarks/vllm_invariance_trace.py`).
`residual_rms_norm_batch_invariant` adds the residual in the model dtype, as that kernel does, then
normalizes with vLLM's own Triton kernel; our backends install it in the mode, and only there.
"""

from __future__ import annotations

import torch

_installed = False


def residual_rms_norm_batch_invariant(input: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6,
                                      residual: torch.Tensor | None = None):
    """vLLM's `rms_norm_batch_invariant`, with the residual case batch invariant too: in place like
    `fused_add_rms_norm` (residual ← input + residual, input ← its normalization), same return values."""
    from vllm.model_executor.layers.batch_invariant import rms_norm_batch_invariant

    if residual is None:
        return rms_norm_batch_invariant(input, weight, eps)
    if input.shape != residual.shape:
        raise ValueError(f"input {tuple(input.shape)} and residual {tuple(residual.shape)} must have one shape")
    residual.add_(input)
    input.copy_(rms_norm_batch_invariant(residual, weight, eps))
    return input, residual


def install_residual_rms_norm() -> None:
    """Route vLLM's RMSNorm layers through `residual_rms_norm_batch_invariant` (idempotent)."""
    global _installed
    if _installed:
        return
    from vllm.model_executor.layers import layernorm

    layernorm.rms_norm_batch_invariant = residual_rms_norm_batch_invariant
    _installed = True
