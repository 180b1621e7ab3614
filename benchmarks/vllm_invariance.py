"""Batch invariance in vLLM's batch-invariant mode (`VLLM_BATCH_INVARIANT=1`), bf16 beside ours: 64 greedy
requests run together, then one by one; a request is invariant when both runs give the same 32 tokens.
Three scenarios separate the causes that `tests/gpu/test_vllm_plugin.py`'s load test mixes:

- batch:   64 distinct 160-token prompts, no prefix caching, KV room for all (batching and chunking only)
- prefix:  4 shared 200-token prefixes × 16 20-token suffixes, prefix caching on (cache hits added)
- preempt: as prefix, with 96 KV blocks, too few for all at once (preemption and recompute added)

    python benchmarks/vllm_invariance.py --out benchmarks/results/vllm-invariance-h200 [--model DIR] [--triton-matmuls]

Reports each request's first differing token (None: identical). Needs the offline vLLM bundle and this
package's entry point (as `vllm_throughput.py`), and SmolLM2 converted by the bundle (the default model).
"""

from __future__ import annotations

import argparse
import json
import os

from vllm_engines import engine_kwargs, report, run_engine

SCENARIOS = ("batch", "prefix", "preempt")
DEFAULT_ENGINES = ("bf16", "ours-k4v4")


def prompts(scenario: str, tokens: list[int]) -> list[dict]:
    if scenario == "batch":
        return [{"prompt_token_ids": tokens[i * 160:(i + 1) * 160]} for i in range(64)]
    prefixes = [tokens[i * 1000:i * 1000 + 200] for i in range(4)]
    suffixes = [tokens[5000 + j * 20:5000 + (j + 1) * 20] for j in range(16)]
    return [{"prompt_token_ids": p + s} for p in prefixes for s in suffixes]


def force_triton_matmuls() -> None:
    """`--triton-matmuls`: vLLM's batch-invariant mode swaps mm/addmm/matmul/linear for its Triton persistent
    kernels on SM80 only; on Hopper it trusts cuBLAS with split-K disabled. This makes it swap them on any
    GPU, to test whether cuBLAS's per-batch-size kernel choice is what still varies (a diagnostic, not a
    setting of the plugin). The engine must run in this process for the patch to reach it."""
    from vllm.model_executor.layers import batch_invariant
    from vllm.platforms import current_platform

    enable = batch_invariant.enable_batch_invariant_mode

    def enable_with_triton_matmuls():
        swapped = batch_invariant._batch_invariant_MODE
        enable()
        if swapped or current_platform.is_device_capability_family(80):
            return  # already on, or vLLM swapped them itself
        library, key = batch_invariant._batch_invariant_LIB, current_platform.dispatch_key
        for op, kernel in (("aten::mm", batch_invariant.mm_batch_invariant),
                           ("aten::addmm", batch_invariant.addmm_batch_invariant),
                           ("aten::matmul", batch_invariant.matmul_batch_invariant),
                           ("aten::linear", batch_invariant.linear_batch_invariant)):
            library.impl(op, kernel, key)

    batch_invariant.enable_batch_invariant_mode = enable_with_triton_matmuls


def worker(engine: str, scenario: str, model: str, triton_matmuls: bool) -> None:
    os.environ["VLLM_BATCH_INVARIANT"] = "1"  # before vLLM reads it
    if triton_matmuls:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, where the patch is
    from vllm import LLM, SamplingParams

    if triton_matmuls:
        force_triton_matmuls()

    from turboquant.hf.models import eval_text

    options = dict(enable_prefix_caching=scenario != "batch", max_num_seqs=64, disable_log_stats=False)
    if scenario == "preempt":
        options["num_gpu_blocks_override"] = 96
    llm = LLM(model=model, enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=1024, seed=0,
              **options, **engine_kwargs(engine))
    tokens = llm.get_tokenizer()(eval_text(), add_special_tokens=False).input_ids
    requests = prompts(scenario, tokens)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    together = [list(o.outputs[0].token_ids) for o in llm.generate(requests, params, use_tqdm=False)]
    preemptions = sum(getattr(m, "value", 0) for m in llm.get_metrics() if "preempt" in m.name)
    alone = [list(llm.generate([r], params, use_tqdm=False)[0].outputs[0].token_ids) for r in requests]
    first_differences = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                         for a, b in zip(together, alone)]
    print("RESULT " + json.dumps({"scenario": scenario, "preemptions": preemptions,
                                  "identical": first_differences.count(None), "requests": len(requests),
                                  "first_differences": first_differences}))


def markdown(result: dict) -> str:
    lines = [f"# vLLM batch invariance ({result['device']}, {result['date']})", "",
             "`VLLM_BATCH_INVARIANT=1`, SmolLM2-135M, eager; 64 greedy requests × 32 tokens together, then one by "
             "one. Cell: identical requests (preemptions in the together run)."
             + (" `--triton-matmuls`: vLLM's Triton batch-invariant matmuls in place of cuBLAS." if result.get("triton_matmuls")
                else ""), "",
             "| engine | " + " | ".join(SCENARIOS) + " |", "|---|" + "---|" * len(SCENARIOS)]
    for engine in result["engines"]:
        cells = []
        for scenario in SCENARIOS:
            row = next((r for r in result["rows"] if r["engine"] == engine and r.get("scenario") == scenario), None)
            if row is None or row.get("rc") != 0:
                cells.append("failed" if row else "—")
            else:
                cells.append(f"{row['identical']}/{row['requests']} ({row['preemptions']:g})")
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--model", default="/tmp/models/smollm2")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per engine start and run")
    parser.add_argument("--triton-matmuls", action="store_true",
                        help="swap vLLM's matmuls for its Triton batch-invariant kernels on any GPU (diagnostic)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.scenario, args.model, args.triton_matmuls)
    engines, scenarios = args.engines.split(","), args.scenarios.split(",")
    for engine in engines:
        engine_kwargs(engine)  # an unknown name stops here, before any engine starts
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    rows = []
    for engine in engines:
        for scenario in scenarios:
            options = ["--scenario", scenario, "--model", args.model] + (["--triton-matmuls"] if args.triton_matmuls else [])
            row = run_engine(__file__, engine, options, args.timeout)
            rows.append({"scenario": scenario, **row})
            print(json.dumps(row)[:400], flush=True)
            report(rows, markdown, args.out, echo=False, engines=engines, triton_matmuls=args.triton_matmuls)
    report(rows, markdown, args.out, engines=engines, triton_matmuls=args.triton_matmuls)


if __name__ == "__main__":
    main()
