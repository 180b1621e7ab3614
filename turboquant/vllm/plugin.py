"""The `vllm.general_plugins` entry point: vLLM calls `register()` in every process it starts.

It registers `TurboQuantBackend` as vLLM's CUSTOM attention backend (so `--attention-backend CUSTOM`
selects it) and lets layers served by it report compressed KV pages (`spec.py`). Nothing changes for an
engine that does not pick the CUSTOM backend.
"""

from __future__ import annotations

BACKEND_PATH = "turboquant.vllm.backend.TurboQuantBackend"


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .backend import TurboQuantBackend
    from .spec import patch_attention_spec

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    patch_attention_spec(TurboQuantBackend)
