"""Exact copies of some tokens beside the compressed paged cache: a sequence's sinks and latest tokens.

`ExactRing` holds, per entry, one token's keys and values rotated (x @ Rᵀ) in the model's dtype; which
slot an entry holds (`slot_of_entry`) and which entry a slot last went to (`entry_of_slot`, −1: none)
say whether an entry still holds a given slot: an engine hands entries out round-robin, and a slot
written again (a freed block reused) points at its new entry or at none. `compress_store(ring=,
entries=)` fills it; `exact_window_partials` attends to each sequence's first `sinks` and latest
`recent` tokens, each read from the ring where its entry still holds it and from the cache otherwise,
as one more split that `paged_decode_attention(exact=)` merges with the compressed middle.
Reference: `reference.decode_reference(..., ring=)` (`exact_rows_reference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..core.paged_layout import PagedLayout
from .group_query import load_group_query
from .launch import SLICED_METADATA, check_device_tensor, head_dim_pad, lookup_constants, page_constants
from .packed_tile import load_levels, load_norms
from .softmax import empty_softmax_state, masked_softmax_step, tanh

# Positions per tile of the window kernel, as the decode split kernel's tiles: at head_dim 256 a 64-token
# tile of 3-bit codes exceeds shared memory there (`decode.decode_launch`). At head_dim 128 a 64-row tile
# takes all 255 registers and spills (26-30 local-memory instructions; 32 rows: 212-219 registers, none;
# sm_90, `benchmarks/window_sass.py` → window-sass.json). Beside the split kernels 64 rows measured as fast
# or faster all the same (H200, the ring's cost per step at b32 × 1K, b16 × 6K, b8 × 16K: 32 rows +10.9,
# +12.3, +12.2 µs; 64 rows +11.5 / +9.3, +10.1 / +10.4, +10.6 / +9.6 in runs before and after:
# ring-cost-h200-tile{32,64}.md).
WINDOW_TILE, WIDE_WINDOW_TILE = 64, 32


@dataclass(frozen=True)
class ExactRing:
    keys: torch.Tensor  # [entries, kv_heads, head_dim] model dtype, rotated
    values: torch.Tensor
    slot_of_entry: torch.Tensor  # int64 [entries]
    entry_of_slot: torch.Tensor  # int32 [cache slots]
    sinks: int
    recent: int

    @staticmethod
    def allocate_rows(entries: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.zeros(entries, num_kv_heads, head_dim, dtype=dtype, device=device)
        return keys, torch.zeros_like(keys)

    @classmethod
    def allocate(cls, entries: int, layout: PagedLayout, num_blocks: int, sinks: int, recent: int,
                 dtype: torch.dtype, device, tables: "ExactRing | None" = None,
                 rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> "ExactRing":
        """A ring of `entries` (on `rows` from `allocate_rows` where given); `tables`: share that ring's slot
        tables (the layers of one engine do)."""
        keys, values = rows or cls.allocate_rows(entries, layout.num_kv_heads, layout.head_dim, dtype, device)
        if tables is None:
            slot_of_entry = torch.full((entries,), -1, dtype=torch.int64, device=device)
            entry_of_slot = torch.full((num_blocks * layout.block_size,), -1, dtype=torch.int32, device=device)
        else:
            slot_of_entry, entry_of_slot = tables.slot_of_entry, tables.entry_of_slot
        return cls(keys, values, slot_of_entry, entry_of_slot, sinks, recent)

    def check(self, layout: PagedLayout, dtype: torch.dtype, cache: torch.Tensor) -> None:
        entries = self.slot_of_entry.shape[0]
        for name, tensor in (("keys", self.keys), ("values", self.values)):
            check_device_tensor(tensor, f"ring {name}", (dtype,), (entries, layout.num_kv_heads, layout.head_dim),
                                cache.device)
            if not tensor.is_contiguous():
                raise ValueError(f"ring {name} must be contiguous")
        check_device_tensor(self.slot_of_entry, "slot_of_entry", (torch.int64,), None, cache.device)
        check_device_tensor(self.entry_of_slot, "entry_of_slot", (torch.int32,),
                            (cache.shape[0] * layout.block_size,), cache.device)
        if self.sinks < 0 or self.recent < 0:
            raise ValueError(f"sinks and recent must be non-negative, got {self.sinks} and {self.recent}")


def middle_ends(seq_lens: torch.Tensor, sinks: int, recent: int) -> torch.Tensor:
    """Where each sequence's compressed middle ends, int32: max(seq_len − recent, sinks) (it starts at
    `sinks`); the split kernels read only the middle when a ring holds the ends."""
    return (seq_lens - recent).clamp(min=sinks).to(torch.int32)


@triton.jit
def held_rows(slots, candidates, entry_of_slot_ptr, slot_of_entry_ptr, kv_head, NUM_KV_HEADS: tl.constexpr,
              HEAD_DIM: tl.constexpr):
    """(which `candidates` the ring still holds: their slot's entry names that slot; each one's offset of
    its kv head's row in the ring's keys or values)."""
    entries = tl.load(entry_of_slot_ptr + slots, mask=candidates, other=-1).to(tl.int64)
    held = candidates & (entries >= 0)
    held = held & (tl.load(slot_of_entry_ptr + tl.maximum(entries, 0), mask=held, other=-1) == slots)
    return held, (tl.maximum(entries, 0) * NUM_KV_HEADS + kv_head) * HEAD_DIM


@triton.jit
def unit_rows(ring_ptrs, exact, code_ptrs, norm_ptrs, compressed, centroids_ptr, BITS: tl.constexpr,
               ROW_BYTES: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, LUT: tl.constexpr):
    """(unit rows fp16 [rows, HEAD_DIM_PAD], their scales fp32 [rows]): an exact row from the ring as its
    direction and norm, a compressed one as its levels and stored norm, as the split kernels read codes.
    Picked between in fp16: an fp32 pick held both tiles in fp32 and spilled more (48 local-memory
    instructions against 30 at d=128, k4v4; window-sass-before-fp16-select.json, window-sass.json)."""
    dims = tl.arange(0, HEAD_DIM_PAD)
    rows = tl.load(ring_ptrs[:, None] + dims[None, :], mask=exact[:, None] & (dims < HEAD_DIM)[None, :],
                   other=0.0).to(tl.float32)
    norms = tl.sqrt(tl.sum(rows * rows, axis=1))
    units = (rows / tl.maximum(norms, 1e-30)[:, None]).to(tl.float16)
    levels = load_levels(code_ptrs, compressed, centroids_ptr, BITS, ROW_BYTES, HEAD_DIM_PAD, LUT)
    return tl.where(exact[:, None], units, levels), tl.where(exact, norms, load_norms(norm_ptrs, compressed))


@triton.jit(do_not_specialize_on_alignment=SLICED_METADATA)
def _exact_window_kernel(
    query_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, ring_keys_ptr, ring_values_ptr, slot_of_entry_ptr,
    entry_of_slot_ptr, key_centroids_ptr, value_centroids_ptr, out_ptr, lse_ptr,
    stride_query_seq, stride_query_head, stride_table_seq, scale, softcap,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_PAGE_BYTES: tl.constexpr, VALUES_OFFSET: tl.constexpr,
    KEY_NORMS_OFFSET: tl.constexpr, VALUE_NORMS_OFFSET: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, KEY_BITS: tl.constexpr, KEY_BYTES: tl.constexpr, KEY_LUT: tl.constexpr,
    VALUE_BITS: tl.constexpr, VALUE_BYTES: tl.constexpr, VALUE_LUT: tl.constexpr, SINKS: tl.constexpr,
    RECENT: tl.constexpr, POSITIONS: tl.constexpr, TILE: tl.constexpr, USE_SOFTCAP: tl.constexpr,
):
    seq, kv_head = tl.program_id(0), tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    query, group, heads = load_group_query(query_ptr, seq, kv_head, stride_query_seq, stride_query_head, scale,
                                           GROUP, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    running_max, running_sum, acc = empty_softmax_state(GROUP_PAD, HEAD_DIM_PAD)
    for first in tl.static_range(0, POSITIONS, TILE):  # the sinks, then the latest tokens
        index = first + tl.arange(0, TILE)
        sink = index < SINKS
        positions = tl.where(sink, index, seq_len - RECENT + index - SINKS)
        visible = tl.where(sink, index < seq_len, (index < SINKS + RECENT) & (positions >= SINKS))
        positions = tl.maximum(positions, 0)
        blocks = tl.load(block_table_ptr + seq * stride_table_seq + positions // BLOCK_SIZE, mask=visible, other=0)
        offsets = positions % BLOCK_SIZE
        exact, ring_rows = held_rows(blocks.to(tl.int64) * BLOCK_SIZE + offsets, visible, entry_of_slot_ptr,
                                     slot_of_entry_ptr, kv_head, NUM_KV_HEADS, HEAD_DIM)
        compressed = visible & ~exact
        page_ptrs = cache_ptr + (blocks.to(tl.int64) * NUM_KV_HEADS + kv_head) * HEAD_PAGE_BYTES
        keys, key_scales = unit_rows(ring_keys_ptr + ring_rows, exact, page_ptrs + offsets * KEY_BYTES,
                                      page_ptrs + KEY_NORMS_OFFSET + offsets * 4, compressed, key_centroids_ptr,
                                      KEY_BITS, KEY_BYTES, HEAD_DIM, HEAD_DIM_PAD, KEY_LUT)
        scores = tl.dot(query, tl.trans(keys)) * key_scales[None, :]
        if USE_SOFTCAP:
            scores = softcap * tanh(scores / softcap)
        values, value_scales = unit_rows(ring_values_ptr + ring_rows, exact,
                                          page_ptrs + VALUES_OFFSET + offsets * VALUE_BYTES,
                                          page_ptrs + VALUE_NORMS_OFFSET + offsets * 4, compressed, value_centroids_ptr,
                                          VALUE_BITS, VALUE_BYTES, HEAD_DIM, HEAD_DIM_PAD, VALUE_LUT)
        running_max, running_sum, acc = masked_softmax_step(scores * 1.4426950408889634, visible[None, :],
                                                             running_max, running_sum, acc, values, value_scales)
    rows = seq * NUM_KV_HEADS * GROUP + heads
    head_mask = group < GROUP
    tl.store(out_ptr + rows[:, None] * HEAD_DIM_PAD + dims[None, :], acc / tl.maximum(running_sum, 1e-30)[:, None],
             mask=head_mask[:, None])
    lse = tl.where(running_sum > 0, running_max + tl.log2(tl.maximum(running_sum, 1e-30)), float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=head_mask)


def exact_window_partials(rotated_query: torch.Tensor, cache: torch.Tensor, codec, ring: ExactRing,
                          block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                          softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each sequence's query (rotated, fp32 [batch, Hq, d], at position seq_len − 1) to its
    sinks and latest tokens → (output [batch, Hq, d_pad] fp32 in the rotated space, log-sum-exp [batch, Hq]
    in log2 units): a split of `paged_decode_attention`'s. The caller checks the arguments."""
    layout = codec.layout
    batch, num_q_heads = rotated_query.shape[:2]
    group = num_q_heads // layout.num_kv_heads
    positions = max(16, triton.next_power_of_2(ring.sinks + ring.recent))  # tl.dot takes at least 16
    out = torch.empty(batch, num_q_heads, head_dim_pad(layout.head_dim), device=cache.device, dtype=torch.float32)
    lse = torch.empty(batch, num_q_heads, device=cache.device, dtype=torch.float32)
    _exact_window_kernel[(batch, layout.num_kv_heads)](
        rotated_query, cache, block_table, seq_lens, ring.keys, ring.values, ring.slot_of_entry, ring.entry_of_slot,
        codec.key_centroids_fp16, codec.value_centroids_fp16, out, lse, rotated_query.stride(0),
        rotated_query.stride(1), block_table.stride(0), float(scale), float(softcap or 0.0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), **page_constants(layout),
        **lookup_constants(codec), SINKS=ring.sinks, RECENT=ring.recent, POSITIONS=positions,
        TILE=min(positions, WINDOW_TILE if layout.head_dim <= 128 else WIDE_WINDOW_TILE),
        USE_SOFTCAP=softcap is not None, num_warps=4,
    )
    return out, lse
