"""Where a fragment-kernel program's time goes, phase by phase (CUDA): a copy of
`turboquant/kernels/decode_fragments.py` with timer stamps (`%globaltimer`, and the SM's id) written by
each program at its start, after its sequence length, its query and its first tile's codes arrive, after
its first tile is attended, after its interior tiles and after its last tile. Each stamp waits for the
value before it, so the stamped kernel serializes those phases a little (its time is reported beside the
plain kernel's, on the same inputs: Llama-3.1-8B attention, k4v4, page 16, the fragment kernel launched
alone at a fixed split count). It found the scattered query load that `8b3dc6a` replaced. The copy is
made by editing the kernel's source at its anchors; if the kernel changed there, it says which anchor.

    python benchmarks/decode_timeline.py [--cells 8x16384x16,32x4096x4]
        [--out benchmarks/results/decode-timeline-h200.json]
    python benchmarks/decode_timeline.py --compile-only   # no GPU: the stamped copy's sm_90 registers and stamps
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import (BLOCK_SIZE, block_table_for, graph_time_ms, kernel_module, parse_cells,  # noqa: E402
                     random_compressed_cache)
from turboquant.core import TurboQuantConfig  # noqa: E402
from turboquant.kernels import decode_fragments  # noqa: E402
from turboquant.kernels.codec import KernelCodec  # noqa: E402
from turboquant.kernels.rotate import rotate  # noqa: E402

CELLS = "8x16384x16,8x32768x16,32x4096x4,64x16384x8,1x2048x1"  # batch x context x splits
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
SLOTS = 8  # stamps per program: 0 start, 4 sequence length, 5 query, 6 first tile's codes, 1 first tile
#            attended, 2 interior tiles done, 3 last tile done, 7 the SM's id
STAMP = '''
    @gluon.jit
    def _stamp(times_ptr, slot, after):
        """Lane 0 writes the global timer into slot `slot` once `after` is computed, and the SM's id into slot 7."""
        lanes: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        lane = gl.arange(0, 32, layout=lanes)
        operand = gl.full([32], 0, gl.int32, layout=lanes) + after.to(gl.int32)
        now = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [operand], dtype=gl.int64,
                                        is_pure=False, pack=1)
        gl.store(times_ptr + slot + lane * 0, now, mask=lane == 0)
        sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [operand], dtype=gl.int32, is_pure=False, pack=1)
        gl.store(times_ptr + 7 + lane * 0, sm.to(gl.int64), mask=lane == 0)

    # a variant per split count only'''
# (anchor in decode_fragments.py, what replaces it); each anchor must occur exactly once
EDITS = [
    ("\n    # a variant per split count only", STAMP),
    ("        partial_lse_ptr, stride_query_seq,", "        partial_lse_ptr, times_ptr, stride_query_seq,"),
    ("        split = gl.program_id(2)\n",
     "        split = gl.program_id(2)\n"
     f"        times_ptr += ((seq * NUM_KV_HEADS + kv_head) * NUM_SPLITS + split) * {SLOTS}\n"
     "        _stamp(times_ptr, 0, split * 0)\n"),
    ("        seq_len = gl.load(seq_lens_ptr + seq)\n",
     "        seq_len = gl.load(seq_lens_ptr + seq)\n        _stamp(times_ptr, 4, seq_len)\n"),
    ("        low = whole - high * 256\n",
     "        low = whole - high * 256\n        _stamp(times_ptr, 5, gl.sum(gl.sum(low, 1), 0))\n"),
    ("        block = _tile_block(table_ptr, lo + 2 * _TILE, hi, BLOCK_SIZE)\n        # keys before",
     "        block = _tile_block(table_ptr, lo + 2 * _TILE, hi, BLOCK_SIZE)\n"
     "        _stamp(times_ptr, 6, gl.sum(gl.sum(tile[0], 1), 0) + gl.sum(gl.sum(tile[3], 1), 0))\n"
     "        # keys before"),
    ("VALUE_LUT, USE_SOFTCAP, True)\n        tile = following\n",
     "VALUE_LUT, USE_SOFTCAP, True)\n"
     "        _stamp(times_ptr, 1, gl.sum(running_sum, 0))\n        tile = following\n"),
    ("        if last > lo:\n", "        _stamp(times_ptr, 2, gl.sum(running_sum, 0))\n        if last > lo:\n"),
    ("        out = acc / gl.convert_layout(gl.maximum(running_sum, 1e-30), heads_layout)[None, :]\n",
     "        out = acc / gl.convert_layout(gl.maximum(running_sum, 1e-30), heads_layout)[None, :]\n"
     "        _stamp(times_ptr, 3, gl.sum(gl.sum(out, 1), 0))\n"),
    ("partial_lse: torch.Tensor, scale: float,", "partial_lse: torch.Tensor, times: torch.Tensor, scale: float,"),
    ("seq_lens if key_starts is None else key_starts, partial_out, partial_lse,",
     "seq_lens if key_starts is None else key_starts, partial_out, partial_lse, times,"),
]
# (name, end slot, start slot) of each phase reported
PHASES = [("to sequence length", 4, 0), ("to query", 5, 4), ("to first tile's codes", 6, 5),
          ("first tile attended", 1, 6), ("interior tiles", 2, 1), ("last tile", 3, 2)]


def stamped_module(directory: Path):
    """decode_fragments.py with the stamps, as a module of its own in `turboquant.kernels` (so its relative
    imports resolve; Gluon reads a kernel's source file)."""
    source = Path(decode_fragments.__file__).read_text()
    for anchor, replacement in EDITS:
        if (count := source.count(anchor)) != 1:
            raise SystemExit(f"decode_fragments.py changed: anchor {anchor.strip()[:60]!r} found {count} times")
        source = source.replace(anchor, replacement)
    return kernel_module(source, "decode_fragments_stamped", directory)


def percentiles(values: torch.Tensor) -> dict:
    """Microseconds at the 0th, 10th, 50th, 90th and 100th percentiles of nanosecond values."""
    values = values.double()
    return {p: round(torch.quantile(values, p / 100).item() / 1000, 3) for p in (0, 10, 50, 90, 100)}


def cell(stamped, codec: KernelCodec, batch: int, context: int, splits: int) -> dict:
    table, seq_lens, num_blocks = block_table_for(batch, context)
    cache = random_compressed_cache(codec, num_blocks)
    query = rotate(torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16), codec)
    partial_out = torch.empty(batch, NUM_Q_HEADS, splits, HEAD_DIM, device="cuda")
    partial_lse = torch.empty(batch, NUM_Q_HEADS, splits, device="cuda")
    times = torch.zeros(batch * NUM_KV_HEADS * splits, SLOTS, dtype=torch.int64, device="cuda")
    scale = HEAD_DIM**-0.5

    def plain():
        decode_fragments.launch_split(query, cache, codec, table, seq_lens, None, partial_out, partial_lse, scale,
                                      None, None)

    def with_stamps():
        stamped.launch_split(query, cache, codec, table, seq_lens, None, partial_out, partial_lse, times, scale,
                             None, None)
    row = {"batch": batch, "context": context, "splits": splits, "plain_ms": round(graph_time_ms(plain), 5)}
    expected = partial_out.clone()
    row["stamped_ms"] = round(graph_time_ms(with_stamps), 5)
    row["max_difference"] = float((partial_out - expected).abs().max())
    for _ in range(3):  # the stamps of the last of a few back-to-back launches
        with_stamps()
    torch.cuda.synchronize()
    stamps = times.cpu()
    stamps[:, :7] -= stamps[:, 0].min()
    interior_tiles = max(1, context // splits // 16 - 2)
    for name, end, start in PHASES:
        row[name] = percentiles((stamps[:, end] - stamps[:, start]) / (interior_tiles if name == "interior tiles"
                                                                       else 1))
    row["program start"] = percentiles(stamps[:, 0])
    row["program end"] = percentiles(stamps[:, 3])
    sms = stamps[:, 7]
    sm_end = torch.zeros(int(sms.max()) + 1, dtype=torch.int64).scatter_reduce(0, sms, stamps[:, 3], "amax")
    per_sm = torch.bincount(sms)
    row["programs per SM"] = {int(n): int((per_sm == n).sum()) for n in per_sm.unique().tolist() if n}
    row["SM end"] = percentiles(sm_end[per_sm > 0])
    # whether the late programs are those of crowded SMs, and how far apart one pair's splits end (what
    # handing a pair's tiles out at run time could even out)
    crowding = per_sm[sms]
    row["program end by programs on its SM"] = {int(n): percentiles(stamps[crowding == n, 3])
                                                for n in crowding.unique().tolist()}
    pair_ends = stamps[:, 3].view(batch * NUM_KV_HEADS, splits)
    row["pair end spread"] = percentiles(pair_ends.max(1).values - pair_ends.min(1).values)
    row["pair end"] = percentiles(pair_ends.max(1).values)
    return row


def compile_only() -> int:
    from decode_sass import compile_fragment_kernel
    from gemv_sass import disassemble

    with tempfile.TemporaryDirectory() as directory:
        stamped = stamped_module(Path(directory))
        sass, usage = disassemble(compile_fragment_kernel(HEAD_DIM, stamped._fragment_split_kernel,
                                                          {"times_ptr": "*i64"}).asm["cubin"])
    registers = re.search(r"REG:(\d+)", usage)
    print(json.dumps({"registers": int(registers.group(1)) if registers else None,
                      "timer_reads": sass.count("SR_GLOBALTIMER")}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/decode-timeline-h200.json")
    parser.add_argument("--cells", default=CELLS, help="BATCHxCONTEXTxSPLITS items, comma-separated "
                                                       "(default: %(default)s)")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the stamped copy for sm_90 on the CPU (no GPU) and print its registers and "
                             "timer reads (tests/kernels/test_decode_fragments.py checks that it still builds)")
    args = parser.parse_args()
    if args.compile_only:
        return compile_only()
    try:
        cells = parse_cells(args.cells, 3)
    except ValueError:
        parser.error("--cells takes BATCHxCONTEXTxSPLITS items of positive numbers, comma-separated")
    if not torch.cuda.is_available() or decode_fragments.gluon is None:
        parser.error("needs a CUDA device and a Triton with Gluon")
    codec = KernelCodec.from_config(TurboQuantConfig(key_bits=4, value_bits=4), HEAD_DIM, NUM_KV_HEADS, BLOCK_SIZE,
                                    device="cuda")
    with tempfile.TemporaryDirectory() as directory:
        stamped = stamped_module(Path(directory))
        rows = []
        for batch, context, splits in cells:
            rows.append(cell(stamped, codec, batch, context, splits))
            print(json.dumps(rows[-1]), flush=True)
    build = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "build": build,
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    names = [name for name, _, _ in PHASES]
    lines = [f"Device: {result['device']}, {result['date']}, build `{build}`. The fragment kernel alone, k4v4 d=128, "
             "32 q / 8 kv heads, page 16, at a fixed split count; ms per launch (CUDA graph), plain and stamped. "
             "Phases in µs per program, median [10th–90th percentile]; 'interior tiles' per tile; program and SM "
             "ends from the wave's first start, median [max].", "",
             "| batch | context | splits | plain ms | stamped ms | " + " | ".join(names)
             + " | program end | SM end | pair end | one pair's splits, last − first end | programs per SM |",
             "|---:|---:|---:|---:|---:|" + "---:|" * (len(names) + 4) + "---|"]
    for row in rows:
        lines.append(f"| {row['batch']} | {row['context']} | {row['splits']} | {row['plain_ms']:.4f} | "
                     f"{row['stamped_ms']:.4f} | "
                     + " | ".join(f"{row[n][50]} [{row[n][10]}–{row[n][90]}]" for n in names)
                     + f" | {row['program end'][50]} [{row['program end'][100]}] | {row['SM end'][50]} "
                     f"[{row['SM end'][100]}] | {row['pair end'][50]} [{row['pair end'][100]}] | "
                     f"{row['pair end spread'][50]} [{row['pair end spread'][100]}] | {row['programs per SM']} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
