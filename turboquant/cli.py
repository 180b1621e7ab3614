"""`turboquant` command line: presets | verify | generate | demo. User errors print one line, exit 2."""

from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turboquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    presets = sub.add_parser("presets", help="bytes, ratio and cosine of every preset on random KV tensors")
    presets.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    presets.add_argument("--tokens", type=int, default=4096, help="tokens to compress (default 4096)")
    presets.set_defaults(func=cmd_presets)
    demo = sub.add_parser("demo", help="what `make demo` runs")
    demo.set_defaults(func=cmd_demo, head_dim=128, tokens=4096)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    return cmd_presets(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"turboquant: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
