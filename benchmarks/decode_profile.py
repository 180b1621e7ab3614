"""Where the fragment decode kernel's time goes (CUDA, with Nsight Compute's `ncu` on PATH): one
`paged_decode_attention` call per cell with the fragment kernel forced (k4v4, d=128, 32 query and 8 kv
heads, 33024-token block tables as vLLM's), profiled twice by `ncu` in child processes: its counters
(issue, warps per scheduler, pipe use, DRAM, the stall reasons in cycles per issued instruction) and its
sampled stalls per SASS opcode. `ncu` runs the SM at its base clock, so its durations are longer than
`kernels.py`'s; the shares are what it is for.

    python benchmarks/decode_profile.py [--cells 8x32768,64x32768] [--out benchmarks/results/decode-profile-h200.json]
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import block_table_for, random_compressed_cache  # noqa: E402
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.kernels import decode  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402

KERNEL = "regex:_fragment_split_kernel"
COUNTERS = {
    "gpu__time_duration.sum": "duration ns",
    "sm__cycles_elapsed.avg.per_second": "SM clock Hz",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue slots busy %",
    "smsp__warps_active.avg.per_cycle_active": "warps per scheduler",
    "smsp__warps_eligible.avg.per_cycle_active": "eligible warps per scheduler",
    "smsp__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active": "ALU pipe %",
    "smsp__inst_executed_pipe_fmaheavy.avg.pct_of_peak_sustained_active": "FMA-heavy pipe %",
    "smsp__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active": "tensor pipe %",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM %",
}
STALLS = "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"


def child(cell: str) -> None:
    """The profiled process: two warm-up calls, then the one `ncu` records (--launch-skip 2)."""
    batch, context = (int(n) for n in cell.split("x"))
    codec = KernelCodec.from_config(TurboQuantConfig.from_preset("k4v4"), 128, 8, 16, device="cuda")
    table, seq_lens, num_blocks = block_table_for(batch, context, 33024)
    cache = random_compressed_cache(codec, num_blocks)
    query = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        decode.paged_decode_attention(query, cache, codec, table, seq_lens, 128**-0.5, fragments=True)
    torch.cuda.synchronize()


def ncu(*args: str, cell: str, kernel: str = KERNEL, script: str = __file__) -> str:
    """`ncu` over the third launch of `kernel` in `script --child cell` (two warm-up calls first)."""
    command = ["ncu", "--kernel-name", kernel, "--launch-skip", "2", "--launch-count", "1", *args,
               sys.executable, script, "--child", cell]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO("\n".join(line for line in text.splitlines() if line.startswith('"')))))


def counters(cell: str, kernel: str = KERNEL, script: str = __file__) -> dict:
    """The kernel's counters and stall reasons (cycles per issued instruction), from `ncu --page raw`."""
    rows = csv_rows(ncu("--csv", "--page", "raw", "--metrics", ",".join([STALLS, *COUNTERS]), cell=cell,
                        kernel=kernel, script=script))
    values = dict(zip(rows[0], rows[-1]))
    number = lambda text: float(text.replace(",", ""))  # noqa: E731
    out = {label: number(values[name]) for name, label in COUNTERS.items()}
    stalls = {name.split("stalled_")[1].split("_per_issue")[0]: number(value) for name, value in values.items()
              if "issue_stalled_" in name and "per_issue_active.ratio" in name}
    out["stalls"] = dict(sorted(stalls.items(), key=lambda item: -item[1]))
    return out


def sass_samples(cell: str, kernel: str = KERNEL, script: str = __file__) -> tuple[list[str], list[dict]]:
    """(stall reasons, one dict per SASS instruction in address order: its text, sampled stalls in all and by
    reason, and any other numeric column of `ncu`'s source page), from a full-set profile."""
    with tempfile.TemporaryDirectory() as folder:
        report = str(Path(folder) / "report")
        ncu("--set", "full", "--import-source", "no", "-o", report, cell=cell, kernel=kernel, script=script)
        text = subprocess.run(["ncu", "--import", report + ".ncu-rep", "--page", "source", "--print-source", "sass",
                               "--csv"], capture_output=True, text=True, check=True).stdout
    rows = csv_rows(text)
    head = next(row for row in rows if "Source" in row)
    reasons = [name[len("stall_"):] for name in head if name.startswith("stall_") and "Not Issued" not in name]
    instructions = []
    for row in rows[rows.index(head) + 1:]:
        entry = dict(zip(head, row))
        if not entry["Source"].split():
            continue
        numbers = {}
        for name, text in entry.items():
            try:
                numbers[name] = float(text.replace(",", "") or 0)
            except ValueError:
                pass
        instructions.append({"source": entry["Source"], **numbers})
    return reasons, instructions


def opcode(source: str) -> str:
    words = source.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def opcode_stalls(cell: str) -> dict:
    """Sampled stalls per SASS opcode (share of all samples) and each opcode's top three reasons."""
    reasons, instructions = sass_samples(cell)
    samples, by_reason = collections.Counter(), collections.defaultdict(collections.Counter)
    for instruction in instructions:
        name = opcode(instruction["source"])
        samples[name] += instruction["Warp Stall Sampling (All Samples)"]
        for reason in reasons:
            by_reason[name][reason] += instruction["stall_" + reason]
    total = sum(samples.values())
    return {op: {"share": round(n / total, 4),
                 "reasons": {r: round(v / total, 4) for r, v in by_reason[op].most_common(3)}}
            for op, n in samples.most_common(10)}


def counter_tables(cells: dict, reasons_title: str) -> list[str]:
    """Markdown lines: each cell's counters, then its stall reasons (those of 0.05 cycles or more somewhere)."""
    lines = ["| counter | " + " | ".join(cells) + " |", "|---|" + "---:|" * len(cells)]
    for label in COUNTERS.values():
        lines.append(f"| {label} | " + " | ".join(f"{cells[c]['counters'][label]:,.2f}" for c in cells) + " |")
    reasons = list(next(iter(cells.values()))["counters"]["stalls"])
    lines += ["", reasons_title, "", "| reason | " + " | ".join(cells) + " |", "|---|" + "---:|" * len(cells)]
    for reason in reasons:
        values = [cells[c]["counters"]["stalls"].get(reason, 0.0) for c in cells]
        if max(values) >= 0.05:
            lines.append(f"| {reason} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return lines


def markdown(result: dict) -> str:
    cells = result["cells"]
    lines = [f"Device: {result['device']}, {result['date']}, build `{result['build']}`. "
             f"`python benchmarks/decode_profile.py --cells {','.join(cells)}`: the fragment decode kernel (k4v4, "
             "d=128, 32 q / 8 kv heads, fragment kernel forced) under Nsight Compute, which runs the SM at its base "
             "clock.", ""]
    lines += counter_tables(cells, "Stall reasons, cycles per issued instruction (their sum is the cycles between "
                                   "a warp's issues):")
    for cell, data in cells.items():
        lines += ["", f"Sampled stalls by SASS opcode, {cell} (share of all samples; top reasons):", "",
                  "| opcode | share | top reasons |", "|---|---:|---|"]
        for opcode, entry in data["opcodes"].items():
            top = ", ".join(f"{r} {100 * v:.1f}%" for r, v in entry["reasons"].items())
            lines.append(f"| {opcode} | {100 * entry['share']:.1f}% | {top} |")
    return "\n".join(lines) + "\n"


def profile_main(doc: str, cells: str, cells_help: str, out: str, child, profile, markdown) -> int:
    """A profile script's command line: `--child CELL` runs `child(CELL)` (the process `ncu` records); else
    `profile(cell)` for each cell of --cells, written as JSON and `markdown(result)` beside it."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=cells, help=cells_help)
    parser.add_argument("--out", default=out)
    parser.add_argument("--build", help="the build measured (default: git's HEAD here)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    if shutil.which("ncu") is None:
        parser.error("needs Nsight Compute's ncu on PATH")
    results = {}
    for cell in args.cells.split(","):
        results[cell] = profile(cell)
        print(json.dumps({cell: results[cell]}), flush=True)
    build = args.build or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True).stdout.strip()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "build": build,
              "cells": results}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(profile_main(__doc__, "8x32768,64x32768", "BATCHxCONTEXT items, comma-separated",
                          "benchmarks/results/decode-profile-h200.json", child,
                          lambda cell: {"counters": counters(cell), "opcodes": opcode_stalls(cell)}, markdown))
