"""Where the Hopper extend kernel's time goes, role by role (CUDA, with Nsight Compute's `ncu` on PATH):
one `extend_attention` call per cell (k4v4, 32 query / 8 kv heads, a 16K compressed prefix, one chunk),
profiled by `ncu` in child processes, as `decode_profile.py` does for decode: the kernel's counters, then
its sampled stalls split by warp role. The roles' code lies apart in the SASS, each entered through a
`setmaxnreg`; a stretch with `HGMMA` is a consumer's, one with byte permutes a producer's (key producer:
the one that also scales by `HFMA2`, with two consumers). `ncu` runs the SM at its base clock.

    python benchmarks/extend_profile.py [--cells 128x512,128x2048] [--out benchmarks/results/extend-profile-h200.json]
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode_profile import counter_tables, counters, opcode, profile_main, sass_samples  # noqa: E402
from kernels import block_table_for, random_compressed_cache  # noqa: E402
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402
from turboquant.kernels.extend import extend_attention  # noqa: E402

KERNEL = "regex:_extend_hopper_kernel"
PREFIX = 16384


def child(cell: str) -> None:
    """The profiled process: two warm-up calls, then the one `ncu` records (--launch-skip 2)."""
    head_dim, chunk = (int(n) for n in cell.split("x"))
    codec = KernelCodec.from_config(TurboQuantConfig.from_preset("k4v4"), head_dim, 8, 16, device="cuda")
    table, _, num_blocks = block_table_for(1, PREFIX + chunk)
    cache = random_compressed_cache(codec, num_blocks)
    seq_lens = torch.tensor([PREFIX + chunk], dtype=torch.int32, device="cuda")
    starts = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
    query = torch.randn(chunk, 32, head_dim, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(chunk, 8, head_dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    for _ in range(3):
        extend_attention(query, keys, values, starts, seq_lens, cache, codec, table, head_dim**-0.5, chunk)
    torch.cuda.synchronize()


def role(opcodes: set[str]) -> str:
    if "HGMMA" in opcodes:
        return "consumer"
    if "PRMT" in opcodes:
        return "key producer" if "HFMA2" in opcodes else "value producer (or keys, one consumer)"
    return "other"


def role_stalls(cell: str) -> dict:
    """Per role: its share of the sampled stalls, of the executed instructions, and its top reasons and
    opcodes (as shares of the role's own samples)."""
    reasons, instructions = sass_samples(cell, kernel=KERNEL, script=__file__)
    stretches, current = [], []
    for instruction in instructions:
        if "USETMAXREG" in instruction["source"] and current:
            stretches.append(current)
            current = []
        current.append(instruction)
    stretches.append(current)
    samples, executed = collections.Counter(), collections.Counter()
    by_reason, by_opcode = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for stretch in stretches:
        name = role({opcode(i["source"]) for i in stretch})
        for instruction in stretch:
            samples[name] += instruction["Warp Stall Sampling (All Samples)"]
            by_opcode[name][opcode(instruction["source"])] += instruction["Warp Stall Sampling (All Samples)"]
            executed[name] += instruction.get("Instructions Executed", 0.0)
            for reason in reasons:
                by_reason[name][reason] += instruction["stall_" + reason]
    total_samples, total_executed = sum(samples.values()), sum(executed.values()) or 1.0
    return {name: {"samples": round(samples[name] / total_samples, 4),
                   "executed": round(executed[name] / total_executed, 4),
                   "reasons": {r: round(v / max(samples[name], 1.0), 4) for r, v in by_reason[name].most_common(6)},
                   "opcodes": {o: round(v / max(samples[name], 1.0), 4) for o, v in by_opcode[name].most_common(6)}}
            for name in samples}


def markdown(result: dict) -> str:
    cells = result["cells"]
    lines = [f"Device: {result['device']}, {result['date']}, build `{result['build']}`. "
             f"`python benchmarks/extend_profile.py --cells {','.join(cells)}` (cell: head_dim x chunk tokens; "
             f"k4v4, 32 q / 8 kv heads, {PREFIX}-token compressed prefix): the Hopper extend kernel under Nsight "
             "Compute, which runs the SM at its base clock.", ""]
    lines += counter_tables(cells, "Stall reasons, cycles per issued instruction (all roles together):")
    for cell, data in cells.items():
        lines += ["", f"By role, {cell} (shares of all sampled stalls and executed instructions; a role's reasons "
                  "and opcodes as shares of its own samples):", "",
                  "| role | samples | instructions | top reasons | top opcodes |", "|---|---:|---:|---|---|"]
        for name, entry in data["roles"].items():
            reasons = ", ".join(f"{r} {100 * v:.0f}%" for r, v in entry["reasons"].items())
            opcodes = ", ".join(f"{o} {100 * v:.0f}%" for o, v in entry["opcodes"].items())
            lines.append(f"| {name} | {100 * entry['samples']:.1f}% | {100 * entry['executed']:.1f}% | {reasons} "
                         f"| {opcodes} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(profile_main(__doc__, "128x512,128x2048", "HEAD_DIMxCHUNK items, comma-separated",
                          "benchmarks/results/extend-profile-h200.json", child,
                          lambda cell: {"counters": counters(cell, kernel=KERNEL, script=__file__),
                                        "roles": role_stalls(cell)}, markdown))
