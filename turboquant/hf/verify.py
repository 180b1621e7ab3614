"""`turboquant verify`: per-layer fidelity of the compressed cache on a real model and text.

Two runs over the same tokens, teacher-forced through the decode path: DynamicCache and
TurboQuantCache. Per layer it reports the cosine of the reconstructed K and V (compressed tokens
only) and of the attention output at every decode step; overall, next-token agreement and PPL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..core import TurboQuantConfig
from .cache import TurboQuantCache, TurboQuantLayer
from .evaluate import compare_logits, decode_logits

# PASS thresholds by the smaller of key/value bits, for the defaults (window, sinks, centering).
AGREEMENT_THRESHOLDS = {8: 0.97, 4: 0.95, 3: 0.90, 2: 0.75, 1: 0.5}
KV_COSINE_THRESHOLDS = {8: 0.999, 4: 0.99, 3: 0.97, 2: 0.9, 1: 0.7}


@dataclass
class LayerReport:
    layer: int
    status: str  # "compressed" or why it was not
    key_cosine: float | None = None
    value_cosine: float | None = None
    attention_cosine: float | None = None


@dataclass
class VerifyReport:
    preset: dict
    tokens: dict
    agreement: float
    top1_match: float
    perplexity: float
    baseline_perplexity: float
    kv_bytes: int
    dynamic_kv_bytes: int
    layers: list[LayerReport] = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)
    passed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules that know their cache layer (`layer_idx`)."""
    modules = [m for name, m in model.named_modules()
               if name.endswith("self_attn") and isinstance(getattr(m, "layer_idx", None), int)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no `self_attn` modules with a `layer_idx` to compare")
    return modules


def _record_attention_outputs(model) -> tuple[list[list[torch.Tensor]], list[torch.nn.Module], list]:
    modules = _attention_modules(model)
    outputs: list[list[torch.Tensor]] = [[] for _ in modules]

    def hook(index):
        def record(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[index].append(hidden[:, -1].detach().float())
        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    return outputs, modules, handles


def _run(model, input_ids, prefill, cache, progress) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Logits of the decode steps and, per cache layer, its self-attention's outputs at those steps."""
    outputs, modules, handles = _record_attention_outputs(model)
    try:
        logits = decode_logits(model, input_ids, prefill, cache, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    # Skip the prefill's entry: compare the decode steps, which read the cache. Modules that never ran
    # (a vision tower's on text input) are left out; cross-attention layers have no `self_attn` to match.
    by_layer = {}
    for module, steps in zip(modules, outputs):
        if steps:
            if module.layer_idx in by_layer:
                raise ValueError(f"two self-attention modules ran as cache layer {module.layer_idx}")
            by_layer[module.layer_idx] = torch.cat(steps[1:], dim=0)
    return logits, by_layer


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def _kv_cosines(reference_cache, layer: TurboQuantLayer, layer_idx: int) -> tuple[float, float] | None:
    """Cosine of the layer's reconstruction on the compressed tokens, recomputed from the baseline K/V."""
    keys, values = reference_cache.layers[layer_idx].keys, reference_cache.layers[layer_idx].values
    probe = TurboQuantLayer(layer.config, layer_idx, "compact", layer.latent)
    probe.update(keys, values)  # returns what this call attends to (exact); the middle run is compressed after
    compressed = probe.compressed_kv()
    if compressed is None:
        return None
    start = 0 if probe.sink_keys is None else probe.sink_keys.shape[2]
    stop = start + compressed[0].shape[2]
    return (_mean_cosine(compressed[0], keys[:, :, start:stop]), _mean_cosine(compressed[1], values[:, :, start:stop]))


def verify(model, tokenizer, text: str, config: TurboQuantConfig, prefill: int = 256, decode_tokens: int = 128,
           progress: bool = True) -> VerifyReport:
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, : prefill + decode_tokens].to(model.device)
    return verify_ids(model, input_ids, config, prefill, progress)


def verify_ids(model, input_ids: torch.Tensor, config: TurboQuantConfig, prefill: int = 256,
               progress: bool = True) -> VerifyReport:
    """`verify` on token ids [1, tokens]: the first `prefill` are prefilled, the rest teacher-forced."""
    from transformers import DynamicCache

    if input_ids.shape[1] < prefill + 2:
        raise ValueError(f"the text has {input_ids.shape[1]} tokens, fewer than prefill + 2 = {prefill + 2}")
    baseline_cache = DynamicCache(config=model.config)
    baseline, baseline_attention = _run(model, input_ids, prefill, baseline_cache, "baseline" if progress else None)
    cache = TurboQuantCache(model.config, config)
    ours, our_attention = _run(model, input_ids, prefill, cache, "turboquant" if progress else None)
    agreement = compare_logits(baseline, ours, input_ids[0, prefill:])

    bits = min(config.key_bits, config.value_bits)
    thresholds = {"agreement": AGREEMENT_THRESHOLDS[bits], "kv_cosine": KV_COSINE_THRESHOLDS[bits]}
    layers = []
    for idx, layer in enumerate(cache.layers):
        report = LayerReport(idx, "compressed")
        if not isinstance(layer, TurboQuantLayer):
            report.status = cache.uncompressed[idx]
        else:
            cosines = _kv_cosines(baseline_cache, layer, idx)
            if cosines is not None:
                report.key_cosine, report.value_cosine = cosines
        if idx in our_attention:
            report.attention_cosine = _mean_cosine(our_attention[idx], baseline_attention[idx])
        layers.append(report)
    kv_ok = all(r.key_cosine is None or min(r.key_cosine, r.value_cosine) >= thresholds["kv_cosine"] for r in layers)
    return VerifyReport(
        preset=asdict(config), tokens={"prefill": prefill, "decode": input_ids.shape[1] - prefill},
        agreement=agreement.agreement, top1_match=agreement.top1_match, perplexity=agreement.perplexity,
        baseline_perplexity=agreement.baseline_perplexity, kv_bytes=cache.nbytes(),
        dynamic_kv_bytes=cache.dynamic_cache_nbytes(), layers=layers, thresholds=thresholds,
        passed=kv_ok and agreement.agreement >= thresholds["agreement"],
    )


def format_report(report: VerifyReport) -> str:
    lines = [f"{'layer':>5} {'cos K':>7} {'cos V':>7} {'cos attn':>8}  status"]
    fmt = lambda x: f"{x:7.4f}" if x is not None else "      -"
    for r in report.layers:
        lines.append(f"{r.layer:5d} {fmt(r.key_cosine)} {fmt(r.value_cosine)} {fmt(r.attention_cosine):>8}  {r.status}")
    change = report.perplexity / report.baseline_perplexity - 1
    lines += [
        f"next-token agreement {report.agreement:.2%} (top-1 match {report.top1_match:.2%}) over "
        f"{report.tokens['decode']} decode steps after a {report.tokens['prefill']}-token prefill",
        f"perplexity {report.perplexity:.3f} vs {report.baseline_perplexity:.3f} ({change:+.2%})",
        f"KV bytes {report.kv_bytes:,} vs DynamicCache {report.dynamic_kv_bytes:,} "
        f"({report.dynamic_kv_bytes / max(report.kv_bytes, 1):.2f}x fewer)",
        f"thresholds: agreement >= {report.thresholds['agreement']:.0%}, K/V cosine >= {report.thresholds['kv_cosine']}",
        "PASS" if report.passed else "FAIL",
    ]
    return "\n".join(lines)
