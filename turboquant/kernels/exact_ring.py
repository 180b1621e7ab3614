"""Exact copies of some tokens beside the compressed paged cache: a sequence's sinks and latest tokens.

`ExactRing` holds, per entry, one token's keys and values rotated (x @ Rᵀ) as unit rows in fp16 beside
their fp32 norms, the form the cache's levels and norms take, so that a kernel reads either alike; which
slot an entry holds (`slot_of_entry`) and which entry a slot last went to (`entry_of_slot`, −1: none)
say whether an entry still holds a given slot: an engine hands entries out round-robin, and a slot
written again (a freed block reused) points at its new entry or at none. `compress_store(ring=,
entries=)` fills it; `exact_window_partials` attends to each sequence's first `sinks` and latest
`recent` tokens, each read from the ring where its entry still holds it and from the cache otherwise,
as more splits that `paged_decode_attention(exact=)` merges with the compressed middle.
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

# Rows per tile of the window kernel: the sinks take tiles of their own (4 sinks: one tile of 16, tl.dot's
# least), then the latest tokens tiles of up to WINDOW_TILE rows at head_dim <= 128, WIDE_WINDOW_TILE above.
# Larger tiles hold more registers (sm_90, `benchmarks/window_sass.py` → window-sass.json, Triton 3.6): at
# head_dim 256, 3 bits, 32 rows take 255 a thread, 16 rows 164 (Triton 3.9 spilled 86 local-memory
# instructions at 32). At head_dim 128, k4v4: 3,160 instructions, 254 registers, no spill (16 rows: 166
# registers, yet 1.2-2.9 us more per decode step: ring-cost-h200-speculative-summary.md); before the ring
# held unit rows, one 64-row tile over sinks and latest tokens together (64 rows read for 36) normalized
# the ring's rows itself: 7,240 instructions, 30 of them spills.
WINDOW_TILE, WIDE_WINDOW_TILE = 32, 16


RingRows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # keys, values, their norms


@dataclass(frozen=True)
class ExactRing:
    keys: torch.Tensor  # fp16 [entries, kv_heads, head_dim]: x @ Rᵀ / ‖x‖
    values: torch.Tensor
    key_norms: torch.Tensor  # fp32 [entries, kv_heads]: ‖x‖
    value_norms: torch.Tensor
    slot_of_entry: torch.Tensor  # int64 [entries]
    entry_of_slot: torch.Tensor  # int32 [cache slots]
    sinks: int
    recent: int

    @staticmethod
    def allocate_rows(entries: int, num_kv_heads: int, head_dim: int, device) -> RingRows:
        """Zeroed rows and norms of a ring of `entries`: (keys, values, key norms, value norms)."""
        keys = torch.zeros(entries, num_kv_heads, head_dim, dtype=torch.float16, device=device)
        norms = torch.zeros(entries, num_kv_heads, dtype=torch.float32, device=device)
        return keys, torch.zeros_like(keys), norms, torch.zeros_like(norms)

    @classmethod
    def allocate(cls, entries: int, layout: PagedLayout, num_blocks: int, sinks: int, recent: int, device,
                 tables: "ExactRing | None" = None, rows: RingRows | None = None) -> "ExactRing":
        """A ring of `entries` (on `rows` from `allocate_rows` where given); `tables`: share that ring's slot
        tables (the layers of one engine do)."""
        rows = rows or cls.allocate_rows(entries, layout.num_kv_heads, layout.head_dim, device)
        if tables is None:
            slot_of_entry = torch.full((entries,), -1, dtype=torch.int64, device=device)
            entry_of_slot = torch.full((num_blocks * layout.block_size,), -1, dtype=torch.int32, device=device)
        else:
            slot_of_entry, entry_of_slot = tables.slot_of_entry, tables.entry_of_slot
        return cls(*rows, slot_of_entry, entry_of_slot, sinks, recent)

    def check(self, layout: PagedLayout, cache: torch.Tensor) -> None:
        entries = self.slot_of_entry.shape[0]
        for name, tensor, dtype, shape in (
                ("keys", self.keys, torch.float16, (entries, layout.num_kv_heads, layout.head_dim)),
                ("values", self.values, torch.float16, (entries, layout.num_kv_heads, layout.head_dim)),
                ("key_norms", self.key_norms, torch.float32, (entries, layout.num_kv_heads)),
                ("value_norms", self.value_norms, torch.float32, (entries, layout.num_kv_heads))):
            check_device_tensor(tensor, f"ring {name}", (dtype,), shape, cache.device)
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
def held_rows(slots, candidates, entry_of_slot_ptr, slot_of_entry_ptr, kv_head, NUM_KV_HEADS: tl.constexpr):
    """(which `candidates` the ring still holds: their slot's entry names that slot; each one's row of its kv
    head in the ring, entry · NUM_KV_HEADS + kv_head: the index of its norm, of its unit row times head_dim;
    which candidates have an entry, held or not: their rows may be loaded before the check is back)."""
    entries = tl.load(entry_of_slot_ptr + slots, mask=candidates, other=-1).to(tl.int64)
    listed = candidates & (entries >= 0)
    held = listed & (tl.load(slot_of_entry_ptr + tl.maximum(entries, 0), mask=listed, other=-1) == slots)
    rows = tl.maximum(entries, 0) * NUM_KV_HEADS + kv_head
    # `& (rows >= 0)` changes nothing but the layouts Triton 3.6 gives `held`: without it the gather kernel
    # fails to compile there ("'arith.xori' op requires the same encoding for all operands and results")
    return held & (rows >= 0), rows, listed


@triton.jit
def ring_unit_rows(ring_ptrs, ring_norm_ptrs, loaded, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """(the ring's unit rows fp16 [rows, HEAD_DIM_PAD] and norms fp32 [rows] at `ring_ptrs` and
    `ring_norm_ptrs`, zero where not `loaded`): finite wherever loaded, since the ring starts zeroed."""
    dims = tl.arange(0, HEAD_DIM_PAD)
    units = tl.load(ring_ptrs[:, None] + dims[None, :], mask=loaded[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    return units, tl.load(ring_norm_ptrs, mask=loaded, other=0.0)


@triton.jit
def with_compressed_rows(units, norms, exact, code_ptrs, norm_ptrs, compressed, centroids_ptr, BITS: tl.constexpr,
                         ROW_BYTES: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, LUT: tl.constexpr):
    """`units` and `norms` with every row but the `exact` ones from its codes, as the split kernels read
    them. Codes are unpacked only in a tile with a `compressed` row: in the window kernel's tiles mostly
    none has."""
    if tl.max(compressed.to(tl.int32), axis=0) > 0:
        levels = load_levels(code_ptrs, compressed, centroids_ptr, BITS, ROW_BYTES, HEAD_DIM_PAD, LUT)
        units = tl.where(exact[:, None], units, levels)
        norms = tl.where(exact, norms, load_norms(norm_ptrs, compressed))
    return units, norms


@triton.jit
def unit_rows(ring_ptrs, ring_norm_ptrs, exact, code_ptrs, norm_ptrs, compressed, centroids_ptr, BITS: tl.constexpr,
              ROW_BYTES: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, LUT: tl.constexpr):
    """(unit rows fp16 [rows, HEAD_DIM_PAD], their norms fp32 [rows]): an exact row from the ring, a compressed
    one from its codes."""
    units, norms = ring_unit_rows(ring_ptrs, ring_norm_ptrs, exact, HEAD_DIM, HEAD_DIM_PAD)
    return with_compressed_rows(units, norms, exact, code_ptrs, norm_ptrs, compressed, centroids_ptr, BITS, ROW_BYTES,
                                HEAD_DIM_PAD, LUT)


@triton.jit
def window_tile(positions, visible, query, running_max, running_sum, acc, cache_ptr, table_ptr, ring_keys_ptr,
                ring_values_ptr, ring_key_norms_ptr, ring_value_norms_ptr, slot_of_entry_ptr, entry_of_slot_ptr,
                key_centroids_ptr, value_centroids_ptr, kv_head, softcap, NUM_KV_HEADS: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, HEAD_PAGE_BYTES: tl.constexpr, VALUES_OFFSET: tl.constexpr,
                KEY_NORMS_OFFSET: tl.constexpr, VALUE_NORMS_OFFSET: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr, KEY_BITS: tl.constexpr, KEY_BYTES: tl.constexpr, KEY_LUT: tl.constexpr,
                VALUE_BITS: tl.constexpr, VALUE_BYTES: tl.constexpr, VALUE_LUT: tl.constexpr,
                USE_SOFTCAP: tl.constexpr):
    """The online softmax state after the `visible` ones of a tile's `positions` (one sequence, one kv head)."""
    positions = tl.maximum(positions, 0)
    blocks = tl.load(table_ptr + positions // BLOCK_SIZE, mask=visible, other=0)
    offsets = positions % BLOCK_SIZE
    exact, ring_rows, listed = held_rows(blocks.to(tl.int64) * BLOCK_SIZE + offsets, visible, entry_of_slot_ptr,
                                         slot_of_entry_ptr, kv_head, NUM_KV_HEADS)
    # the listed rows' keys and values load beside the check of their entries, before either is unpacked
    keys, key_scales = ring_unit_rows(ring_keys_ptr + ring_rows * HEAD_DIM, ring_key_norms_ptr + ring_rows, listed,
                                      HEAD_DIM, HEAD_DIM_PAD)
    values, value_scales = ring_unit_rows(ring_values_ptr + ring_rows * HEAD_DIM, ring_value_norms_ptr + ring_rows,
                                          listed, HEAD_DIM, HEAD_DIM_PAD)
    compressed = visible & ~exact
    page_ptrs = cache_ptr + (blocks.to(tl.int64) * NUM_KV_HEADS + kv_head) * HEAD_PAGE_BYTES
    keys, key_scales = with_compressed_rows(keys, key_scales, exact, page_ptrs + offsets * KEY_BYTES,
                                            page_ptrs + KEY_NORMS_OFFSET + offsets * 4, compressed, key_centroids_ptr,
                                            KEY_BITS, KEY_BYTES, HEAD_DIM_PAD, KEY_LUT)
    values, value_scales = with_compressed_rows(values, value_scales, exact, page_ptrs + VALUES_OFFSET
                                                + offsets * VALUE_BYTES, page_ptrs + VALUE_NORMS_OFFSET + offsets * 4,
                                                compressed, value_centroids_ptr, VALUE_BITS, VALUE_BYTES,
                                                HEAD_DIM_PAD, VALUE_LUT)
    scores = tl.dot(query, tl.trans(keys)) * key_scales[None, :]
    if USE_SOFTCAP:
        scores = softcap * tanh(scores / softcap)
    return masked_softmax_step(scores * 1.4426950408889634, visible[None, :], running_max, running_sum, acc, values,
                               value_scales)


@triton.jit(do_not_specialize_on_alignment=SLICED_METADATA)
def _exact_window_kernel(
    query_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, ring_keys_ptr, ring_values_ptr, ring_key_norms_ptr,
    ring_value_norms_ptr, slot_of_entry_ptr, entry_of_slot_ptr, key_centroids_ptr, value_centroids_ptr, out_ptr,
    lse_ptr,
    stride_query_seq, stride_query_head, stride_table_seq, scale, softcap,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_PAGE_BYTES: tl.constexpr, VALUES_OFFSET: tl.constexpr,
    KEY_NORMS_OFFSET: tl.constexpr, VALUE_NORMS_OFFSET: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, KEY_BITS: tl.constexpr, KEY_BYTES: tl.constexpr, KEY_LUT: tl.constexpr,
    VALUE_BITS: tl.constexpr, VALUE_BYTES: tl.constexpr, VALUE_LUT: tl.constexpr, SINKS: tl.constexpr,
    RECENT: tl.constexpr, SINK_TILE: tl.constexpr, RECENT_TILE: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    PARTS: tl.constexpr,
):
    seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    query, group, heads = load_group_query(query_ptr, seq, kv_head, stride_query_seq, stride_query_head, scale,
                                           GROUP, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    running_max, running_sum, acc = empty_softmax_state(GROUP_PAD, HEAD_DIM_PAD)
    table_ptr = block_table_ptr + seq * stride_table_seq
    sink_tiles: tl.constexpr = (SINKS + SINK_TILE - 1) // SINK_TILE
    for tile in tl.static_range(sink_tiles + (RECENT + RECENT_TILE - 1) // RECENT_TILE):
        if tile < sink_tiles:  # the sinks
            index = tile * SINK_TILE + tl.arange(0, SINK_TILE)
            positions, visible = index, (index < SINKS) & (index < seq_len)
        else:  # the latest tokens, after the sinks
            index = (tile - sink_tiles) * RECENT_TILE + tl.arange(0, RECENT_TILE)
            positions = seq_len - RECENT + index
            visible = (index < RECENT) & (positions >= SINKS)
        if part == (tile >= sink_tiles) * (PARTS - 1):  # PARTS 2: the sinks in program 0, the latest in 1
            running_max, running_sum, acc = window_tile(
                positions, visible, query, running_max, running_sum, acc, cache_ptr, table_ptr, ring_keys_ptr,
                ring_values_ptr, ring_key_norms_ptr, ring_value_norms_ptr, slot_of_entry_ptr, entry_of_slot_ptr,
                key_centroids_ptr, value_centroids_ptr, kv_head, softcap, NUM_KV_HEADS, BLOCK_SIZE, HEAD_PAGE_BYTES,
                VALUES_OFFSET, KEY_NORMS_OFFSET, VALUE_NORMS_OFFSET, HEAD_DIM, HEAD_DIM_PAD, KEY_BITS, KEY_BYTES,
                KEY_LUT, VALUE_BITS, VALUE_BYTES, VALUE_LUT, USE_SOFTCAP)
    rows = (part * tl.num_programs(0) + seq) * NUM_KV_HEADS * GROUP + heads
    head_mask = group < GROUP
    tl.store(out_ptr + rows[:, None] * HEAD_DIM_PAD + dims[None, :], acc / tl.maximum(running_sum, 1e-30)[:, None],
             mask=head_mask[:, None])
    lse = tl.where(running_sum > 0, running_max + tl.log2(tl.maximum(running_sum, 1e-30)), float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=head_mask)


def window_tile_rows(positions: int, head_dim: int) -> int:
    """Rows per tile over `positions` sinks or latest tokens: tl.dot takes at least 16."""
    return min(max(16, triton.next_power_of_2(positions)), WINDOW_TILE if head_dim <= 128 else WIDE_WINDOW_TILE)


def window_launch(head_dim: int) -> dict:
    """The window kernel's launch choices: PARTS programs per (sequence · kv head), warps. Two parts (the
    sinks in one program, the latest tokens in another) halve each program's serial chain of dependent
    loads; they measured the ring's cost per decode step lower than one program per pair (H200, k4v4
    d=128, µs: b1 x 1K 3.4 against 5.2, b8 x 1K 5.4 against 6.9, b32 x 1K 2.1 against 3.7, b8 x 16K 6.5
    against 8.1, b16 x 6K 5.7 against 9.0, b64 x 1K even; benchmarks/results/ring-cost-h200-window-parts.md).
    Two warps, or 128 registers (spilling), cost as much or more."""
    return dict(PARTS=2, num_warps=4)


def exact_window_partials(rotated_query: torch.Tensor, cache: torch.Tensor, codec, ring: ExactRing,
                          block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                          softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each sequence's query (rotated, fp32 [batch, Hq, d], at position seq_len − 1) to its
    sinks and latest tokens → (outputs [parts, batch, Hq, d_pad] fp32 in the rotated space, log-sum-exps
    [parts, batch, Hq] in log2 units): `parts` more splits of `paged_decode_attention`'s. The caller
    checks the arguments."""
    layout = codec.layout
    batch, num_q_heads = rotated_query.shape[:2]
    group = num_q_heads // layout.num_kv_heads
    launch = window_launch(layout.head_dim)
    parts = launch["PARTS"]
    out = torch.empty(parts, batch, num_q_heads, head_dim_pad(layout.head_dim), device=cache.device,
                      dtype=torch.float32)
    lse = torch.empty(parts, batch, num_q_heads, device=cache.device, dtype=torch.float32)
    _exact_window_kernel[(batch, layout.num_kv_heads, parts)](
        rotated_query, cache, block_table, seq_lens, ring.keys, ring.values, ring.key_norms, ring.value_norms,
        ring.slot_of_entry, ring.entry_of_slot,
        codec.key_centroids_fp16, codec.value_centroids_fp16, out, lse, rotated_query.stride(0),
        rotated_query.stride(1), block_table.stride(0), float(scale), float(softcap or 0.0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), **page_constants(layout),
        **lookup_constants(codec), SINKS=ring.sinks, RECENT=ring.recent,
        SINK_TILE=window_tile_rows(ring.sinks, layout.head_dim),
        RECENT_TILE=window_tile_rows(ring.recent, layout.head_dim),
        USE_SOFTCAP=softcap is not None, **launch,
    )
    return out, lse
