"""Argument checks shared by the kernel wrappers: every bad input is a ValueError before launch,
never an illegal memory access after it."""

from __future__ import annotations

import os

import torch
import triton

from ..core.paged_layout import PagedLayout
from .codec import KernelCodec
from .lut_asm import LUT_BITS, byte_permute_available

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Per-step metadata that a serving engine hands over as slices (seq_lens[num_decodes:], a group's starts).
# Triton specializes pointer arguments on 16-byte alignment, so a slice at a new offset compiles a new
# kernel variant in the middle of serving, seconds each. These are read a scalar or a gathered tile at a
# time: alignment buys them nothing.
SLICED_METADATA = ("block_table_ptr", "seq_lens_ptr", "query_start_ptr", "key_start_ptr", "key_starts_ptr")


def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device; 132 (an H100) for the CPU interpreter, where it only shapes the grid."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def programmatic_launch_available(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper on): a kernel may start while the one before it in the
    stream still runs, and wait for it (`gdc_wait`) only where it reads that kernel's output. Not in
    the Triton interpreter."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def programmatic_launch(enabled: bool) -> dict:
    """Triton launch options for a kernel launched by programmatic dependent launch when `enabled` (the
    kernel must then `gdc_wait` before reading what the kernel before it writes)."""
    return dict(launch_pdl=True) if enabled else {}


def head_dim_pad(head_dim: int) -> int:
    return triton.next_power_of_2(head_dim)


def page_constants(layout: PagedLayout) -> dict:
    """The constexpr arguments every kernel takes to address a page and its codes."""
    return dict(
        NUM_KV_HEADS=layout.num_kv_heads, BLOCK_SIZE=layout.block_size, HEAD_PAGE_BYTES=layout.head_page_bytes,
        VALUES_OFFSET=layout.values_offset, KEY_NORMS_OFFSET=layout.key_norms_offset,
        VALUE_NORMS_OFFSET=layout.value_norms_offset, HEAD_DIM=layout.head_dim,
        HEAD_DIM_PAD=head_dim_pad(layout.head_dim), KEY_BITS=layout.key_bits, KEY_BYTES=layout.key_bytes,
        VALUE_BITS=layout.value_bits, VALUE_BYTES=layout.value_bytes,
    )


def lookup_constants(codec: KernelCodec, bits: tuple[int, ...] = LUT_BITS, table_inputs: bool = False) -> dict:
    """How the attention kernels turn indices into levels: byte-permute PTX for codes of `bits` bits
    (see `lut_asm.py`; `table_inputs`: the form that takes the table words as inputs), else "" (gather
    from the fp16 codebook)."""
    available = byte_permute_available(codec.device)
    form = "table_lut_asm" if table_inputs else "lut_asm"

    def lut(role: str) -> str:
        wanted = available and getattr(codec.layout, f"{role}_bits") in bits
        return getattr(codec, f"{role}_{form}") if wanted else ""
    return dict(KEY_LUT=lut("key"), VALUE_LUT=lut("value"))


def check_device_tensor(tensor, name: str, dtypes, shape, device: torch.device) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, the cache on {device}")
    if tensor.numel() and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def check_kv(keys: torch.Tensor, values: torch.Tensor, layout: PagedLayout, device: torch.device) -> None:
    shape = (keys.shape[0] if isinstance(keys, torch.Tensor) else 0, layout.num_kv_heads, layout.head_dim)
    for name, tensor in (("keys", keys), ("values", values)):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
            raise ValueError(f"{name} must be a [tokens, {layout.num_kv_heads}, {layout.head_dim}] tensor")
        check_device_tensor(tensor, name, FLOAT_DTYPES, shape, device)


def check_attention_options(sliding_window: int | None, softcap: float | None, key_starts: torch.Tensor | None,
                            out: torch.Tensor | None, batch: int, query_shape, device: torch.device) -> None:
    """The options decode and extend attention share: a window and a soft-cap must be positive, key starts
    int32 [batch], `out` the query's shape."""
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be a positive number of tokens or None, got {sliding_window!r}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive or None, got {softcap!r}")
    if key_starts is not None:
        check_device_tensor(key_starts, "key_starts", (torch.int32,), (batch,), device)
    if out is not None:
        check_device_tensor(out, "out", FLOAT_DTYPES, query_shape, device)


def check_codec_device(codec, cache: torch.Tensor) -> None:
    if codec.device != cache.device:
        raise ValueError(f"the codec's tensors are on {codec.device}, the cache on {cache.device}")


def check_block_table(block_table: torch.Tensor, seq_lens: torch.Tensor, batch: int, device: torch.device) -> None:
    check_device_tensor(seq_lens, "seq_lens", (torch.int32,), (batch,), device)
    if not isinstance(block_table, torch.Tensor) or block_table.ndim != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be an int32 tensor [{batch}, max_blocks_per_seq]")
    check_device_tensor(block_table, "block_table", (torch.int32,), None, device)
    if block_table.shape[1] == 0:
        raise ValueError("block_table has no columns")
