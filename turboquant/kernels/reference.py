"""PyTorch definitions of what each kernel computes: slow, obviously correct, used by the tests.

Attention here runs in the original (un-rotated) space on fully dequantized K/V in fp32, the way the
textbook writes it; the kernels instead score in the rotated space and un-rotate once, which is the
same number because the rotation is orthogonal.
"""

from __future__ import annotations

import torch

from ..core import MSECode, unpack_indices
from .codec import KernelCodec
from .exact_ring import middle_ends
from .latent import LatentCodec


def compress_store_reference(keys: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor,
                             cache: torch.Tensor, codec: KernelCodec) -> None:
    """Quantize keys/values [tokens, kv_heads, head_dim] and write token i to slot slot_mapping[i]
    (= block · block_size + offset; negative slots are skipped)."""
    layout = codec.layout
    key_codes, value_codes, key_norms, value_norms = layout.views(cache)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // layout.block_size, slots % layout.block_size
    for quantizer, x, codes, norms in ((codec.key_quantizer, keys, key_codes, key_norms),
                                       (codec.value_quantizer, values, value_codes, value_norms)):
        packed, vector_norms = quantizer.quantize_packed(x[keep].float())
        codes[blocks, :, offsets] = packed
        norms[blocks, :, offsets] = vector_norms


def gather_sequence_reference(cache: torch.Tensor, codec: KernelCodec, block_table_row: torch.Tensor,
                              num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized keys and values [num_tokens, kv_heads, head_dim] (fp32, original space) of one sequence."""
    layout = codec.layout
    key_codes, value_codes, key_norms, value_norms = layout.views(cache)
    positions = torch.arange(num_tokens, device=cache.device)
    blocks = block_table_row.long()[positions // layout.block_size]
    offsets = positions % layout.block_size
    out = []
    for quantizer, codes, norms in ((codec.key_quantizer, key_codes, key_norms),
                                    (codec.value_quantizer, value_codes, value_norms)):
        indices = unpack_indices(codes[blocks, :, offsets], quantizer.bits, layout.head_dim)
        out.append(quantizer.dequantize(MSECode(indices, norms[blocks, :, offsets])))
    return out[0], out[1]


def attention_reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        query_positions: torch.Tensor, key_positions: torch.Tensor, scale: float,
                        sliding_window: int | None = None, softcap: float | None = None,
                        key_start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 causal GQA attention. query [q, Hq, d], keys/values [k, Hkv, d]; a query at position p
    sees keys at positions j with key_start ≤ j ≤ p and, with a window W, j > p − W.
    Returns the output [q, Hq, d] and the log-sum-exp of the scores [q, Hq] (−inf where nothing is seen)."""
    group = query.shape[1] // keys.shape[1]
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), keys) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    visible = (key_positions[None, :] <= query_positions[:, None]) & (key_positions[None, :] >= key_start)
    if sliding_window:
        visible &= key_positions[None, :] > query_positions[:, None] - sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(dim=-1)
    probs = torch.where(visible, (scores - lse[..., None]).exp(), 0.0)
    return torch.einsum("hqk,khd->qhd", probs, values), lse.T


def decode_reference(query: torch.Tensor, cache: torch.Tensor, codec: KernelCodec, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                     softcap: float | None = None, key_starts: torch.Tensor | None = None,
                     return_lse: bool = False, ring=None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One new query per sequence, query [batch, Hq, d] at position seq_len − 1 → [batch, Hq, d] fp32
    (and the log-sum-exp [batch, Hq]); sequence i sees no key before key_starts[i]. `ring`
    (`exact_ring.ExactRing`): its sinks and latest keys from the ring (`exact_rows_reference`)."""
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    lse = torch.full(query.shape[:2], float("-inf"), device=query.device)
    for seq, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        keys, values = gather_sequence_reference(cache, codec, block_table[seq], length)
        if ring is not None:
            exact_rows_reference(keys, values, ring, codec, block_table[seq])
        positions = torch.arange(length, device=query.device)
        start = 0 if key_starts is None else int(key_starts[seq])
        seq_out, seq_lse = attention_reference(query[seq : seq + 1], keys, values, positions[-1:], positions,
                                               scale, sliding_window, softcap, start)
        out[seq], lse[seq] = seq_out[0], seq_lse[0]
    return (out, lse) if return_lse else out


def exact_rows_reference(keys: torch.Tensor, values: torch.Tensor, ring, codec: KernelCodec,
                         block_table_row: torch.Tensor) -> None:
    """In place: of a sequence's dequantized keys and values [length, kv_heads, d] (`gather_sequence_reference`),
    its first `ring.sinks` and latest `ring.recent` rows become the ring's (`exact_ring.ExactRing`, rotated
    unit rows times their norms, un-rotated here) wherever their slot's entry still holds that slot."""
    block_size, length = codec.layout.block_size, keys.shape[0]
    positions = torch.arange(length, device=keys.device)
    slots = block_table_row[positions // block_size].long() * block_size + positions % block_size
    entries = ring.entry_of_slot[slots].long()
    held = (entries >= 0) & (ring.slot_of_entry[entries.clamp(min=0)] == slots)
    held &= (positions < ring.sinks) | (positions >= length - ring.recent)
    held_entries = entries[held]
    for rows, units, norms in ((keys, ring.keys, ring.key_norms), (values, ring.values, ring.value_norms)):
        rows[held] = (units[held_entries].float() * norms[held_entries][:, :, None]) @ codec.rotation


def ring_entries_reference(query_start: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, num_reqs: int,
                           num_decodes: int, cursor: torch.Tensor, sinks: int, recent: int, sink_capacity: int,
                           recent_capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `ring_entries.hand_out_ring_entries` computes: (entries int64 [num_tokens], the advanced cursor,
    middle ends int64 [num_decodes])."""
    starts, lengths = query_start[:num_reqs + 1].long(), seq_lens[:num_reqs].long()
    token = torch.arange(num_tokens, device=starts.device)
    request = torch.searchsorted(starts[1:], token, right=True).clamp(max=num_reqs - 1)
    position = lengths[request] - (starts[request + 1] - token)
    real = (token < starts[num_reqs]) & (position >= 0)
    sink = real & (position < sinks)
    late = real & ~sink & (position >= lengths[request] - recent)
    entries = torch.where(sink, (cursor[0] + sink.cumsum(0) - 1) % sink_capacity,
                          torch.where(late, sink_capacity + (cursor[1] + late.cumsum(0) - 1) % recent_capacity, -1))
    advanced = cursor + torch.stack((sink.sum(), late.sum()))
    return entries, advanced, middle_ends(seq_lens[:num_decodes], sinks, recent).long()


def extend_reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_start: torch.Tensor,
                     seq_lens: torch.Tensor, cache: torch.Tensor, codec: KernelCodec, block_table: torch.Tensor,
                     scale: float, sliding_window: int | None = None, softcap: float | None = None,
                     key_starts: torch.Tensor | None = None,
                     return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A chunk of new tokens per sequence: query [tokens, Hq, d] with fresh keys/values [tokens, Hkv, d];
    sequence i's chunk is rows query_start[i]:query_start[i+1] and follows a compressed prefix of
    seq_lens[i] − chunk length tokens. The chunk attends to the prefix and causally to itself."""
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    lse = torch.full(query.shape[:2], float("-inf"), device=query.device)
    for seq, length in enumerate(seq_lens.tolist()):
        start, end = int(query_start[seq]), int(query_start[seq + 1])
        prefix = length - (end - start)
        prefix_keys, prefix_values = gather_sequence_reference(cache, codec, block_table[seq], prefix)
        all_keys = torch.cat([prefix_keys, keys[start:end].float()])
        all_values = torch.cat([prefix_values, values[start:end].float()])
        positions = torch.arange(length, device=query.device)
        key_start = 0 if key_starts is None else int(key_starts[seq])
        out[start:end], lse[start:end] = attention_reference(query[start:end], all_keys, all_values,
                                                             positions[prefix:], positions, scale, sliding_window,
                                                             softcap, key_start)
    return (out, lse) if return_lse else out


def cached_attention_reference(query: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
                               cache: torch.Tensor, codec: KernelCodec, block_table: torch.Tensor, scale: float,
                               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Sequence i's rows query_start[i]:query_start[i+1] are its last tokens of seq_lens[i], all stored:
    each attends causally to the dequantized cache, its own position included."""
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for seq, length in enumerate(seq_lens.tolist()):
        start, end = int(query_start[seq]), int(query_start[seq + 1])
        keys, values = gather_sequence_reference(cache, codec, block_table[seq], length)
        positions = torch.arange(length, device=query.device)
        out[start:end], _ = attention_reference(query[start:end], keys, values, positions[length - (end - start):],
                                                positions, scale, sliding_window, softcap)
    return out


def latent_store_reference(kv_c: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor, cache: torch.Tensor,
                           codec: LatentCodec) -> None:
    """Quantize kv_c [tokens, latent_dim], keep k_pe [tokens, rope_dim], write token i to slot slot_mapping[i]."""
    layout = codec.layout
    codes, norms, rope = layout.views(cache)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // layout.block_size, slots % layout.block_size
    packed, vector_norms = codec.quantizer.quantize_packed(kv_c[keep].float())
    codes[blocks, offsets], norms[blocks, offsets], rope[blocks, offsets] = packed, vector_norms, k_pe[keep]


def latent_decode_reference(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, codec: LatentCodec,
                            block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """MLA decode on the dequantized latent, fp32: scores = scale · (q_latent · kv_c + q_pe · k_pe),
    output = softmax · kv_c → [batch, heads, latent_dim] (and the log-sum-exp [batch, heads])."""
    out = torch.zeros(q_latent.shape, dtype=torch.float32, device=q_latent.device)
    lse = torch.full(q_latent.shape[:2], float("-inf"), device=q_latent.device)
    for seq, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        kv_c, k_pe = latent_gather_reference(cache, codec, block_table[seq], 0, length)
        scores = (q_latent[seq].float() @ kv_c.T + q_pe[seq].float() @ k_pe.float().T) * scale
        lse[seq] = scores.logsumexp(dim=-1)
        out[seq] = (scores - lse[seq][:, None]).exp() @ kv_c
    return (out, lse) if return_lse else out


def latent_gather_reference(cache: torch.Tensor, codec: LatentCodec, block_table_row: torch.Tensor, start: int,
                            length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_c (dequantized, fp32) [length, latent_dim] and k_pe [length, rope_dim] of one sequence's
    cached tokens start:start + length."""
    layout = codec.layout
    codes, norms, rope = layout.views(cache)
    positions = torch.arange(start, start + length, device=cache.device)
    blocks = block_table_row.long()[positions // layout.block_size]
    offsets = positions % layout.block_size
    return codec.quantizer.dequantize_packed(codes[blocks, offsets], norms[blocks, offsets]), rope[blocks, offsets]
