"""`TurboQuantCache`: a transformers `Cache` whose full-attention layers hold TurboQuant-compressed K/V.

Per layer, tokens are kept in three runs, in position order: the first `sink_tokens` tokens and the
latest `residual_window` tokens stay in the model's dtype; everything between is stored compressed
(packed indices + fp32 norms). Keys and values are centered by a per-channel mean of the first chunk
the layer sees; the mean is added back exactly on dequantization, so only the spread is quantized.

Each forward call attends to the tokens compressed before it and, at full precision, to the sinks,
the recent window and its own new tokens (as in vLLM, a chunk is compressed after it has been seen).

Modes:
- "incremental": newly compressed tokens are dequantized once into a running buffer. Fast decode,
  but that buffer is as large as a DynamicCache: no live memory saving (only `nbytes` shrinks).
- "compact": only compressed data persists; each layer is dequantized when it is used. Decode cost
  grows with the context.
- "fused": compressed tokens live in the kernels' paged layout (`pages.py`) and attention reads them
  directly (`attention.py`, the model must use attn_implementation="turboquant"); no full-precision
  copy of them exists. Needs a CUDA device (or Triton's interpreter, TRITON_INTERPRET=1, on the CPU).
Sliding-window layers (Gemma-2/3, Mistral) stay uncompressed: their cache is bounded anyway.

Multi-head latent attention (DeepSeek-V2/V3 and their kin): transformers caches the latent, keys = the
normalized kv_c [B, 1, L, kv_lora_rank] and values = the shared RoPE key k_pe [B, 1, L, rope_dim], and
up-projects per head after the cache. A latent layer compresses kv_c and keeps k_pe exact (it carries the
position and is small); the fused mode does not serve it.
"""

from __future__ import annotations

import importlib
import inspect
import os

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer, get_layer_types_and_kwargs

from ..core import TurboQuantConfig, pack_indices
from .attention import ATTENTION_NAME, PendingAttention

MODES = ("incremental", "compact", "fused")
FULL_ATTENTION_TYPES = ("full_attention",)
# why a layer of another type stays as transformers' DynamicCache would build it
KEPT_TYPES = {"sliding_attention": "sliding window", "chunked_attention": "sliding window (chunked attention)",
              "linear_attention": "linear attention", "conv": "convolution state", "dummy": "no cache of its own"}


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=2)


def check_mse(config: TurboQuantConfig) -> None:
    if config.key_quantizer != "mse" or config.value_quantizer != "mse":
        raise ValueError(
            "TurboQuantCache dequantizes before attention, where a QJL sketch only adds variance: "
            "use key_quantizer='mse' and value_quantizer='mse'"
        )


class TurboQuantLayer(DynamicLayer):
    """One layer's cache. Tensors are [batch, kv_heads, tokens, ...] like transformers' layers."""

    def __init__(self, config: TurboQuantConfig, layer_idx: int, mode: str = "incremental", latent: bool = False):
        super().__init__()
        check_mse(config)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if latent and mode == "fused":
            raise ValueError("mode='fused' does not read MLA latents; use mode='incremental' or 'compact'")
        self.config, self.layer_idx, self.mode, self.latent = config, layer_idx, mode, latent
        self._reset_storage()

    def _reset_storage(self) -> None:
        self.sink_keys = self.sink_values = None  # [B, H, ≤sink_tokens, D], model dtype
        self.keys = self.values = None  # the recent window, [B, H, ≤residual_window, D]
        self.packed_keys = self.packed_values = None  # [B, H, N, D·bits/8] uint8
        self.key_norms = self.value_norms = None  # [B, H, N] float32
        self.key_center = self.value_center = None  # [B, H, 1, D] float32
        self.outlier_channels = self.inlier_channels = None  # [B, H, 1, n] int64 channel indices
        self.outlier_keys = None  # [B, H, N, key_outlier_channels], model dtype
        self.dequantized_keys = self.dequantized_values = None  # incremental mode: [B, H, N, D]
        self.exact_values = None  # latent layers: the compressed run's values (k_pe), kept as they are
        self.pages = None  # fused mode: a SequencePages holding the compressed run
        self.num_tokens = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, num_kv_heads, _, head_dim = key_states.shape
        if value_states.shape[-1] != head_dim and not self.latent:
            raise ValueError(f"keys and values must share head_dim, got {head_dim} and {value_states.shape[-1]}")
        self.key_quantizer = self.config.make_quantizer("key", head_dim, self.layer_idx)
        self.value_quantizer = None if self.latent else self.config.make_quantizer("value", head_dim, self.layer_idx)
        def center(states: torch.Tensor, wanted: bool) -> torch.Tensor:
            # One chunk's mean is enough: the offsets it removes are properties of the channel, not the token.
            if wanted:
                return states.float().mean(dim=2, keepdim=True)
            return torch.zeros(*states.shape[:2], 1, states.shape[-1], device=self.device, dtype=torch.float32)
        self.key_center = center(key_states, self.config.center_keys)
        self.value_center = center(value_states, self.config.center_values and not self.latent)
        if self.config.key_outlier_channels:
            spread = (key_states.float() - self.key_center).abs().mean(dim=2, keepdim=True)
            order = spread.argsort(dim=-1, descending=True)
            self.outlier_channels = order[..., : self.config.key_outlier_channels].sort(dim=-1).values
            self.inlier_channels = order[..., self.config.key_outlier_channels :].sort(dim=-1).values
        if self.mode == "fused":
            if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(f"mode='fused' runs Triton kernels: the cache must be on a CUDA device, not "
                                 f"{self.device} (on the CPU only under TRITON_INTERPRET=1, for tests)")
            from .pages import SequencePages  # needs triton, which only this mode uses

            self.pages = SequencePages(self.config, head_dim, num_kv_heads, batch, self.layer_idx, self.device)
        self.is_initialized = True

    # ---- storage ---------------------------------------------------------------------------------
    def _split(self, keys: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        return keys.gather(-1, which.expand(*keys.shape[:-1], which.shape[-1]))

    def _compress(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        centered = keys.float() - self.key_center
        if self.pages is not None:
            self.pages.append(centered, values.float() - self.value_center)
            return
        new_outliers = None
        if self.outlier_channels is not None:
            new_outliers = self._split(keys, self.outlier_channels)
            self.outlier_keys = _cat(self.outlier_keys, new_outliers)
            centered = self._split(centered, self.inlier_channels)
        # the model's own keys and values: no input checks (their NaN scan is a device sync per call)
        key_code = self.key_quantizer.quantize(centered, check=False)
        self.packed_keys = _cat(self.packed_keys, pack_indices(key_code.indices, self.key_quantizer.bits))
        self.key_norms = _cat(self.key_norms, key_code.norms)
        if self.mode == "incremental":  # from the fresh code: no unpacking of what was just packed
            self.dequantized_keys = _cat(self.dequantized_keys,
                                         self._decode_keys(self.key_quantizer.dequantize(key_code), new_outliers))
        if self.latent:
            self.exact_values = _cat(self.exact_values, values)
            return
        value_code = self.value_quantizer.quantize(values.float() - self.value_center, check=False)
        self.packed_values = _cat(self.packed_values, pack_indices(value_code.indices, self.value_quantizer.bits))
        self.value_norms = _cat(self.value_norms, value_code.norms)
        if self.mode == "incremental":
            self.dequantized_values = _cat(self.dequantized_values,
                                           self._decode(self.value_quantizer.dequantize(value_code), self.value_center))

    def _decode(self, dequantized: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """A quantizer's reconstruction of centered vectors → the vectors, in the model's dtype."""
        return (dequantized + center).to(self.dtype)

    def _decode_keys(self, dequantized: torch.Tensor, outliers: torch.Tensor | None) -> torch.Tensor:
        if outliers is None:
            return self._decode(dequantized, self.key_center)
        inliers = dequantized + self._split(self.key_center, self.inlier_channels)
        keys = torch.empty(*inliers.shape[:-1], self.key_center.shape[-1], dtype=self.dtype, device=inliers.device)
        keys.scatter_(-1, self.inlier_channels.expand(*inliers.shape), inliers.to(self.dtype))
        keys.scatter_(-1, self.outlier_channels.expand(*outliers.shape), outliers)
        return keys

    def compressed_tokens(self) -> int:
        if self.pages is not None:
            return self.pages.num_tokens
        return 0 if self.packed_keys is None else self.packed_keys.shape[2]

    def compressed_kv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The dequantized middle run (compressed tokens), or None if there is none."""
        if self.pages is not None:
            raise RuntimeError("a fused-mode layer never dequantizes its compressed tokens")
        if self.packed_keys is None:
            return None
        if self.mode == "incremental":
            keys, values = self.dequantized_keys, self.dequantized_values
        else:
            keys = self._decode_keys(self.key_quantizer.dequantize_packed(self.packed_keys, self.key_norms),
                                     self.outlier_keys)
            values = None if self.latent else self._decode(
                self.value_quantizer.dequantize_packed(self.packed_values, self.value_norms), self.value_center)
        return keys, self.exact_values if self.latent else values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store a chunk [B, H, L, D]; return what this call attends to: K/V tensors, or in fused mode a
        `PendingAttention` (twice, in the places of keys and values) for the turboquant attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.num_tokens += key_states.shape[2]
        sink_room = self.config.sink_tokens - (0 if self.sink_keys is None else self.sink_keys.shape[2])
        if sink_room > 0:
            self.sink_keys = _cat(self.sink_keys, key_states[:, :, :sink_room])
            self.sink_values = _cat(self.sink_values, value_states[:, :, :sink_room])
            key_states, value_states = key_states[:, :, sink_room:], value_states[:, :, sink_room:]
        recent_keys, recent_values = _cat(self.keys, key_states), _cat(self.values, value_states)
        if self.pages is not None:
            sinks = 0 if self.sink_keys is None else self.sink_keys.shape[2]
            attended = PendingAttention(self.pages, self.compressed_tokens(), sinks,
                                        _cat(self.sink_keys, recent_keys), _cat(self.sink_values, recent_values),
                                        self.key_center, self.value_center)
        else:
            attended = self._assemble(self.compressed_kv(), recent_keys, recent_values)
        self.keys, self.values = recent_keys, recent_values
        overflow = self.keys.shape[2] - self.config.residual_window
        if overflow > 0:
            self._compress(self.keys[:, :, :overflow], self.values[:, :, :overflow])
            self.keys, self.values = self.keys[:, :, overflow:], self.values[:, :, overflow:]
        return (attended, attended) if self.pages is not None else attended

    def _assemble(self, compressed, recent_keys: torch.Tensor, recent_values: torch.Tensor):
        runs = [(self.sink_keys, self.sink_values), compressed, (recent_keys, recent_values)]
        runs = [run for run in runs if run is not None and run[0] is not None and run[0].shape[2] > 0]
        if len(runs) == 1:
            return runs[0]
        return torch.cat([k for k, _ in runs], dim=2), torch.cat([v for _, v in runs], dim=2)

    # ---- the CacheLayerMixin contract ----------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.num_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_tokens + query_length, 0

    def reset(self) -> None:
        self._reset_storage()

    def _map_batch(self, fn) -> None:
        for name in ("sink_keys", "sink_values", "keys", "values", "packed_keys", "packed_values", "key_norms",
                     "value_norms", "key_center", "value_center", "dequantized_keys", "dequantized_values",
                     "outlier_channels", "inlier_channels", "outlier_keys", "exact_values"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))
        if self.pages is not None:
            self.pages.map_sequences(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `tokens_to_remove` tokens (negative, as transformers passes it) or keep `max_length`."""
        keep = self.num_tokens + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        keep = max(0, min(keep, self.num_tokens))
        if keep == self.num_tokens or not self.is_initialized:
            return
        sinks = 0 if self.sink_keys is None else self.sink_keys.shape[2]
        compressed = self.compressed_tokens()
        recent_keep = max(0, keep - sinks - compressed)
        compressed_keep = max(0, min(compressed, keep - sinks))
        if self.keys is not None:
            self.keys, self.values = self.keys[:, :, :recent_keep], self.values[:, :, :recent_keep]
        if self.pages is not None:
            self.pages.truncate(compressed_keep)
        if self.packed_keys is not None:
            for name in ("packed_keys", "packed_values", "key_norms", "value_norms", "dequantized_keys",
                         "dequantized_values", "outlier_keys", "exact_values"):
                tensor = getattr(self, name)
                if tensor is not None:
                    setattr(self, name, tensor[:, :, :compressed_keep])
        if self.sink_keys is not None:
            self.sink_keys, self.sink_values = self.sink_keys[:, :, :keep], self.sink_values[:, :, :keep]
        self.num_tokens = keep

    # ---- accounting -----------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes this layer must keep: compressed data, full-precision runs and centers (not the
        incremental mode's dequantized buffer, which is a speed cache)."""
        tensors = (self.sink_keys, self.sink_values, self.keys, self.values, self.packed_keys, self.packed_values,
                   self.key_norms, self.value_norms, self.key_center, self.value_center, self.outlier_keys,
                   self.exact_values)
        pages = 0 if self.pages is None else self.pages.nbytes()  # with its spare capacity
        return pages + sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def uncompressed_nbytes(self) -> int:
        """What a DynamicLayer would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        batch, heads, _, key_dim = self.key_center.shape
        value_dim = self.value_center.shape[-1]
        return batch * heads * self.num_tokens * (key_dim + value_dim) * torch.empty((), dtype=self.dtype).element_size()


def _transformers_layers(text_config) -> list[tuple[str, type | None, dict]]:
    """(layer type, the cache-layer class DynamicCache would build for it, its kwargs) per layer, as
    transformers decides: it infers types a config leaves implicit and drops or stubs the layers that
    share another's cache. (Its kwargs are one dict for all layers in 5.17, one per layer later.)"""
    layer_types, kwargs = get_layer_types_and_kwargs(text_config)
    per_layer = kwargs if isinstance(kwargs, list) else [kwargs] * len(layer_types)
    return [(t, DYNAMIC_LAYER_TYPE_MAPPING.get(t), k) for t, k in zip(layer_types, per_layer)]


def cache_kwargs(model, cache: Cache) -> dict[str, Cache]:
    """`cache` under the keyword this model's forward takes it by, for `model(...)` and `model.generate(...)`:
    transformers 5.24 renamed `past_key_values` to `cache` (the old name still works there, with a warning)."""
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {keyword: cache}


def kv_cache_nbytes(cache: Cache) -> int:
    """Bytes a transformers cache holds now; for a TurboQuantCache, what must be kept (`nbytes`)."""
    return sum(_layer_nbytes(layer) for layer in cache.layers)


def _layer_nbytes(layer) -> int:
    if isinstance(layer, TurboQuantLayer):
        return layer.nbytes()
    if not getattr(layer, "is_initialized", False) or layer.keys is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


def caches_mla_latent(text_config) -> bool:
    """Whether transformers caches this MLA model's latent (kv_c and k_pe, one "head" each) rather than
    per-head keys and values: its attention up-projects the cached latent (`expand_kv`)."""
    model_type = getattr(text_config, "model_type", "")
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return False
    return any(isinstance(obj, type) and callable(getattr(obj, "expand_kv", None)) for obj in vars(module).values())


def head_dim_of(config) -> int:
    """A (text) config's attention head_dim: its own, or hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_fused(model_config, text_config, layers: list) -> None:
    """Everything the fused mode cannot serve fails here, at construction, not in the middle of generate."""
    implementation = getattr(text_config, "_attn_implementation", None) or model_config._attn_implementation
    if implementation != ATTENTION_NAME:
        raise ValueError(f"mode='fused' needs the model loaded with attn_implementation={ATTENTION_NAME!r} (import "
                         f"turboquant.hf first), got {implementation!r}")
    if getattr(text_config, "attn_logit_softcapping", None) and any(
            isinstance(layer, TurboQuantLayer) and layer.config.center_keys for layer in layers):
        raise ValueError("mode='fused' cannot fold centered keys into soft-capped scores; use center_keys=False")
    from ..kernels.codec import KernelCodec

    head_dim = head_dim_of(text_config)
    for idx, layer in enumerate(layers):
        if isinstance(layer, TurboQuantLayer):
            try:
                KernelCodec.check_config(layer.config, head_dim)
            except ValueError as error:
                raise ValueError(f"mode='fused', layer {idx}: {error}") from None


class TurboQuantCache(Cache):
    """Compressed KV cache for `model.generate(..., past_key_values=TurboQuantCache(model.config))`
    (`cache=` from transformers 5.24; `cache_kwargs` picks the name).

    `config` is a `TurboQuantConfig` or a preset name ("k4v4", "k3v3", ...). Only full-attention layers
    are compressed; sliding-window, cross-attention and linear-attention layers (as transformers builds
    them) and `config.boundary_layers` first/last layers (when `boundary_bits` is None) are not;
    `uncompressed` maps each such layer to why.
    `mode` is one of MODES (see the module docstring); "fused" is the one that saves GPU memory at run time.
    """

    def __init__(self, model_config, config: TurboQuantConfig | str = "k4v4", mode: str = "incremental"):
        if isinstance(config, str):
            config = TurboQuantConfig.from_preset(config)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_mse(config)  # also when every layer is a boundary layer, which is always mse
        text_config = model_config.get_text_config(decoder=True)
        if getattr(model_config, "is_encoder_decoder", False) or getattr(text_config, "num_hidden_layers", None) is None:
            raise ValueError("TurboQuantCache needs the config of a decoder-only model (with num_hidden_layers)")
        latent = bool(getattr(text_config, "kv_lora_rank", None))
        if latent and not caches_mla_latent(text_config):
            raise ValueError("TurboQuantCache holds multi-head latent attention (MLA) caches only where transformers "
                             f"caches the latent (an attention with `expand_kv`); {text_config.model_type} in this "
                             "transformers version caches per-head keys and values: use DynamicCache for this model")
        layer_specs = _transformers_layers(text_config)
        # Mllama-style cross-attention layers hold the image's K/V, written once and read every step: not
        # the cache that grows, and read back through `layer.keys`, so they stay as transformers keeps them.
        cross_attention = set(getattr(text_config, "cross_attention_layers", None) or ())
        layers, self.uncompressed = [], {}
        for idx, (layer_type, layer_class, layer_kwargs) in enumerate(layer_specs):
            if idx in cross_attention:
                layers.append(DynamicLayer())
                self.uncompressed[idx] = "cross-attention: uncompressed"
            elif layer_type in FULL_ATTENTION_TYPES:
                layer_config = config.for_layer(idx, len(layer_specs))
                layers.append(DynamicLayer() if layer_config is None else TurboQuantLayer(layer_config, idx, mode, latent))
                if layer_config is None:
                    self.uncompressed[idx] = "boundary layer: uncompressed"
            elif layer_type in KEPT_TYPES and layer_class is not None:
                layers.append(layer_class(**layer_kwargs))
                self.uncompressed[idx] = f"{KEPT_TYPES[layer_type]}: uncompressed"
            else:
                raise ValueError(f"layer {idx} has attention type {layer_type!r}, which TurboQuantCache cannot hold")
        if mode == "fused":
            _check_fused(model_config, text_config, layers)
        super().__init__(layers=layers)
        self.config, self.mode = config, mode

    def compressed_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, TurboQuantLayer)]

    def nbytes(self) -> int:
        """Bytes the cache must hold now (compressed layers plus the ones kept uncompressed)."""
        return kv_cache_nbytes(self)

    def dynamic_cache_nbytes(self) -> int:
        """Bytes a DynamicCache would hold for the same tokens (sliding layers as they are)."""
        return sum(
            layer.uncompressed_nbytes() if isinstance(layer, TurboQuantLayer) else _layer_nbytes(layer)
            for layer in self.layers
        )
