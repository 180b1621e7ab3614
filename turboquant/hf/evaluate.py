"""Fidelity measurements shared by `turboquant verify` and `benchmarks/quality.py`.

Next-token agreement = 1 − mean total-variation distance between the baseline's and the compressed
run's next-token distributions, teacher-forced *through the decode path*: prefill a prefix, then feed
the reference tokens one at a time so every step attends to what the cache stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .cache import cache_kwargs


@torch.no_grad()
def decode_logits(model, input_ids: torch.Tensor, prefill: int, cache=None, progress: str | None = None) -> torch.Tensor:
    """Logits [len − prefill, vocab] predicting tokens prefill.. of input_ids [1, len], one decode step
    per token after a `prefill`-token prompt. With `cache=None`, a DynamicCache is used."""
    from transformers import DynamicCache

    cache_argument = cache_kwargs(model, DynamicCache(config=model.config) if cache is None else cache)
    out = model(input_ids[:, :prefill], use_cache=True, **cache_argument)
    logits = [out.logits[:, -1].float()]
    steps = range(prefill, input_ids.shape[1] - 1)
    for position in tqdm(steps, desc=progress, disable=progress is None, leave=False):
        out = model(input_ids[:, position : position + 1], use_cache=True, **cache_argument)
        logits.append(out.logits[:, -1].float())
    return torch.cat(logits, dim=0)


@dataclass
class Agreement:
    agreement: float  # 1 − mean TV distance
    top1_match: float  # fraction of positions with the same argmax
    perplexity: float  # of the reference tokens under the compressed run
    baseline_perplexity: float

    @property
    def perplexity_change(self) -> float:
        return self.perplexity / self.baseline_perplexity - 1


def compare_logits(baseline: torch.Tensor, compressed: torch.Tensor, targets: torch.Tensor) -> Agreement:
    """baseline, compressed: [N, vocab] logits; targets: [N] the tokens that followed."""
    p, q = baseline.float().softmax(-1), compressed.float().softmax(-1)
    tv = 0.5 * (p - q).abs().sum(-1)

    def perplexity(logits: torch.Tensor) -> float:
        return math.exp(torch.nn.functional.cross_entropy(logits.float(), targets).item())

    return Agreement(
        agreement=1 - tv.mean().item(),
        top1_match=(baseline.argmax(-1) == compressed.argmax(-1)).float().mean().item(),
        perplexity=perplexity(compressed),
        baseline_perplexity=perplexity(baseline),
    )


@torch.no_grad()
def greedy_divergence(model, prompt_ids: torch.Tensor, new_tokens: int, make_cache) -> tuple[int, bool]:
    """(tokens identical before the first divergence, fully identical) for greedy decoding with
    DynamicCache vs `make_cache()`."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    mask = torch.ones_like(prompt_ids)
    base = model.generate(prompt_ids, attention_mask=mask, **kwargs)[0, prompt_ids.shape[1] :]
    ours = model.generate(prompt_ids, attention_mask=mask, **cache_kwargs(model, make_cache()), **kwargs)
    ours = ours[0, prompt_ids.shape[1] :]
    length = min(len(base), len(ours))
    differ = (base[:length] != ours[:length]).nonzero()
    first = int(differ[0]) if len(differ) else length
    return first, first == length == len(base) == len(ours)
