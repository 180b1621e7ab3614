"""A/B of the 3-bit code loader on the GPU, one process per side (Triton compiles a loader into each
kernel on first use, so the baseline is patched in before anything compiles):

- `--baseline`: the previous `packed_tile._groups3`, kept here only for this comparison: each 3-byte
  group of eight indices funnel-shifted out of the two words it touches (two masked word loads per group);
- default: the current one, which loads each word of a 12-byte triple once and cuts four groups out of it.

Times paged decode attention (Llama-3.1-8B attention, random codes, CUDA-graph replays as in
`kernels.py`) and, on the current loader only, the weight GEMV at 3 bits with byte-permute lookups
against codebook gathers (batch 1: the committed results timed the tensor-core kernel; batch 1 now
runs the FMA kernel, which cuts its 3-bit runs in `packed_tile.load_runs` and is not patched by
`--baseline`).

    python benchmarks/three_bit_words.py --baseline OUT-baseline.json && python benchmarks/three_bit_words.py OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from turboquant.kernels import packed_tile  # noqa: E402

DECODE_CASES = [(32, 16384, 3, 3), (8, 32768, 3, 3), (32, 4096, 3, 3), (32, 16384, 4, 3), (32, 16384, 4, 4)]
GEMV_SHAPES = [(4096, 4096), (4096, 14336)]


@triton.jit
def _groups3_baseline(row_ptrs, row_mask, ROW_BYTES: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    groups = tl.arange(0, HEAD_DIM_PAD // 8)
    words = groups * 3 // 4
    low = packed_tile._load_words(row_ptrs, row_mask, words, ROW_BYTES, False)
    high = packed_tile._load_words(row_ptrs, row_mask, words + 1, ROW_BYTES, False)
    shift = (groups * 3) % 4 * 8
    low = low.to(tl.uint32, bitcast=True) >> shift[None, :].to(tl.uint32)
    high = tl.where(shift[None, :] == 0, 0, high.to(tl.uint32, bitcast=True) << (32 - shift[None, :]).to(tl.uint32))
    return ((low | high) & 0xFFFFFF).to(tl.int32, bitcast=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--baseline", action="store_true", help="time the previous loader")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    if args.baseline:
        packed_tile._groups3 = _groups3_baseline
    from kernels import BLOCK_SIZE, block_table_for, graph_time_ms, random_compressed_cache
    from weights_gemv import copies_past_l2, per_call_ms

    from turboquant.core import TurboQuantConfig
    from turboquant.kernels.codec import KernelCodec
    from turboquant.kernels.decode import paged_decode_attention
    from turboquant.weights import TQLinear, gemv

    rows = []
    for batch, context, key_bits, value_bits in DECODE_CASES:
        config = TurboQuantConfig(key_bits=key_bits, value_bits=value_bits)
        codec = KernelCodec.from_config(config, 128, 8, BLOCK_SIZE, device="cuda")
        table, seq_lens, num_blocks = block_table_for(batch, context)
        cache = random_compressed_cache(codec, num_blocks)
        query = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
        ms = graph_time_ms(lambda: paged_decode_attention(query, cache, codec, table, seq_lens, 128**-0.5))
        rows.append(dict(kind="decode", loader="baseline" if args.baseline else "current",
                         case=f"b{batch}x{context} k{key_bits}v{value_bits}", ms=ms))
        print(json.dumps(rows[-1]), flush=True)
        del cache
    if not args.baseline:
        for lookup_bits in [(3, 4), (4,)]:
            gemv.LOOKUP_BITS = lookup_bits
            gemv.device_codec.cache_clear()
            for in_features, out_features in GEMV_SHAPES:
                layer = TQLinear.from_weight(torch.randn(out_features, in_features, device="cuda") * 0.02, None, 3, 128)
                copies = [(layer.packed.clone(), layer.norms.clone())
                          for _ in range(copies_past_l2(layer.packed.numel(), 256))]
                x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
                ms = per_call_ms([lambda p=p, n=n: gemv.codes_gemv(x, p, n, layer.quantizer) for p, n in copies])
                rows.append(dict(kind="gemv-tq3-batch1", lookup="byte permute" if 3 in lookup_bits else "gather",
                                 shape=f"{in_features}x{out_features}", ms=ms))
                print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
