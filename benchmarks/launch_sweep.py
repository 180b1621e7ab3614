"""Launch-config sweep for the decode kernel on the GPU host: byte-permute lookups
(`turboquant/kernels/lut_asm.py`) against the codebook gather, several tile/warps/stages choices,
kernel-only times (do_bench medians, random codes). The chosen defaults live in `decode_launch` (the
extend kernel's sweep: `extend_launch.py`). First, whole decode calls at short contexts with
`num_splits` fixed (`--only-splits`: just those), against `default_num_splits`, which never makes a
split shorter than two tiles.

    python benchmarks/launch_sweep.py --out /tmp/out/launch-sweep.json [--only-splits]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from kernels import BLOCK_SIZE, block_table_for, graph_time_ms, random_compressed_cache  # benchmarks/kernels.py

from turboquant.core import TurboQuantConfig  # noqa: E402 (kernels.py puts the repository on sys.path)
from turboquant.kernels.codec import KernelCodec  # noqa: E402
from turboquant.kernels.decode import (ANY_SPAN, _decode_split_kernel, decode_launch,  # noqa: E402
                                       default_num_splits, paged_decode_attention)
from turboquant.kernels.launch import head_dim_pad, lookup_constants, page_constants  # noqa: E402

HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS = 128, 8, 32  # Llama-3.1-8B attention
GATHER = dict(KEY_LUT="", VALUE_LUT="")
DECODE_CASES = [(32, 16384, 4, 4), (8, 32768, 4, 4), (32, 32768, 4, 4), (1, 1024, 4, 4), (32, 1024, 4, 4),
                (32, 16384, 3, 3), (32, 16384, 8, 8)]
DECODE_CONFIGS = [("gather", 128, 4, 2), ("lut", 128, 4, 2), ("lut", 128, 4, 1), ("lut", 64, 4, 2), ("lut", 64, 4, 1),
                  ("lut", 128, 8, 2), ("lut", 64, 8, 2), ("lut", 256, 8, 2), ("lut", 32, 4, 2)]


def make_codec(key_bits: int, value_bits: int) -> KernelCodec:
    config = TurboQuantConfig(key_bits=key_bits, value_bits=value_bits)
    return KernelCodec.from_config(config, HEAD_DIM, NUM_KV_HEADS, BLOCK_SIZE, device="cuda")


def decode_rows(batch: int, context: int, key_bits: int, value_bits: int) -> list[dict]:
    codec = make_codec(key_bits, value_bits)
    table, seq_lens, num_blocks = block_table_for(batch, context)
    cache = random_compressed_cache(codec, num_blocks)
    query = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda")
    compressed_bytes = batch * context * codec.layout.bytes_per_token
    rows, reference = [], None
    for lookup, tile, warps, stages in DECODE_CONFIGS:
        if key_bits == 8 and lookup == "lut" and (tile, warps, stages) != (128, 4, 2):
            continue  # 8-bit codes always gather: one lut row suffices
        row = dict(kernel="decode", case=f"b{batch}x{context} k{key_bits}v{value_bits}", variant=lookup, tile=tile,
                   warps=warps, stages=stages)
        splits = default_num_splits(batch, NUM_KV_HEADS, context, tile, 132)
        partial_out = torch.empty(batch, NUM_Q_HEADS, splits, head_dim_pad(HEAD_DIM), device="cuda")
        partial_lse = torch.empty(batch, NUM_Q_HEADS, splits, device="cuda")
        lookups = lookup_constants(codec, table_inputs=True) if lookup == "lut" else GATHER
        token_rows = decode_launch(HEAD_DIM, key_bits, value_bits, lookup == "lut")["TOKEN_ROWS"]

        def run():
            return _decode_split_kernel[(batch, NUM_KV_HEADS, splits)](
                query, cache, table, seq_lens, seq_lens, codec.key_centroids_fp16, codec.value_centroids_fp16,
                codec.lut_lane_tables, partial_out, partial_lse, query.stride(0), query.stride(1), table.stride(0),
                HEAD_DIM**-0.5, 0.0, 0, 0, ANY_SPAN, GROUP=NUM_Q_HEADS // NUM_KV_HEADS, GROUP_PAD=16,
                NUM_SPLITS=splits, PARTIAL_SPLITS=splits,
                **page_constants(codec.layout),
                **lookups, USE_SOFTCAP=False, USE_WINDOW=False, USE_STARTS=False, TILE=tile, REDUCTION_NEXT=False,
                READERS_NEXT=False, WAIT_FOR_QUERY=False, TOKEN_ROWS=token_rows, num_warps=warps,
                num_stages=stages)
        try:
            kernel = run()
            weights = torch.softmax(partial_lse * 0.6931471805599453, dim=-1)  # lse is in log2 units
            out = (partial_out * weights[..., None]).sum(2)
            reference = out if reference is None else reference
            ms = triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")
            row.update(splits=splits, ms=round(ms, 4), gbps=round(compressed_bytes / ms / 1e6), regs=kernel.n_regs,
                       spills=kernel.n_spills, err=((out - reference).norm() / reference.norm()).item())
        except Exception as error:  # a config that does not compile is a row, not the end of the sweep
            row.update(error=repr(error)[:400])
        rows.append(row)
        print(row, flush=True)
    return rows


SPLIT_CASES = [(1, 1024), (8, 1024), (1, 4096), (8, 4096)]  # short contexts, where decode trails FA3
SPLIT_COUNTS = (4, 8, 16, 32, 64)


def decode_split_rows(batch: int, context: int) -> list[dict]:
    """Whole `paged_decode_attention` calls (rotations and reduction included, CUDA graph as in kernels.py)
    at k4v4 with num_splits fixed, beside the default: splits of one tile were not tried before."""
    codec = make_codec(4, 4)
    table, seq_lens, num_blocks = block_table_for(batch, context)
    cache = random_compressed_cache(codec, num_blocks)
    query = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    rows = []
    for splits in (None, *SPLIT_COUNTS):
        ms = graph_time_ms(lambda: paged_decode_attention(query, cache, codec, table, seq_lens, HEAD_DIM**-0.5,
                                                          num_splits=splits))
        rows.append(dict(kernel="decode-call", case=f"b{batch}x{context} k4v4", splits=splits or "default",
                         ms=round(ms, 4)))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/out/launch-sweep.json"))
    parser.add_argument("--only-splits", action="store_true", help="only the num_splits sweep at short contexts")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in SPLIT_CASES:
        rows += decode_split_rows(*case)
        args.out.write_text(json.dumps(rows, indent=1))
    if args.only_splits:
        return
    for case in DECODE_CASES:
        rows += decode_rows(*case)
        args.out.write_text(json.dumps(rows, indent=1))  # partial results survive a timeout


if __name__ == "__main__":
    main()
