"""What the exact ring (`kernels/exact_ring.py`, exact_sinks 4 / exact_recent 32) adds to a decode step
(store + attention, as the vLLM backend launches them) on several shapes: the step without a ring, with
one as `paged_decode_attention(store=)` places the store and the window kernel, with the store first (the
backend's order before `store=`), with the window kernel on its own stream and after the split kernels
whatever the pair count (`decode.WINDOW_STREAM_MIN_PAIRS`), and the split kernels alone over the middle
(the ring's share of the work removed), each a CUDA-graph
time per call (`kernels.graph_time_ms`) in 33K-token block tables, as vLLM's at max_model_len 33024.
`--timeline` also profiles each case's step without and with the ring (torch.profiler over a graph of
TIMELINE_STEPS steps): every kernel's mean start and end within its step, µs from the step's first kernel,
which shows what overlaps what (kernels matched by start order: where two start in a varying order, the
rows mix them).

    python benchmarks/ring_cost.py --out benchmarks/results/ring-cost-h200 [--build NOTE] [--timeline]
    python benchmarks/ring_cost.py --table benchmarks/results/ring-cost-h200.json   # print its markdown

It also times what the metadata builder launches before each step to hand out ring entries: the one
kernel (`kernels/ring_entries.py`) against the same in PyTorch ops (`reference.ring_entries_reference`,
what the builder ran before), per call in a CUDA graph and eagerly (host launches included), for decode
steps of 1, 32 and 256 sequences and a 16K-token prefill step.

`--build` says which code ran (a commit), written into the JSON and the table. `--variant NAME` times one
of `benchmarks/decode_variants.py`'s code variants in place of the code as it is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import captured, decode_step, filled_exact_ring, graph_time_ms  # noqa: E402

from turboquant.kernels import decode  # noqa: E402 (kernels.py puts the repo on sys.path)
from turboquant.kernels.decode import paged_decode_attention  # noqa: E402
from turboquant.kernels.reference import ring_entries_reference  # noqa: E402
from turboquant.kernels.ring_entries import hand_out_ring_entries  # noqa: E402
from turboquant.kernels.store import compress_store  # noqa: E402

TABLE_TOKENS = 33024
TIMELINE_STEPS = 10
# (shape, q heads, kv heads, head_dim, preset, batch, context)
CASES = [("llama-3.1-8b", 32, 8, 128, "k4v4", 1, 1024), ("llama-3.1-8b", 32, 8, 128, "k4v4", 8, 1024),
         ("llama-3.1-8b", 32, 8, 128, "k4v4", 32, 1024), ("llama-3.1-8b", 32, 8, 128, "k4v4", 8, 16384),
         ("llama-3.1-8b", 32, 8, 128, "k4v4", 32, 16384), ("llama-3.1-8b", 32, 8, 128, "k4v4", 1, 16384),
         ("llama-3.1-8b", 32, 8, 128, "k3v3", 32, 1024), ("smollm2-135m", 9, 3, 64, "k4v4", 32, 1024),
         ("d256", 8, 4, 256, "k3v3", 8, 4096)]


def kernel_timeline(fn) -> list[dict]:
    """fn's kernels in start order, each with its mean start and end (µs from the first kernel's start)
    over TIMELINE_STEPS calls replayed from one CUDA graph."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    graph = captured(fn, TIMELINE_STEPS)
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    per_step, left = divmod(len(kernels), TIMELINE_STEPS)
    if left or not per_step:
        raise RuntimeError(f"{len(kernels)} kernels do not split into {TIMELINE_STEPS} equal steps")
    steps = [kernels[i * per_step:(i + 1) * per_step] for i in range(TIMELINE_STEPS)]
    rows = []
    for index in range(per_step):
        starts = [step[index].time_range.start - step[0].time_range.start for step in steps]
        ends = [step[index].time_range.end - step[0].time_range.start for step in steps]
        rows.append(dict(kernel=steps[0][index].name[:60], start_us=round(sum(starts) / len(starts), 2),
                         end_us=round(sum(ends) / len(ends), 2)))
    return rows


def step_cell(shape: str, num_q_heads: int, num_kv_heads: int, head_dim: int, preset: str, batch: int,
              context: int, timeline: bool = False) -> dict:
    step = decode_step(num_q_heads, num_kv_heads, head_dim, preset, batch, context, TABLE_TOKENS)
    codec, table, seq_lens, slots, cache = step.codec, step.table, step.seq_lens, step.slots, step.cache
    query, keys, values, out = step.query, step.keys, step.values, step.out
    ring, entries, (middle_ends, middle_starts) = filled_exact_ring(codec, cache, table, seq_lens)
    scale = head_dim**-0.5

    def no_ring():
        rotated = compress_store(keys, values, slots, cache, codec, queries=query, launch_dependents=True)
        paged_decode_attention(rotated, cache, codec, table, seq_lens, scale, out=out, query_rotated=True,
                               after_store=True)

    def ring_store(queries: torch.Tensor | None) -> torch.Tensor | None:
        return compress_store(keys, values, slots, cache, codec, queries=queries,
                              launch_dependents=queries is not None, ring=ring, entries=entries)

    def with_ring():  # as the backend launches a decode step with a ring: the store beside the split kernels
        paged_decode_attention(query, cache, codec, table, seq_lens, scale, out=out, exact=ring,
                               exact_middle=(middle_ends, middle_starts), store=ring_store)

    def with_ring_store_first():  # as it did before: the store first, rotating the queries
        paged_decode_attention(ring_store(query), cache, codec, table, seq_lens, scale, out=out, query_rotated=True,
                               after_store=True, exact=ring, exact_middle=(middle_ends, middle_starts))

    def middle_only():
        rotated = compress_store(keys, values, slots, cache, codec, queries=query, launch_dependents=True)
        paged_decode_attention(rotated, cache, codec, table, middle_ends, scale, out=out, query_rotated=True,
                               after_store=True, key_starts=middle_starts)

    def pairs_limit(limit: int):  # with_ring with the exact window's stream chosen at another pair count
        def with_ring_at_limit():
            default, decode.WINDOW_STREAM_MIN_PAIRS = decode.WINDOW_STREAM_MIN_PAIRS, limit
            try:
                with_ring()
            finally:
                decode.WINDOW_STREAM_MIN_PAIRS = default
        return with_ring_at_limit

    variants = dict(no_ring=no_ring, ring=with_ring, ring_store_first=with_ring_store_first,
                    ring_side_stream=pairs_limit(0), ring_after_splits=pairs_limit(1 << 62), middle_only=middle_only)
    cell = dict(shape=shape, preset=preset, batch=batch, context=context)
    for name, fn in variants.items():
        cell[name + "_us"] = round(graph_time_ms(fn) * 1000, 2)
    for name in ("ring", "ring_store_first", "ring_side_stream", "ring_after_splits"):
        cell[name + "_cost_us"] = round(cell[name + "_us"] - cell["no_ring_us"], 2)
    if timeline:
        cell["timeline"] = {name: kernel_timeline(variants[name]) for name in ("no_ring", "ring", "ring_side_stream",
                                                                               "ring_after_splits")}
    return cell


EAGER_CALLS = 200
# (name, decode sequences, prefill requests × tokens each)
BUILDER_STEPS = [("decode b1", 1, 0, 0), ("decode b32", 32, 0, 0), ("decode b256", 256, 0, 0),
                 ("prefill 8 x 2048", 0, 8, 2048)]


def builder_cell(name: str, decodes: int, prefills: int, chunk: int) -> dict:
    """µs per call of handing out a step's ring entries (sinks 4, recent 32, 256 sequences' worth)."""
    query_lens = [1] * decodes + [chunk] * prefills
    seq_lens = torch.tensor([1000 + 7 * i for i in range(decodes)] + [chunk] * prefills, dtype=torch.int32,
                            device="cuda")
    query_start = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    num_tokens, num_reqs = int(query_start[-1]), len(query_lens)
    cursor = torch.zeros(2, dtype=torch.int64, device="cuda")
    entries = torch.empty(num_tokens, dtype=torch.int32, device="cuda")
    middle_ends = torch.empty(max(1, decodes), dtype=torch.int32, device="cuda")
    counts = (4, 32, 4 * 256, 32 * 256)

    def kernel():
        hand_out_ring_entries(query_start, seq_lens, num_tokens, num_reqs, decodes, cursor, entries, middle_ends,
                              *counts)

    def torch_ops():
        handed, advanced, ends = ring_entries_reference(query_start, seq_lens, num_tokens, num_reqs, decodes, cursor,
                                                        *counts)
        entries.copy_(handed)
        cursor.copy_(advanced)
        middle_ends[:decodes] = ends

    cell = dict(step=name, tokens=num_tokens)
    for label, fn in (("kernel", kernel), ("torch_ops", torch_ops)):
        cell[label + "_graph_us"] = round(graph_time_ms(fn) * 1000, 2)
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(EAGER_CALLS):
            fn()
        torch.cuda.synchronize()
        cell[label + "_eager_us"] = round((time.perf_counter() - start) / EAGER_CALLS * 1e6, 2)
    return cell


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}, {result['date']}; build: {result['build']}. Decode step (store + "
             f"attention), µs per call (CUDA graph), {TABLE_TOKENS}-token block tables.", "",
             "| shape | preset | batch | context | no ring µs | ring µs | ring's cost µs | its cost, store first "
             "µs | its cost, window on its own stream µs | its cost, window after the splits µs | middle only µs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {c['shape']} | {c['preset']} | {c['batch']} | {c['context']} | {c['no_ring_us']:.2f} | "
              f"{c['ring_us']:.2f} | {c['ring_cost_us']:+.2f} | {c.get('ring_store_first_cost_us', math.nan):+.2f} | "
              f"{c['ring_side_stream_cost_us']:+.2f} | {c['ring_after_splits_cost_us']:+.2f} | "
              f"{c['middle_only_us']:.2f} |" for c in result["cells"]]
    if result.get("builder"):
        lines += ["", "Handing out a step's ring entries, µs per call: in a CUDA graph (device time) and eagerly "
                  f"({EAGER_CALLS} calls, then a sync: host launches included).", "",
                  "| step | tokens | one kernel, graph | one kernel, eager | PyTorch ops, graph | PyTorch ops, eager |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['step']} | {c['tokens']} | {c['kernel_graph_us']:.2f} | {c['kernel_eager_us']:.2f} | "
                  f"{c['torch_ops_graph_us']:.2f} | {c['torch_ops_eager_us']:.2f} |" for c in result["builder"]]
    for c in (c for c in result["cells"] if "timeline" in c):
        lines += ["", f"Timeline, {c['shape']} {c['preset']} b{c['batch']} × {c['context']} (µs from the step's first "
                  "kernel; mean of the profiled steps):", "", "| step | kernel | start | end |", "|---|---|---:|---:|"]
        lines += [f"| {name} | `{k['kernel']}` | {k['start_us']:.1f} | {k['end_us']:.1f} |"
                  for name, kernels in c["timeline"].items() for k in kernels]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/ring-cost-h200", help="writes OUT.json and OUT.md")
    parser.add_argument("--build", default="working tree", help="which code ran (written into the results)")
    parser.add_argument("--table", help="print the markdown table of a saved JSON and exit")
    parser.add_argument("--timeline", action="store_true", help="also profile each step's kernel timeline")
    parser.add_argument("--llama", metavar="BxC,...", help="only these batch x context cells of the Llama-3.1-8B "
                        "shape at k4v4 (e.g. 8x16384,16x6144) in place of the default cases")
    parser.add_argument("--variant", help="time a code variant of benchmarks/decode_variants.py (one that keeps "
                        "the split count) in place of the code as it is")
    args = parser.parse_args()
    if args.variant:
        from decode_variants import VARIANTS, variant
        if "splits" in VARIANTS.get(args.variant, {"splits": None}):
            parser.error(f"--variant takes one of {sorted(n for n, v in VARIANTS.items() if 'splits' not in v)}")
        variant(**VARIANTS[args.variant])
        args.build += f", variant {args.variant}"
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())), end="")
        return
    if not torch.cuda.is_available():
        sys.exit("ring_cost.py times CUDA kernels: run it on the GPU host")
    result = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), build=args.build,
                  cells=[])
    cases = CASES if not args.llama else [("llama-3.1-8b", 32, 8, 128, "k4v4", *map(int, cell.split("x")))
                                          for cell in args.llama.split(",")]
    for case in cases:
        result["cells"].append(step_cell(*case, timeline=args.timeline))
        torch.cuda.empty_cache()  # the cell's caches are gone with its closures
        print(json.dumps({k: v for k, v in result["cells"][-1].items() if k != "timeline"}), flush=True)
    result["builder"] = [builder_cell(*step) for step in BUILDER_STEPS]
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result), end="")


if __name__ == "__main__":
    main()
