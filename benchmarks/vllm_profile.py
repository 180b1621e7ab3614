"""Where vLLM's time goes, per engine: prefill-only vs whole-generate timings and the top CUDA kernels
(torch.profiler, engine in-process) for a few batch × prompt → output cases, Llama-3.1-8B shape, dummy
weights, CUDA graphs on. This is what showed compress-store taking 30% of our GPU time (fixed since).

    python benchmarks/vllm_profile.py ENGINE OUT.json [--cases 32x1024x128,16x6144x128]

decode_step_ms = (whole − prefill-only) / (output − 1); the kernel table covers a 24-token generate, and
`decode_step` is each kernel's time per decode step: (its time in that generate − in a profiled 1-token
generate) / 23. Beside it, the same difference of the device's timeline: `span_us` from the first kernel's
start to the last one's end, `busy_us` the time some kernel (or copy) ran, and `idle_us` the rest: a step
whose kernels sum to less than its time either overlaps them (span < sum) or waits for the host (idle).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the profiler must see the engine's kernels
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vllm_engines import dummy_weight_engine, random_prompts  # noqa: E402

PROFILED_TOKENS = 24


def kernel_times(prof) -> dict[str, tuple[float, int]]:
    """kernel name → (µs on the device, calls)."""
    return {event.key[:110]: (event.self_device_time_total, event.count) for event in prof.key_averages()
            if "CUDA" in str(getattr(event, "device_type", ""))}


def device_timeline(prof) -> tuple[float, float]:
    """(µs from the first device event's start to the last one's end, µs some device event ran)."""
    from torch.autograd import DeviceType

    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)
    busy, covered = 0.0, -math.inf
    for start, end in intervals:
        if end > covered:
            busy += end - max(start, covered)
            covered = end
    return (intervals[-1][1] - intervals[0][0], busy) if intervals else (0.0, 0.0)


def kernel_table(times: dict[str, tuple[float, int]], top: int = 30) -> dict:
    rows = sorted(((t, n, k) for k, (t, n) in times.items()), reverse=True)
    return {"kernel_ms_total": round(sum(r[0] for r in rows) / 1e3, 1),
            "top": [{"ms": round(t / 1e3, 2), "calls": n, "kernel": k} for t, n, k in rows[:top]]}


def decode_step_table(whole: dict[str, tuple[float, int]], prefill: dict[str, tuple[float, int]],
                      steps: int, top: int = 20) -> dict:
    """Per decode step: each kernel's time and calls in `whole` less those in `prefill`, over `steps`."""
    rows = []
    for key, (time_us, calls) in whole.items():
        base_us, base_calls = prefill.get(key, (0.0, 0))
        rows.append(((time_us - base_us) / steps, (calls - base_calls) / steps, key))
    rows.sort(reverse=True)
    return {"step_kernel_us": round(sum(r[0] for r in rows), 1),
            "top": [{"us": round(t, 1), "calls": round(n, 1), "kernel": k} for t, n, k in rows[:top]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", help="an engine name from vllm_engines.ENGINES")
    parser.add_argument("out", help="OUT.json")
    parser.add_argument("--model", default="/tmp/models/llama8b-shape")
    parser.add_argument("--cases", default="32x1024x128,16x6144x128", help="BATCHxPROMPTxOUTPUT, comma list")
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    start = time.perf_counter()
    llm = dummy_weight_engine(args.engine, args.model)
    config = llm.llm_engine.vllm_config
    result = {"engine": args.engine, "device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
              "startup_s": round(time.perf_counter() - start, 1),
              "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
              "cudagraph_mode": str(config.compilation_config.cudagraph_mode)}
    rng = random.Random(0)

    def generate(batch_prompts, tokens):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        llm.generate(batch_prompts, SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0), use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - begin

    for case in args.cases.split(","):
        batch, length, output = map(int, case.split("x"))
        generate(random_prompts(rng, batch, length), output)  # warm-up: the same schedule, other prompts
        prefill = generate(random_prompts(rng, batch, length), 1)
        whole = generate(random_prompts(rng, batch, length), output)
        row = {"prefill_s": round(prefill, 3), "whole_s": round(whole, 3),
               "decode_step_ms": round((whole - prefill) / (output - 1) * 1e3, 2)}
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            row["profiled_wall_s"] = round(generate(random_prompts(rng, batch, length), PROFILED_TOKENS), 3)
        whole_times, whole_timeline = kernel_times(prof), device_timeline(prof)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate(random_prompts(rng, batch, length), 1)
        row.update(kernel_table(whole_times))
        row["decode_step"] = decode_step_table(whole_times, kernel_times(prof), PROFILED_TOKENS - 1)
        span, busy = ((a - b) / (PROFILED_TOKENS - 1) for a, b in zip(whole_timeline, device_timeline(prof)))
        row["decode_step"].update(span_us=round(span, 1), busy_us=round(busy, 1), idle_us=round(span - busy, 1))
        print(f"  decode step device timeline: span {span:.1f} us, busy {busy:.1f}, idle {span - busy:.1f}",
              flush=True)
        result[f"b{batch}x{length}->{output}"] = row
        print(case, json.dumps({k: v for k, v in row.items() if k not in ("top", "decode_step")}), flush=True)
        for kernel in row["decode_step"]["top"][:12]:
            print(f"  decode step: {kernel['us']:8.1f} us {kernel['calls']:6.1f} calls  {kernel['kernel']}", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
