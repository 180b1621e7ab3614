"""The `vllm.general_plugins` entry point: vLLM calls `register()` in every process it starts.

It registers `TurboQuantBackend` as vLLM's CUSTOM attention backend (so `--attention-backend CUSTOM`
selects it), routes MLA layers of such an engine to `TurboQuantLatentBackend` (vLLM has one CUSTOM
slot and checks that an MLA layer's backend is an MLA one, so a plugin cannot register both under it)
and has those layers fold the latent's rotation into their projections after loading, and lets layers
served by either backend report compressed KV pages (`spec.py`). Nothing changes for an engine
that does not pick the CUSTOM backend. It also registers the weight quantization method
`--quantization turboquant` (`weights.py`), which an engine uses only when asked, and puts that
method's settings into vLLM's torch.compile cache key.
"""

from __future__ import annotations

import functools

BACKEND_PATH = "turboquant.vllm.backend.TurboQuantBackend"


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .backend import TurboQuantBackend
    from .latent_backend import TurboQuantLatentBackend
    from .spec import patch_attention_specs
    from .weights import key_compile_cache_by_settings  # importing it registers --quantization turboquant

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    route_latent_layers(TurboQuantLatentBackend)
    fold_latent_rotations(TurboQuantLatentBackend)
    patch_attention_specs(TurboQuantBackend, TurboQuantLatentBackend)
    key_compile_cache_by_settings()


def check_latent_layer(backend_cls: type, dtype, kv_cache_dtype: str | None, use_sparse: bool) -> None:
    """What vLLM's selector would check, with messages that say what to change; raised at engine start."""
    if use_sparse:
        raise ValueError("turboquant does not serve sparse MLA (DeepSeek-V3.2's indexer-selected attention); "
                         "pick another attention backend for this model")
    if dtype not in backend_cls.supported_dtypes:
        raise ValueError(f"turboquant's MLA backend runs float16 or bfloat16 models, this one is {dtype}")
    if kv_cache_dtype not in (None, *backend_cls.supported_kv_cache_dtypes):
        raise ValueError(f"turboquant compresses the KV cache itself; leave --kv-cache-dtype at 'auto' "
                         f"(got {kv_cache_dtype!r})")


def route_latent_layers(latent_backend_cls: type) -> None:
    """Idempotent: wrap the backend lookup of vLLM's MLA layer so that, where the engine's backend for
    MLA layers is CUSTOM, the layer gets `latent_backend_cls`."""
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.attention import mla_attention
    from vllm.platforms import current_platform
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import get_attn_spec_kind

    original = mla_attention.get_attn_backend
    if getattr(original, "_turboquant", False):
        return

    def selects_custom() -> bool:
        attention = get_current_vllm_config().attention_config
        kind = get_attn_spec_kind(use_mla=True, has_sliding_window=False, attn_type=AttentionType.DECODER)
        return attention.backend_per_kind.get(kind.value, attention.backend) == AttentionBackendEnum.CUSTOM

    @functools.wraps(original)
    def get_attn_backend(head_size, dtype, kv_cache_dtype, use_mla=False, use_sparse=False, **kwargs):
        if use_mla and selects_custom():
            check_latent_layer(latent_backend_cls, dtype, kv_cache_dtype, use_sparse)
            capability = current_platform.get_device_capability()
            if capability is not None and not latent_backend_cls.supports_compute_capability(capability):
                raise ValueError(f"turboquant's kernels need compute capability 8.0 or newer, this GPU has "
                                 f"{capability.as_version_str()}")
            return latent_backend_cls
        return original(head_size, dtype, kv_cache_dtype, use_mla=use_mla, use_sparse=use_sparse, **kwargs)

    get_attn_backend._turboquant = True
    mla_attention.get_attn_backend = get_attn_backend


def fold_latent_rotations(latent_backend_cls: type) -> None:
    """Idempotent: after vLLM's MLA layer builds its absorbed projections, a layer served by
    `latent_backend_cls` folds its latent rotation into them (`TurboQuantLatentImpl.fold_rotation`)."""
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention

    original = MLAAttention.process_weights_after_loading
    if getattr(original, "_turboquant", False):
        return

    @functools.wraps(original)
    def process_weights_after_loading(self, act_dtype):
        original(self, act_dtype)
        if isinstance(self.attn_backend, type) and issubclass(self.attn_backend, latent_backend_cls):
            self.impl.fold_rotation(self)

    process_weights_after_loading._turboquant = True
    MLAAttention.process_weights_after_loading = process_weights_after_loading
