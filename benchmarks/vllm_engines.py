"""The vLLM engine configurations the vLLM benchmarks compare, and how they run them: one subprocess per
engine (a fresh GPU each time), which prints one `RESULT {json}` line; vLLM's own log gives KV capacity.

Needs the offline vLLM bundle on the GPU host (`../shared/gpu/README.md`); the upstream `turboquant_*`
rows also need its FA2 parts. Our rows need this package installed (its `vllm.general_plugins` entry point).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys

ENGINES: dict[str, dict] = {
    "bf16": dict(attention_backend="FLASH_ATTN"),
    # vLLM's own choice of backend: FLASH_ATTN, or for MLA models (DeepSeek-V2/V3) FLASH_ATTN_MLA on Hopper
    "bf16-auto": dict(),
    "fp8": dict(attention_backend="FLASH_ATTN", kv_cache_dtype="fp8"),
    "upstream-turboquant_4bit_nc": dict(kv_cache_dtype="turboquant_4bit_nc"),
    "upstream-turboquant_3bit_nc": dict(kv_cache_dtype="turboquant_3bit_nc"),
    **{f"ours-{preset}": dict(attention_backend="CUSTOM", additional_config={"turboquant": preset})
       for preset in ("k4v4", "k4v3", "k3v3")},
    # the first and last layer at 8 bits (every layer is at the preset's bits by default)
    **{f"ours-{preset}-b1": dict(attention_backend="CUSTOM",
                                 additional_config={"turboquant": {"preset": preset, "boundary_layers": 1}})
       for preset in ("k4v4", "k3v3")},
    # without the default's exact sinks and latest tokens (exact_tokens.py): every token read compressed
    "ours-k4v4-no-ring": dict(attention_backend="CUSTOM", additional_config={
        "turboquant": {"preset": "k4v4", "exact_sinks": 0, "exact_recent": 0}}),
    # weights compressed at load (issue: weight compression), the KV cache as bf16's
    "ours-weights-tq4": dict(attention_backend="FLASH_ATTN", quantization="turboquant"),
    "ours-weights-tq3": dict(attention_backend="FLASH_ATTN", quantization="turboquant"),
}
# Settings an engine reads from its environment (`--quantization turboquant` takes its bits there).
ENGINE_ENVIRONMENT: dict[str, dict[str, str]] = {"ours-weights-tq3": {"TURBOQUANT_WEIGHT_BITS": "3"}}


def engine_kwargs(name: str) -> dict:
    if name not in ENGINES:
        raise SystemExit(f"unknown engine {name!r}; choose from {sorted(ENGINES)}")
    return dict(ENGINES[name])


# The 8B-shape benchmarks (throughput, profile): one engine setting, prompts of random token ids.
MAX_MODEL_LEN = 32768 + 256


def dummy_weight_engine(name: str, model: str, tensor_parallel_size: int = 1):
    """An `LLM` for engine `name` over `model` with dummy weights, CUDA graphs on, 85% of each GPU."""
    from vllm import LLM

    # jit_monitor_verbose: vLLM logs every Triton compile after its warm-up with the variant's constexprs (by
    # default it warns once per kernel name, which left a second variant's compile in a timed run unsaid)
    return LLM(model=model, load_format="dummy", max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=0.85, seed=0,
               tensor_parallel_size=tensor_parallel_size, jit_monitor_verbose=True, **engine_kwargs(name))


def random_prompts(rng, batch: int, length: int) -> list[dict]:
    return [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(length)]} for _ in range(batch)]


# A worker prints these around each timed call; vLLM's JIT monitor lines between them name the Triton
# kernels that compiled inside the timing (which then measured the compiler, not the kernels).
TIMED_START, TIMED_END = "TIMED-START", "TIMED-END"
JIT_WARNING = re.compile(r"Triton kernel JIT compilation during inference: (\w+)(?: \(constexprs=(\{[^}]*\}))?")


def run_engine(script: str, name: str, args: list[str], timeout_s: int) -> dict:
    """Run `script --worker NAME ARGS…` and collect its RESULT line plus vLLM's KV-capacity log lines.

    The worker runs in its own process group, killed whole on timeout: vLLM's engine-core child would
    otherwise outlive it, keep its GPU memory and fail the next engine's start."""
    row = {"engine": name}
    worker = subprocess.Popen([sys.executable, script, "--worker", name, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env={**os.environ, **ENGINE_ENVIRONMENT.get(name, {})})
    try:
        log, _ = worker.communicate(timeout=timeout_s)
        row["rc"] = worker.returncode
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        log, _ = worker.communicate()
        row["rc"] = "timeout"
    timed_case = None
    for line in log.splitlines():
        if line.startswith(TIMED_START):
            timed_case = line[len(TIMED_START):].strip()
        elif line.startswith(TIMED_END):
            timed_case = None
        elif timed_case and (match := JIT_WARNING.search(line)):
            row.setdefault("jit_in_timed", {}).setdefault(timed_case, []).append(match.group(1))
            if match.group(2):  # which variant: its constexprs
                row.setdefault("jit_in_timed_constexprs", {}).setdefault(timed_case, []).append(match.group(2))
        if line.startswith("RESULT "):
            row.update(json.loads(line[len("RESULT "):]))
        if match := re.search(r"GPU KV cache size: ([\d,]+) tokens", line):
            row["kv_tokens"] = int(match.group(1).replace(",", ""))
        if match := re.search(r"Available KV cache memory: ([\d.]+) GiB", line):
            row["kv_gib"] = float(match.group(1))
    if row["rc"] != 0:
        lines = [line for line in log.splitlines() if line.strip()]
        row["error_causes"] = [line for line in lines if re.search(r"Error|Exception", line)][-5:]
        row["error_tail"] = lines[-15:]
    return row


def report(rows: list[dict], markdown, out: str | None, echo: bool = True, **fields) -> None:
    """Print (`echo`) the markdown table of one run and write OUT.json / OUT.md (device and date included)."""
    import torch

    result = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), **fields,
              "rows": rows}
    if echo:
        print(markdown(result))
    if out:
        with open(out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(out + ".md", "w") as f:
            f.write(markdown(result))
