"""KV capacity and output throughput in vLLM: a Llama-3.1-8B-shaped model with dummy weights, CUDA graphs
on, one engine per subprocess, every engine under the same memory budget, side by side in one run.

Cases (batch × prompt → output tokens, random prompt tokens, greedy, ignore_eos): 32 × 1024 → 128,
16 × 6144 → 128, 4 × 32768 → 128, 1 × 1024 → 128. KV tokens are vLLM's own "GPU KV cache size" log line.
`--repeats N` times each case N times per engine (new prompts each) and reports the median: bf16 itself
ranged 2568–2682 tok/s at b32 × 1024 across one day's H200 runs, more than the gaps worth deciding.
Ratios show three decimals.
Weight compression at load: `--engines bf16,ours-weights-tq4,ours-weights-tq3 --cases 3` (batch 1).
Tensor parallelism: `--tensor-parallel-size 2` on the 2-GPU host (KV tokens: what the engine holds, each GPU
storing its share of the KV heads).

    python benchmarks/vllm_throughput.py --model /tmp/models/llama8b-shape --out benchmarks/results/vllm-throughput-h100

All seven default engines and the first three cases took 21.7 minutes on an H200 (upstream's first start
compiles its Triton kernels: 362 s), longer than one call to the GPU host may run: start it detached
(`setsid nohup python benchmarks/vllm_throughput.py ... --out /tmp/run/x > /tmp/run/log 2>&1 &`) from a copy
of the checkout outside the working tree and poll with back-to-back calls; the JSON is rewritten after
every engine (vllm-throughput-h200-seven.md).

An MLA model (`model_shapes.py deepseek-v2-lite`) runs with `--engines bf16-auto,ours-k4v4,ours-k3v3`: ours
compresses its latent cache (`turboquant/vllm/latent_backend.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vllm_engines import (ENGINES, MAX_MODEL_LEN, TIMED_END, TIMED_START, dummy_weight_engine,  # noqa: E402
                          random_prompts, report, run_engine)

# the last, batch 1, is where compressed weights should pay: each decode step reads every weight once
CASES = [(32, 1024, 128), (16, 6144, 128), (4, 32768, 128), (1, 1024, 128)]
DEFAULT_ENGINES = ["bf16", "fp8", "upstream-turboquant_4bit_nc", "upstream-turboquant_3bit_nc",
                   "ours-k4v4", "ours-k4v3", "ours-k3v3"]


def case_name(batch: int, prompt: int, output: int) -> str:
    return f"b{batch}x{prompt}->{output}"


def worker(name: str, model: str, cases: list[tuple[int, int, int]], tensor_parallel_size: int,
           repeats: int) -> None:
    from vllm import SamplingParams

    start = time.perf_counter()
    llm = dummy_weight_engine(name, model, tensor_parallel_size)
    result = {"startup_s": round(time.perf_counter() - start, 1)}
    rng = random.Random(0)
    for batch, prompt, output in cases:
        warmup, prompts = random_prompts(rng, batch, prompt), random_prompts(rng, batch, prompt)
        params = SamplingParams(max_tokens=output, ignore_eos=True, temperature=0)
        # Warm-up: the same schedule on other prompts, so every Triton specialization the timed run
        # needs (mixed prefill + decode steps included) is compiled here, and the timed prompts miss the
        # prefix cache. A 4-token warm-up left JIT compiles inside the first timed case on a fresh host.
        llm.generate(warmup, params, use_tqdm=False)
        runs = []
        for repeat in range(repeats):  # each on prompts of its own, which miss the prefix cache
            prompts = prompts if repeat == 0 else random_prompts(rng, batch, prompt)
            print(f"{TIMED_START} {case_name(batch, prompt, output)}", flush=True)  # for run_engine's JIT check
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            print(TIMED_END, flush=True)
            runs.append((sum(len(out.outputs[0].token_ids) for out in outs) / seconds, seconds))
        tok_s, seconds = sorted(runs)[len(runs) // 2]  # the median run (the upper one of an even count)
        result[case_name(batch, prompt, output)] = {"tok_s": round(tok_s, 1), "wall_s": round(seconds, 2),
                                                    **({"tok_s_runs": [round(r[0], 1) for r in runs]}
                                                       if repeats > 1 else {})}
    print("RESULT " + json.dumps(result), flush=True)


def markdown(result: dict) -> str:
    rows = result["rows"]
    base = next((r for r in rows if r["engine"] in ("bf16", "bf16-auto") and r.get("rc") == 0), None)
    names = [case_name(*c) for c in CASES]
    lines = [f"# vLLM KV capacity and throughput ({result['device']}, {result['date']})", "",
             f"Model `{result['model']}` (dummy weights), gpu_memory_utilization 0.85, CUDA graphs on, "
             f"max_model_len {MAX_MODEL_LEN}, tensor parallel size {result.get('tensor_parallel_size', 1)} "
             "(KV tokens: what the engine holds). Output tok/s (× bf16)"
             + (f", the median of {result['repeats']} timed runs per case, each on new prompts"
                if result.get("repeats", 1) > 1 else "") + ".", "",
             *([f"**Note:** {result['note']}", ""] if result.get("note") else []),
             "| engine | KV tokens (× bf16) | " + " | ".join(names) + " | startup s |",
             "|---|---|" + "---|" * len(names) + "---|"]
    compiled = [f"{row['engine']} {case}: {', '.join(kernels)}" for row in rows
                for case, kernels in row.get("jit_in_timed", {}).items()]
    for row in rows:
        if row.get("rc") != 0:
            lines.append(f"| {row['engine']} | failed (rc {row.get('rc')}) |" + " |" * (len(names) + 1))
            continue
        kv = row.get("kv_tokens")
        kv_cell = f"{kv:,}" + (f" ({kv / base['kv_tokens']:.2f}x)" if base and base.get("kv_tokens") and kv else "")
        cells = []
        for name in names:
            cell = row.get(name)
            if not cell:
                cells.append("—")
                continue
            ratio = f" ({cell['tok_s'] / base[name]['tok_s']:.3f}x)" if base and base.get(name) else ""
            cells.append(f"{cell['tok_s']}{ratio}")
        lines.append(f"| {row['engine']} | {kv_cell} | " + " | ".join(cells) + f" | {row.get('startup_s')} |")
    runs = [f"{row['engine']} {name}: {', '.join(map(str, row[name]['tok_s_runs']))}" for row in rows
            for name in names if row.get(name, {}).get("tok_s_runs")]
    if runs:  # a first run far below the others is a stall (a compile): the median leaves it out, this shows it
        lines += ["", "Each timed run, tok/s: " + "; ".join(runs) + "."]
    if compiled:  # such a case's time includes Triton compiles: re-run it
        lines += ["", "Triton kernels vLLM's JIT monitor saw compile inside a timed case: " + "; ".join(compiled) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/models/llama8b-shape",
                        help="model directory (config + tokenizer; the bundle's llama8b-shape)")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"comma list from {sorted(ENGINES)}")
    parser.add_argument("--cases", default="all", help="'all' or a comma list of case indices (0-based)")
    parser.add_argument("--merge", help="a previous OUT.json whose rows are kept unless re-measured here")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine (vLLM's TP)")
    parser.add_argument("--timeout", type=int, default=540, help="seconds per engine")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per case and engine (after one warm-up); the table shows their median")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = CASES if args.cases == "all" else [CASES[int(i)] for i in args.cases.split(",")]
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.worker:
        return worker(args.worker, args.model, cases, args.tensor_parallel_size, args.repeats)
    rows = json.load(open(args.merge))["rows"] if args.merge and os.path.exists(args.merge) else []
    engines, order = args.engines.split(","), list(ENGINES)
    for name in engines:
        row = run_engine(__file__, name, ["--model", args.model, "--cases", args.cases, "--tensor-parallel-size",
                                          str(args.tensor_parallel_size), "--repeats", str(args.repeats)],
                         args.timeout)
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if r["engine"] != name] + [row]
        rows.sort(key=lambda r: order.index(r["engine"]))
        # written after every engine, so a run cut off by a host's time limit keeps the engines it finished
        report(rows, markdown, args.out, echo=name == engines[-1],
               model=os.path.basename(os.path.normpath(args.model)), tensor_parallel_size=args.tensor_parallel_size,
               repeats=args.repeats)


if __name__ == "__main__":
    main()
