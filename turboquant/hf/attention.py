"""`attn_implementation="turboquant"`: attention that reads a fused-mode `TurboQuantCache` directly.

A fused layer's `update` returns a `PendingAttention` instead of K/V tensors. Attention then runs in two
parts merged by their log-sum-exps (fp32): the kernels over the tokens compressed before this call
(decode kernel for one new token, extend kernel for a chunk, which also covers the chunk itself), and
PyTorch over the few full-precision tokens (sinks, recent window). Compressed tokens are centered: the
shared key center adds q·c to every one of their scores (a shift of their log-sum-exp) and, since
their probabilities sum to one, the value center adds c to their output. Any other layer (uncompressed,
sliding-window, another cache) gets transformers' SDPA attention unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

if TYPE_CHECKING:  # pages.py needs triton; this module must import without it
    from .pages import SequencePages

ATTENTION_NAME = "turboquant"


@dataclass(frozen=True)
class PendingAttention:
    """What one attention call of a fused layer reads: the first `compressed_tokens` of `pages`, and
    full-precision keys/values [B, H, n, D] (`sink_tokens` sinks, then the recent window and the chunk)."""

    pages: SequencePages
    compressed_tokens: int
    sink_tokens: int
    keys: torch.Tensor
    values: torch.Tensor
    key_center: torch.Tensor  # [B, H, 1, D] float32
    value_center: torch.Tensor


def _by_query_head(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    return x.repeat_interleave(num_q_heads // x.shape[1], dim=1)


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None,
            scale: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention of query [B, Hq, L, D] over keys/values [B, H, n, D] → (out, log-sum-exp [B, Hq, L])."""
    num_q_heads = query.shape[1]
    scores = query.float() @ _by_query_head(keys, num_q_heads).float().transpose(-1, -2) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(dim=-1)
    probs = (scores - torch.where(lse.isinf(), 0.0, lse)[..., None]).exp()
    return probs @ _by_query_head(values, num_q_heads).float(), lse


def _merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(top.isinf(), 0.0, top)
    weight_a, weight_b = (lse_a - top).exp()[..., None], (lse_b - top).exp()[..., None]
    return (weight_a * out_a + weight_b * out_b) / (weight_a + weight_b).clamp_min(1e-30)


def _fused_attention(query: torch.Tensor, pending: PendingAttention, attention_mask: torch.Tensor | None,
                     scale: float, softcap: float | None) -> torch.Tensor:
    batch, num_q_heads, query_len, _ = query.shape
    sinks, compressed = pending.sink_tokens, pending.compressed_tokens
    key_starts = full_visible = None  # no mask: causal, and every held token precedes the chunk
    if attention_mask is not None:
        key_len = compressed + pending.keys.shape[2]
        visible = attention_mask[..., -key_len:]
        visible = visible if visible.dtype == torch.bool else visible == 0
        # Left padding hides each sequence's first keys; among the compressed ones, as a start position.
        key_starts = (~visible[:, 0, -1, sinks : sinks + compressed]).sum(-1, dtype=torch.int32)
        key_starts = key_starts.expand(batch).contiguous()
        full_visible = torch.cat([visible[..., :sinks], visible[..., sinks + compressed :]], dim=-1)
    if query_len == 1:
        out_c, lse_c = pending.pages.decode(query[:, :, 0], scale, softcap, key_starts, compressed)
        out_c, lse_c = out_c[:, :, None], lse_c[:, :, None]
        full_keys, full_values = pending.keys, pending.values
    else:  # the extend kernel attends to the chunk too, at full precision but centered like the rest
        chunk_keys = pending.keys[:, :, -query_len:].float() - pending.key_center
        chunk_values = pending.values[:, :, -query_len:].float() - pending.value_center
        out_c, lse_c = pending.pages.extend(query, chunk_keys, chunk_values, scale, softcap, key_starts, compressed)
        full_keys, full_values = pending.keys[:, :, :-query_len], pending.values[:, :, :-query_len]
        full_visible = None if full_visible is None else full_visible[..., :-query_len]
    lse_c = lse_c + scale * (query.float() * _by_query_head(pending.key_center, num_q_heads)).sum(-1)
    out_c = out_c + _by_query_head(pending.value_center, num_q_heads)
    if full_keys.shape[2] == 0:
        return out_c
    out_f, lse_f = _attend(query, full_keys, full_values, full_visible, scale, softcap)
    return _merge(out_c, lse_c, out_f, lse_f)


def turboquant_attention(module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask: torch.Tensor | None,
                         dropout: float = 0.0, scaling: float | None = None, softcap: float | None = None,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """The attention-interface function: query [B, Hq, L, D] → ([B, L, Hq, D], None)."""
    if not isinstance(key, PendingAttention):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      softcap=softcap, **kwargs)
    if dropout and module.training:
        raise ValueError("the turboquant attention is for inference: it has no attention dropout")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if key.compressed_tokens == 0:  # nothing compressed yet: exactly the reference path's attention
        return sdpa_attention_forward(module, query, key.keys, key.values, attention_mask, dropout=dropout,
                                      scaling=scaling, softcap=softcap, **kwargs)
    out = _fused_attention(query, key, attention_mask, scale, softcap)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make attn_implementation="turboquant" known to transformers (done on `import turboquant.hf`)."""
    AttentionInterface.register(ATTENTION_NAME, turboquant_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
