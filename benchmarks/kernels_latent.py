"""MLA latent kernels on the GPU at DeepSeek-V2-Lite's latent (kv_c 512 + k_pe 64, 16 heads, block 16,
4-bit): decode as the vLLM backend calls it (q already rotated, `rotated=True`), the query rotation the
HF path adds, the store of one decode step (32 tokens) and of a prefill chunk (8192), and the gather of a
24K-token context. Each timing is a CUDA-graph replay average (µs); random codes, fixed norms.

    python benchmarks/kernels_latent.py --out benchmarks/results/kernels-latent-h100
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch

from turboquant.core import TurboQuantConfig
from turboquant.kernels.latent import LatentCodec, latent_decode, latent_gather, latent_store
from turboquant.kernels.rotate import rotate

MAX_MODEL_LEN = 33024  # the vLLM benchmark's: the block table's width sets decode's split count


def replay_us(fn, replays: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / replays * 1000, 1)


def random_cache(layout, num_blocks: int) -> torch.Tensor:
    cache = layout.allocate(num_blocks, "cuda")
    cache.random_(0, 255)
    cache[:, layout.norms_offset:layout.rope_offset].view(torch.float32).fill_(10.0)
    cache[:, layout.rope_offset:].view(torch.bfloat16).normal_()
    return cache


def measure() -> dict:
    codec = LatentCodec.from_config(TurboQuantConfig(key_bits=4, value_bits=4), 512, 64, 16, torch.bfloat16, 1,
                                    "cuda")
    layout, rows = codec.layout, {}
    for batch, context in [(1, 1024), (32, 1024), (16, 6144), (4, 32768)]:
        used = batch * (context // 16)
        cache = random_cache(layout, used + 4)
        table = torch.zeros(batch, MAX_MODEL_LEN // 16, dtype=torch.int32, device="cuda")
        table[:, : context // 16] = torch.randperm(used + 4, device="cuda")[:used].view(batch, -1).to(torch.int32)
        seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        q_latent = torch.randn(16, batch, 512, device="cuda", dtype=torch.bfloat16).transpose(0, 1)  # as vLLM's bmm
        q_pe = torch.randn(batch, 16, 64, device="cuda", dtype=torch.bfloat16)
        rows[f"decode b{batch} x {context}"] = replay_us(
            lambda: latent_decode(q_latent, q_pe, cache, codec, table, seq_lens, 0.1, rotated=True))
        rows[f"rotate q b{batch}"] = replay_us(lambda: rotate(q_latent, codec))
    for tokens in (32, 8192):
        cache = layout.allocate(tokens // 16 + 4, "cuda")
        kv = torch.randn(tokens, 576, device="cuda", dtype=torch.bfloat16)  # kv_c | k_pe, as vLLM's projection
        slots = torch.arange(tokens, device="cuda")
        rows[f"store {tokens} tokens"] = replay_us(lambda: latent_store(kv[:, :512], kv[:, 512:], slots, cache, codec))
    context = 24576
    cache = random_cache(layout, context // 16 + 4)
    table = torch.arange(context // 16, device="cuda", dtype=torch.int32)[None]
    cu_seq_lens = torch.tensor([0, context], dtype=torch.int32, device="cuda")
    workspace = torch.empty(context, 576, device="cuda", dtype=torch.bfloat16)
    starts = torch.zeros(1, dtype=torch.int32, device="cuda")
    rows[f"gather {context} tokens"] = replay_us(
        lambda: latent_gather(cache, codec, table, cu_seq_lens, context, workspace[:, :512], workspace[:, 512:],
                              starts), 10)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "us": measure()}
    table = "\n".join(f"| {name} | {us} |" for name, us in result["us"].items())
    markdown = (f"# MLA latent kernels ({result['device']}, {result['date']})\n\n"
                "DeepSeek-V2-Lite's latent (512 + 64, 16 heads, block 16), 4-bit kv_c; CUDA-graph replays.\n\n"
                f"| kernel | µs |\n|---|---|\n{table}\n")
    print(markdown)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown)


if __name__ == "__main__":
    main()
