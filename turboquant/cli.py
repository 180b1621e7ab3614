"""turboquant: TurboQuant KV-cache compression. Commands: presets | verify | generate | demo | compress-weights.
User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core import PRESETS, TurboQuantConfig


def cmd_presets(args: argparse.Namespace) -> int:
    """Bytes, compression ratio and reconstruction cosine per preset on random KV-shaped tensors."""
    import torch

    from .core.quantizer import MSEQuantizer

    TurboQuantConfig().check_head_dim(args.head_dim)
    generator = torch.Generator().manual_seed(0)
    # KV-shaped: [tokens, kv_heads, head_dim] with a heavy channel offset, as real keys have.
    keys = torch.randn(args.tokens, 8, args.head_dim, generator=generator) + 2 * torch.randn(args.head_dim, generator=generator)
    values = torch.randn(args.tokens, 8, args.head_dim, generator=generator)
    print(f"head_dim={args.head_dim}, {args.tokens} tokens x 8 kv heads, bf16 = {4 * args.head_dim} B/token/head")
    print(f"{'preset':8} {'bytes':>6} {'ratio':>6} {'cos K':>7} {'cos V':>7}")
    for name in PRESETS:
        config = TurboQuantConfig.from_preset(name)
        cosines = []
        for role, x in (("key", keys), ("value", values)):
            quantizer = config.make_quantizer(role, args.head_dim)
            assert isinstance(quantizer, MSEQuantizer)
            x_hat = quantizer.dequantize(quantizer.quantize(x))
            cosines.append(torch.nn.functional.cosine_similarity(x_hat, x, dim=-1).mean().item())
        print(f"{name:8} {config.bytes_per_token_per_head(args.head_dim):6d} "
              f"{config.compression_ratio(args.head_dim):5.2f}x {cosines[0]:7.4f} {cosines[1]:7.4f}")
    return 0


def _codec_config(args: argparse.Namespace) -> TurboQuantConfig:
    overrides = {}
    if args.window is not None:
        overrides["residual_window"] = args.window
    if args.sinks is not None:
        overrides["sink_tokens"] = args.sinks
    return TurboQuantConfig.from_preset(args.preset, **overrides)


def cmd_verify(args: argparse.Namespace) -> int:
    """Per-layer K/V/attention cosine and next-token agreement on the evaluation text; exit 1 on FAIL."""
    import json

    from .hf.models import eval_text, load_model
    from .hf.verify import format_report, verify

    config = _codec_config(args)
    model, tokenizer = load_model(args.model)
    report = verify(model, tokenizer, eval_text(), config, args.prefill, args.decode_tokens, progress=not args.json)
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 0 if report.passed else 1


def cmd_generate(args: argparse.Namespace) -> int:
    """Greedy generation with TurboQuantCache (and DynamicCache beside it with --compare)."""
    import time

    import torch
    from transformers import DynamicCache

    from .hf.cache import TurboQuantCache, cache_kwargs, kv_cache_nbytes
    from .hf.models import load_model

    config = _codec_config(args)
    model, tokenizer = load_model(args.model)
    messages = [{"role": "user", "content": args.prompt}]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    runs = [("turboquant " + args.preset, lambda: TurboQuantCache(model.config, config))]
    if args.compare:
        runs.insert(0, ("bf16/fp32 DynamicCache", lambda: DynamicCache(config=model.config)))
    for name, make_cache in runs:
        cache = make_cache()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=args.max_new_tokens,
                                 do_sample=False)
        seconds = time.perf_counter() - start
        new = out[0, inputs.input_ids.shape[1]:]
        print(f"=== {name}: {len(new) / seconds:.1f} tokens/s, KV cache {kv_cache_nbytes(cache):,} bytes")
        print(tokenizer.decode(new, skip_special_tokens=True).strip())
    full_precision = config.sink_tokens + config.residual_window
    if out.shape[1] <= full_precision:
        print(f"(all {out.shape[1]} tokens are within the {config.sink_tokens} sink + {config.residual_window} recent "
              "tokens kept in full precision, so nothing is compressed yet: generate more tokens to see the saving)")
    return 0


def cmd_compress_weights(args: argparse.Namespace) -> int:
    """Compress every Linear layer but the output head to TurboQuant codes and write a native checkpoint
    (load it with `--model DIR` in the other commands, or turboquant.hf.checkpoint.load_quantized)."""
    import torch

    from .hf.checkpoint import save_quantized
    from .hf.models import load_model
    from .weights import HEAVY_TAIL, TQLinear, quantize_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty")
    model, tokenizer = load_model(args.model, dtype=torch.bfloat16)
    quantize_model(model, bits=args.bits, group_size=args.group_size, heavy_tail=HEAVY_TAIL if args.heavy_tail else None)
    save_quantized(model, out, tokenizer)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}: {size / 2**20:.1f} MiB (TQ{args.bits}, groups of {args.group_size})")
    if args.heavy_tail:
        moved = {name: m.bits for name, m in model.named_modules() if isinstance(m, TQLinear) and m.bits != args.bits}
        print(f"heavy-tailed tensors at other bits: {moved or 'none'}")
    return 0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (embedded SmolLM2-135M-Instruct, default), a local HF directory, a .gguf file, or a hub id")
    parser.add_argument("--preset", default="k4v4", choices=sorted(PRESETS), help="bits for keys and values (default k4v4)")
    parser.add_argument("--window", type=int, default=None, help="recent tokens kept full precision (default 128)")
    parser.add_argument("--sinks", type=int, default=None, help="first tokens kept full precision (default 4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turboquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    presets = sub.add_parser("presets", help="bytes, ratio and cosine of every preset on random KV tensors")
    presets.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    presets.add_argument("--tokens", type=int, default=4096, help="tokens to compress (default 4096)")
    presets.set_defaults(func=cmd_presets)
    verify = sub.add_parser("verify", help="per-layer fidelity and next-token agreement on a real model; exit 1 on FAIL",
                            description=cmd_verify.__doc__)
    _add_model_options(verify)
    verify.add_argument("--prefill", type=int, default=256, help="prompt tokens before decoding (default 256)")
    verify.add_argument("--decode-tokens", type=int, default=128, help="teacher-forced decode steps (default 128)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=cmd_verify)
    generate = sub.add_parser("generate", help="generate with the compressed cache", description=cmd_generate.__doc__)
    _add_model_options(generate)
    generate.add_argument("prompt", help="the user message")
    generate.add_argument("--compare", action="store_true", help="also run DynamicCache and print both")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    generate.set_defaults(func=cmd_generate)
    compress = sub.add_parser("compress-weights", help="write a weight-compressed native checkpoint",
                              description=cmd_compress_weights.__doc__)
    compress.add_argument("--model", default="smollm2", help="as for the other commands (default: embedded SmolLM2)")
    compress.add_argument("--bits", type=int, default=4, help="bits per weight: 2, 3 or 4 (default 4)")
    compress.add_argument("--group-size", type=int, default=128,
                          help="weights per group along each row, one fp16 norm each (default 128)")
    compress.add_argument("--out", required=True, help="directory to write (must be new or empty)")
    compress.add_argument("--heavy-tail", action="store_true",
                          help="per-tensor bits from excess kurtosis: above 10 → 4 bits, above 30 → kept unquantized "
                               "(turboquant.weights.HEAVY_TAIL)")
    compress.set_defaults(func=cmd_compress_weights)
    demo = sub.add_parser("demo", help="what `make demo` runs: verify, then generate --compare, on the embedded model")
    demo.set_defaults(func=cmd_demo)
    return parser


def demo_prompt() -> str:
    """The demo's user message: a passage longer than the full-precision window (4 sink + 128 recent
    tokens), so the cache sizes differ."""
    from .hf.models import eval_text

    passage = " ".join(eval_text().split("\n\n")[1:3])
    return f"Summarize this text in two sentences.\n\n{passage}"


def cmd_demo(args: argparse.Namespace) -> int:
    parser = build_parser()
    status = cmd_verify(parser.parse_args(["verify"]))
    return status or cmd_generate(parser.parse_args(["generate", "--compare", "--max-new-tokens", "96",
                                                     demo_prompt()]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"turboquant: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
