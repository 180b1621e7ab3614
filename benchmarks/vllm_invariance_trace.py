"""Where batch invariance breaks in vLLM's batch-invariant mode (`VLLM_BATCH_INVARIANT=1`): one request A
runs alone, then beside a second request B in the same steps; forward hooks on every module of the
model record each output, and A's rows are compared bit for bit, module by module, in the prefill step
and the first decode step. The first module whose output differs is where the batch enters.

    python benchmarks/vllm_invariance_trace.py --out benchmarks/results/vllm-invariance-trace-h200

`vllm_invariance.py` counts the requests that change; this script says which operation changes them.
Needs the offline vLLM bundle and this package's entry point (as `vllm_throughput.py`), and SmolLM2
converted by the bundle (the default model). The engine runs in this process (hooks need the model).
"""

from __future__ import annotations

import argparse
import json
import os

from vllm_engines import engine_kwargs, report, run_engine

DEFAULT_ENGINES = ("bf16", "ours-k4v4")
A_TOKENS, B_TOKENS = 160, 97  # different lengths: A's decode row is the one at position A_TOKENS


def install_trace(model):
    """Hooks that append, per forward call of the model, its input ids, positions and every module's
    tensor outputs (on the CPU) to `model.invariance_trace`."""
    import torch

    calls = model.invariance_trace = []

    def before(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        calls.append({"input_ids": ids.detach().cpu(), "positions": positions.detach().cpu(), "outputs": [],
                      "seen": {}})

    def after(name):
        def hook(module, args, output):
            if not calls:
                return
            # a module shared by all layers (vLLM's rotary embedding) fires once per layer: number its calls
            seen = calls[-1]["seen"]
            seen[name] = seen.get(name, 0) + 1
            label = name if seen[name] == 1 else f"{name}#{seen[name]}"
            parts = output if isinstance(output, tuple) else (output,)
            for i, part in enumerate(parts):
                if isinstance(part, torch.Tensor) and part.dim() >= 1:
                    calls[-1]["outputs"].append((label if len(parts) == 1 else f"{label}[{i}]", part.detach().cpu()))
        return hook

    model.register_forward_pre_hook(before, with_kwargs=True)
    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(after(name))
    return len(list(model.named_modules()))


def a_rows(call: dict, a_ids: list[int], step: str):
    """A's rows among the call's tokens: its prompt (prefill) or its one token at position len(A) (decode)."""
    import torch

    ids, positions = call["input_ids"], call["positions"]
    if step == "prefill":
        n = len(a_ids)
        target = torch.tensor(a_ids, dtype=ids.dtype)
        for start in range(ids.shape[0] - n + 1):
            if torch.equal(ids[start:start + n], target):
                return slice(start, start + n)
        raise RuntimeError("A's prompt is not among the prefill step's tokens")
    rows = (positions == len(a_ids)).nonzero().flatten().tolist()
    if len(rows) != 1:
        raise RuntimeError(f"expected one decode row at position {len(a_ids)}, found {rows}")
    return slice(rows[0], rows[0] + 1)


def compare(alone: dict, together: dict, a_ids: list[int], step: str) -> dict:
    """Module by module: A's rows alone against A's rows beside B (token-indexed outputs only)."""
    import torch

    rows_alone, rows_together = a_rows(alone, a_ids, step), a_rows(together, a_ids, step)
    tokens_alone, tokens_together = alone["input_ids"].shape[0], together["input_ids"].shape[0]
    together_outputs = dict(together["outputs"])
    differing, compared = [], 0
    for name, x in alone["outputs"]:
        y = together_outputs.get(name)
        if y is None or x.shape[0] != tokens_alone or y.shape[0] != tokens_together:
            continue
        x, y = x[rows_alone], y[rows_together]
        if x.shape != y.shape:
            continue
        compared += 1
        if not torch.equal(x, y):
            diff = (x.float() - y.float()).abs()
            differing.append({"module": name, "max_abs_diff": float(diff.max()),
                              "differing_fraction": float((diff > 0).float().mean())})
    return {"step": step, "compared": compared, "differing": len(differing),
            "first": differing[0] if differing else None, "first_ten": differing[:10]}


def worker(engine: str, model_dir: str) -> None:
    os.environ["VLLM_BATCH_INVARIANT"] = "1"  # before vLLM reads it
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core (and the model) in this process
    from vllm import LLM, SamplingParams

    from turboquant.hf.models import eval_text

    llm = LLM(model=model_dir, enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=1024, seed=0,
              enable_prefix_caching=False, max_num_seqs=64, **engine_kwargs(engine))
    tokens = llm.get_tokenizer()(eval_text(), add_special_tokens=False).input_ids
    a_ids, b_ids = tokens[:A_TOKENS], tokens[1000:1000 + B_TOKENS]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    llm.apply_model(install_trace)

    def traced(prompts):
        llm.apply_model(lambda model: model.invariance_trace.clear())
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        calls = llm.apply_model(lambda model: list(model.invariance_trace))[0]
        return calls, [list(o.outputs[0].token_ids) for o in outputs]

    alone, alone_tokens = traced([a_ids])
    result = {"scenarios": []}
    for order in ("BA", "AB"):
        together, together_tokens = traced([b_ids, a_ids] if order == "BA" else [a_ids, b_ids])
        a_together = together_tokens[0 if order == "AB" else 1]
        result["scenarios"].append({
            "order": order, "tokens_alone": alone_tokens[0], "tokens_together": a_together,
            "steps": [compare(alone[i], together[i], a_ids, step) for i, step in enumerate(("prefill", "decode"))]})
    print("RESULT " + json.dumps(result))


def markdown(result: dict) -> str:
    lines = [f"# Where vLLM's batch-invariant mode varies ({result['device']}, {result['date']})", "",
             f"`VLLM_BATCH_INVARIANT=1`, SmolLM2-135M, eager, no prefix caching. Request A ({A_TOKENS} tokens) alone, "
             f"then with B ({B_TOKENS} tokens) in the same steps (order BA or AB); each module's output for A's rows "
             "compared bit for bit. 'first differing module': the earliest in execution order.", "",
             "| engine | order | step | modules compared | differing | first differing module | its max abs diff |",
             "|---|---|---|---:|---:|---|---:|"]
    for row in result["rows"]:
        if row.get("rc") != 0:
            lines.append(f"| {row['engine']} | failed | | | | | |")
            continue
        for scenario in row["scenarios"]:
            for step in scenario["steps"]:
                first = step["first"] or {"module": "—", "max_abs_diff": float("nan")}
                lines.append(f"| {row['engine']} | {scenario['order']} | {step['step']} | {step['compared']} | "
                             f"{step['differing']} | {first['module']} | {first['max_abs_diff']:.3g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES))
    parser.add_argument("--model", default="/tmp/models/smollm2")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per engine")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model)
    engines = args.engines.split(",")
    for engine in engines:
        engine_kwargs(engine)  # an unknown name stops here, before any engine starts
    rows = []
    for engine in engines:
        row = run_engine(__file__, engine, ["--model", args.model], args.timeout)
        rows.append(row)
        print(json.dumps(row)[:600], flush=True)
        report(rows, markdown, args.out, echo=False, engines=engines)
    report(rows, markdown, args.out, engines=engines)


if __name__ == "__main__":
    main()
