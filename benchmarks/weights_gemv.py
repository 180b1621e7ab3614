"""Weight GEMV (CUDA): `codes_gemv` over TQ3/TQ4 codes side by side with bf16 cuBLAS
(`torch.nn.functional.linear`) on Llama-3.1-8B's Linear shapes, batch 1 and a few small batches.

    python benchmarks/weights_gemv.py [--sweep fma|mma|both] [--out benchmarks/results/weights-h200]

Times as in `benchmarks/kernels.py` (one CUDA-graph replay of back-to-back calls, median of 5), with one
difference: each replay walks through enough distinct copies of the layer that they do not fit in L2
(`--stream-mib` per engine), so the weights come from HBM as in a real decode step, where every layer
is another weight. The input rotation (one launch) is included in ours. Weights are random: speed does
not depend on them. The main table uses the default kernel and tiling (`gemv_launch`); at batches where
the choice between the FMA and tensor-core kernels is made it also times the other one. `--sweep` times
the tilings of `sweep_launches` (at `--sweep-batches`), of one kernel or both, and says which was fastest
per shape, bits and batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import graph_time_ms  # noqa: E402

from turboquant.kernels.launch import multiprocessor_count  # noqa: E402
from turboquant.weights import TQLinear  # noqa: E402
from turboquant.kernels.rotate import rotate  # noqa: E402
from turboquant.weights.gemv import FMA_MAX_BATCH, GemvLaunch, codes_gemv, device_codec, gemv_launch  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in_features, out_features)
# (rows per program, groups per loop step, warps, pipeline stages) tried by --sweep for the tensor-core
# kernel, each at about 1, 2 and 4 programs per SM (splits along the groups). Earlier sweeps on an H200
# (rows 16-256, steps 1-8, at batch 1) found 64 rows fastest for every shape and bits.
SWEEP_TILES = [(64, 1, 4, 1), (64, 2, 4, 1), (64, 4, 4, 1), (128, 1, 4, 1), (128, 2, 8, 1), (32, 4, 4, 1),
               (64, 2, 8, 1)]
# the same for the FMA kernel (one pipeline stage: it has no dot for Triton to pipeline)
SWEEP_FMA_TILES = [(rows, step, warps, 1) for rows in (2, 4, 8) for step in (4, 8, 16) for warps in (1, 2, 4)]


def copies_past_l2(nbytes: int, stream_mib: int) -> int:
    return max(2, math.ceil(stream_mib * 2**20 / nbytes))


def per_call_ms(calls) -> float:
    """Time of one call, from a graph that makes every call of `calls` in turn."""
    return graph_time_ms(lambda: [call() for call in calls]) / len(calls)


def sweep_launches(layer: TQLinear, num_sms: int, kernels: str, batch: int) -> list[GemvLaunch]:
    """The tilings --sweep times at `batch`: the tensor-core ones with each batch tile that holds it."""
    groups = layer.in_features // layer.group_size
    launches = []
    tiles = ([(tile, True) for tile in SWEEP_TILES] if kernels in ("mma", "both") else []) + (
        [(tile, False) for tile in SWEEP_FMA_TILES] if kernels in ("fma", "both") else [])
    for (rows, step, warps, stages), tensor_cores in tiles:
        row_programs = math.ceil(layer.out_features / rows)
        for per_sm in (1, 2, 4):
            splits = max(1, min(groups // step, round(per_sm * num_sms / row_programs)))
            batch_tiles = ((16, 32) if batch <= 16 else (32,)) if tensor_cores else (None,)
            launches += [GemvLaunch(rows, step, splits, warps, stages, tensor_cores, batch_tile)
                         for batch_tile in batch_tiles]
    return list(dict.fromkeys(launches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--bits", default="3,4")
    parser.add_argument("--stream-mib", type=int, default=256, help="bytes of weights each engine walks per replay")
    parser.add_argument("--sweep", choices=("fma", "mma", "both"),
                        help="also time the tilings of sweep_launches: of the FMA kernel, the tensor-core kernel "
                             "or both")
    parser.add_argument("--sweep-batches", default="1", help="the batches --sweep times, comma-separated")
    parser.add_argument("--shapes", default=",".join(f"{i}x{o}" for i, o in SHAPES), help="in x out, comma-separated")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.manual_seed(0)
    sweep_batches = set(map(int, args.sweep_batches.split(",")))
    rows, sweep = [], []
    for in_features, out_features in (tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")):
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
        weights = [weight.clone() for _ in range(copies_past_l2(weight.numel() * 2, args.stream_mib))]
        for bits in map(int, args.bits.split(",")):
            layer = TQLinear.from_weight(weight, None, bits, args.group_size)
            codes_bytes = layer.packed.numel() + layer.norms.numel() * 2
            layers = [(layer.packed.clone(), layer.norms.clone()) for _ in range(copies_past_l2(codes_bytes, args.stream_mib))]
            reference = layer.dequantize()
            for batch in map(int, args.batches.split(",")):
                x = torch.randn(batch, in_features, device="cuda", dtype=torch.bfloat16)
                want = nn.functional.linear(x.float(), reference)

                def timed(launch=None):
                    got = codes_gemv(x, layer.packed, layer.norms, layer.quantizer, None, launch).float()
                    ms = per_call_ms([lambda p=p, n=n: codes_gemv(x, p, n, layer.quantizer, None, launch)
                                      for p, n in layers])
                    return ms, ((got - want).norm() / want.norm()).item()
                ours, error = timed()
                cublas = per_call_ms([lambda w=w: nn.functional.linear(x, w) for w in weights])
                grouped = x.reshape(batch, -1, args.group_size)
                rotated = torch.empty(grouped.shape, dtype=torch.float16, device="cuda")
                rotation = device_codec(layer.quantizer, x.device).rotation
                rotate_ms = graph_time_ms(lambda: rotate(grouped, rotation, out=rotated))
                launch = gemv_launch(out_features, in_features // args.group_size, args.group_size, batch,
                                     multiprocessor_count(x.device), bits=bits)
                # the other kernel's default tiling at this batch, where the choice between them is made
                other = gemv_launch(out_features, in_features // args.group_size, args.group_size, batch,
                                    multiprocessor_count(x.device), bits=bits, tensor_cores=not launch.tensor_cores)
                other_ms = timed(other)[0] if batch <= 2 * FMA_MAX_BATCH else None
                rows.append(dict(shape=f"{in_features}x{out_features}", bits=bits, batch=batch, ours_ms=round(ours, 4),
                                 bf16_cublas_ms=round(cublas, 4), speedup=round(cublas / ours, 3),
                                 relative_error_vs_reference=error, launch=vars(launch),
                                 input_rotation_ms=round(rotate_ms, 4),
                                 other_kernel_ms=None if other_ms is None else round(other_ms, 4)))
                print(json.dumps(rows[-1]), flush=True)
                if args.sweep and batch in sweep_batches:
                    for candidate in sweep_launches(layer, multiprocessor_count(x.device), args.sweep, batch):
                        try:
                            ms, error = timed(candidate)
                        except OutOfResources as reason:  # a tile too large for shared memory
                            print(f"skipped {candidate}: {reason}", flush=True)
                            continue
                        sweep.append(dict(shape=f"{in_features}x{out_features}", bits=bits, batch=batch,
                                          launch=vars(candidate), ms=round(ms, 4), speedup=round(cublas / ms, 3),
                                          relative_error_vs_reference=error))
                        print(json.dumps(sweep[-1]), flush=True)
            del layers
    result = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
              "group_size": args.group_size, "stream_mib": args.stream_mib, "rows": rows, "sweep": sweep}
    lines = [f"# Weight GEMV ({result['device']}, {result['date']}), group size {args.group_size}", "",
             f"Each replay streams {args.stream_mib} MiB of weights per engine (distinct copies, past L2). "
             "Ours includes the input rotation.", "",
             "kernel: fma (CUDA cores, one program per input row) or mma (tensor cores); other kernel ms: the other "
             "one's default tiling at the same batch.", "",
             "| shape (in x out) | bits | batch | kernel | ours ms | of which input rotation ms | other kernel ms "
             "| bf16 cuBLAS ms | speedup | rel. error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['bits']} | {r['batch']} | {'mma' if r['launch']['tensor_cores'] else 'fma'} "
              f"| {r['ours_ms']} | {r['input_rotation_ms']} | {r['other_kernel_ms'] or '—'} | {r['bf16_cublas_ms']} "
              f"| {r['speedup']}x | {r['relative_error_vs_reference']:.1e} |" for r in rows]
    if sweep:
        lines += ["", "Fastest tiling per shape, bits and batch (`--sweep`):", "",
                  "| shape | bits | batch | kernel | rows | step groups | splits | warps | stages | batch tile | ms "
                  "| speedup |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in sorted({(s["shape"], s["bits"], s["batch"]) for s in sweep}):
            best = min((s for s in sweep if (s["shape"], s["bits"], s["batch"]) == key), key=lambda s: s["ms"])
            launch = best["launch"]
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {'mma' if launch['tensor_cores'] else 'fma'} | {launch['rows']} | "
                         f"{launch['step_groups']} | {launch['splits']} | "
                         f"{launch['num_warps']} | {launch['num_stages']} | {launch.get('batch_tile') or '—'} | "
                         f"{best['ms']} | {best['speedup']}x |")
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
