"""Launch-config sweep for the decode and extend kernels on the GPU host: byte-permute lookups
(`turboquant/kernels/lut_asm.py`) against the codebook gather, several tile/warps/stages choices,
kernel-only times (do_bench medians, random codes). The chosen defaults live in `decode_launch` and
`extend_launch`. Run: python benchmarks/launch_sweep.py  (writes $OUT/launch-sweep.json, default /tmp/out)."""
import sys, json, os
sys.path.insert(0, ".")
import torch, triton
from turboquant.core import TurboQuantConfig
from turboquant.kernels.codec import KernelCodec
from turboquant.kernels import extend as E
from turboquant.kernels.decode import _decode_split_kernel, default_num_splits
from turboquant.kernels.launch import page_constants, head_dim_pad, lookup_constants
dev = torch.device("cuda")
results = []
OUT = os.environ.get("OUT", "/tmp/out"); os.makedirs(OUT, exist_ok=True)

def setup(batch, ctx, kb, vb, d=128, hkv=8, hq=32, bs=16):
    codec = KernelCodec.from_config(TurboQuantConfig(key_bits=kb, value_bits=vb), d, hkv, bs, device=dev)
    layout = codec.layout
    nblk_seq = ctx // bs
    nb = batch * nblk_seq + 1
    cache = torch.randint(0, 256, layout.cache_shape(nb), dtype=torch.uint8, device=dev)
    _, _, kn, vn = layout.views(cache)
    kn.copy_(torch.rand_like(kn) + 0.5); vn.copy_(torch.rand_like(vn) + 0.5)
    table = (torch.randperm(nb - 1, device=dev)[: batch * nblk_seq] + 1).int().view(batch, nblk_seq)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(batch, hq, d, device=dev)
    return codec, cache, table, seq_lens, q

def decode_run(codec, cache, table, seq_lens, q, tile, warps, stages, splits, lut):
    layout = codec.layout; batch, hq, d = q.shape
    po = torch.empty(batch, hq, splits, head_dim_pad(d), device=dev); pl = torch.empty(batch, hq, splits, device=dev)
    luts = lookup_constants(codec) if lut else dict(KEY_LUT="", VALUE_LUT="")
    def run():
        return _decode_split_kernel[(batch, layout.num_kv_heads, splits)](q, cache, table, seq_lens, codec.key_centroids_fp16, codec.value_centroids_fp16,
            po, pl, q.stride(0), q.stride(1), table.stride(0), 0.088, 0.0, 0, GROUP=hq // layout.num_kv_heads, GROUP_PAD=16,
            NUM_SPLITS=splits, **page_constants(layout), **luts, USE_SOFTCAP=False, USE_WINDOW=False, TILE=tile, num_warps=warps, num_stages=stages)
    return run, po, pl

cases = [(32, 16384, 4, 4), (8, 32768, 4, 4), (32, 32768, 4, 4), (1, 1024, 4, 4), (32, 1024, 4, 4), (32, 16384, 3, 3), (32, 16384, 8, 8)]
configs = [("gather", 128, 4, 2), ("lut", 128, 4, 2), ("lut", 128, 4, 1), ("lut", 64, 4, 2), ("lut", 64, 4, 1), ("lut", 128, 8, 2), ("lut", 64, 8, 2), ("lut", 256, 8, 2), ("lut", 32, 4, 2)]
for batch, ctx, kb, vb in cases:
    codec, cache, table, seq_lens, q = setup(batch, ctx, kb, vb)
    nbytes = batch * ctx * codec.layout.bytes_per_token
    ref = None
    for name, tile, warps, stages in configs:
        if kb == 8 and name == "lut" and (tile, warps, stages) != (128, 4, 2): continue
        splits = default_num_splits(batch, 8, ctx, tile, 132)
        try:
            run, po, pl = decode_run(codec, cache, table, seq_lens, q, tile, warps, stages, splits, name == "lut")
            k = run(); torch.cuda.synchronize()
            w = torch.softmax(pl * 0.6931471805599453, dim=-1)
            out = (po * w[..., None]).sum(2)
            if ref is None: ref = out; err = None
            else: err = ((out - ref).norm() / ref.norm()).item()
            ms = triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")
            row = dict(kernel="decode", case=f"b{batch}x{ctx} k{kb}v{vb}", variant=name, tile=tile, warps=warps, stages=stages, splits=splits,
                       ms=round(ms, 4), gbps=round(nbytes / ms / 1e6), regs=k.n_regs, spills=k.n_spills, err=err)
        except Exception as e:
            row = dict(kernel="decode", case=f"b{batch}x{ctx} k{kb}v{vb}", variant=name, tile=tile, warps=warps, stages=stages, error=repr(e)[:400])
        results.append(row); print(row, flush=True); json.dump(results, open(os.path.join(OUT, 'launch-sweep.json'), 'w'), indent=1)

# extend: 16K prefix, chunk 512/2048: lut vs gather and launch configs
for chunk in (512, 2048):
    for kb in (4, 3):
        codec, cache, table, seq_lens, _ = setup(1, 16384 + chunk, kb, kb)
        seq_lens = torch.tensor([16384 + chunk], dtype=torch.int32, device=dev)
        starts = torch.tensor([0, chunk], dtype=torch.int32, device=dev)
        q = torch.randn(chunk, 32, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(chunk, 8, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
        ref = None
        for name, launch in [("gather", dict(ROWS=256, TILE=64, num_warps=8, num_stages=1)), ("lut", dict(ROWS=256, TILE=64, num_warps=8, num_stages=1)),
                             ("lut", dict(ROWS=128, TILE=64, num_warps=8, num_stages=1)), ("lut", dict(ROWS=128, TILE=64, num_warps=4, num_stages=1)),
                             ("lut", dict(ROWS=64, TILE=64, num_warps=4, num_stages=1)), ("lut", dict(ROWS=128, TILE=32, num_warps=4, num_stages=1)),
                             ("lut", dict(ROWS=128, TILE=128, num_warps=8, num_stages=1)), ("lut", dict(ROWS=64, TILE=128, num_warps=4, num_stages=1))]:
            orig_l, orig_e = E.lookup_constants, E.extend_launch
            if name == "gather": E.lookup_constants = lambda codec, bits=(): dict(KEY_LUT="", VALUE_LUT="")
            E.extend_launch = lambda *a, launch=launch: dict(launch)
            try:
                run = lambda: E.extend_attention(q, k, v, starts, seq_lens, cache, codec, table, 0.088, chunk)
                out = run(); torch.cuda.synchronize()
                if ref is None: ref = out.float(); err = None
                else: err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = triton.testing.do_bench(run, warmup=20, rep=200, return_mode="median")
                row = dict(kernel="extend", case=f"prefix16384 chunk{chunk} k{kb}v{kb}", variant=name, **launch, ms=round(ms, 4), err=err)
            except Exception as e:
                row = dict(kernel="extend", case=f"prefix16384 chunk{chunk} k{kb}v{kb}", variant=name, **launch, error=repr(e)[:300])
            E.lookup_constants, E.extend_launch = orig_l, orig_e
            results.append(row); print(row, flush=True); json.dump(results, open(os.path.join(OUT, 'launch-sweep.json'), 'w'), indent=1)
