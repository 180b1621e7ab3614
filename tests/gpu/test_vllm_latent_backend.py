"""The vLLM MLA backend adapter against the kernel references, without an engine: the store through
vLLM's call (k_pe as [tokens, 1, rope_dim], CUDA-graph padding rows), a decode batch, and prefill
queries against a cached context that vLLM split into two chunks (one empty for a sequence).
Needs vLLM importable (the GPU host); runs the kernels natively on CUDA, in the interpreter otherwise,
where vLLM's Triton merge ops (which vLLM does not load without a GPU) are replaced by their definitions."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")

HEADS, LATENT, ROPE, NOPE, V_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 64, 16, 32, 32, 16, 20
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYER = "model.layers.1.self_attn.attn"  # a 4-bit (non-boundary) layer of 4


def merge_definition(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse=None, **_):
    """vLLM's merge_attn_states: two partial softmaxes combined by their log-sum-exps ([heads, tokens])."""
    lse = torch.logaddexp(prefix_lse, suffix_lse)
    prefix_weight = (prefix_lse - lse).exp().T[..., None]
    suffix_weight = (suffix_lse - lse).exp().T[..., None]
    output.copy_(prefix_output.float() * prefix_weight + suffix_output.float() * suffix_weight)
    if output_lse is not None:
        output_lse.copy_(lse)


def mask_empty_definition(lse, output, query_start_loc, context_start_loc):
    """vLLM's mask_empty_context: queries of a sequence whose context chunk is empty get weight 0."""
    for seq in range(query_start_loc.shape[0] - 1):
        if context_start_loc[seq + 1] == context_start_loc[seq]:
            rows = slice(int(query_start_loc[seq]), int(query_start_loc[seq + 1]))
            lse[:, rows] = float("-inf")
            output[rows] = 0.0


@pytest.fixture
def impl(monkeypatch):
    return make_impl(monkeypatch, {"turboquant": "k4v4"})


def make_impl(monkeypatch, additional_config: dict):
    from vllm.model_executor.layers.attention import mla_attention

    from turboquant.vllm import latent_backend

    config = SimpleNamespace(
        additional_config=additional_config,
        model_config=SimpleNamespace(get_total_num_hidden_layers=lambda: 4),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1, prefill_context_parallel_size=1,
                                        cp_kv_cache_interleave_size=1),
    )
    monkeypatch.setattr(latent_backend, "get_current_vllm_config", lambda: config)
    monkeypatch.setattr(mla_attention, "get_current_vllm_config", lambda: config)
    if DEVICE == "cpu":
        monkeypatch.setattr(latent_backend, "merge_attn_states", merge_definition)
        monkeypatch.setattr(latent_backend, "mask_empty_context", mask_empty_definition)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    weight = (torch.randn(LATENT, HEADS * (NOPE + V_DIM), generator=generator) / LATENT ** 0.5).to(DEVICE)
    impl = latent_backend.TurboQuantLatentImpl(
        num_heads=HEADS, head_size=LATENT + ROPE, scale=(NOPE + ROPE) ** -0.5, num_kv_heads=1, alibi_slopes=None,
        sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None, attn_type="decoder",
        kv_sharing_target_layer_name=None, q_lora_rank=None, kv_lora_rank=LATENT, qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE, qk_head_dim=NOPE + ROPE, v_head_dim=V_DIM,
        kv_b_proj=lambda x: ((x.float() @ weight).to(x.dtype),))
    # vLLM's absorbed projections of this layer, which the plugin has the impl fold its rotation into
    impl.test_layer = SimpleNamespace(layer_name=LAYER,
                                      W_UK_T=torch.randn(HEADS, NOPE, LATENT, generator=generator).to(DEVICE),
                                      W_UV=torch.randn(HEADS, LATENT, V_DIM, generator=generator).to(DEVICE))
    impl.test_unfolded = (impl.test_layer.W_UK_T.clone(), impl.test_layer.W_UV.clone())
    impl.fold_rotation(impl.test_layer)
    impl.test_weight, impl.test_generator = weight, generator
    return impl


def test_exact_tokens_set_in_the_config_are_refused_for_mla_layers(monkeypatch):
    """The default (on for the other backend) turns itself off here; counts set in the config stop the engine."""
    assert make_impl(monkeypatch, {"turboquant": "k4v4"}).settings.exact_sinks is None
    with pytest.raises(ValueError, match="cannot be served on MLA"):
        make_impl(monkeypatch, {"turboquant": {"preset": "k4v4", "exact_sinks": 4, "exact_recent": 32}})


def randn(impl, *shape):
    return torch.randn(*shape, generator=impl.test_generator).to(DEVICE, torch.bfloat16)


def filled_cache(impl, lengths: list[int]):
    """A cache holding `lengths[i]` random tokens of sequence i, stored through the impl as vLLM calls it."""
    from turboquant.kernels.latent import latent_token_bytes

    cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE * latent_token_bytes(LATENT, ROPE, 4), dtype=torch.uint8,
                        device=DEVICE)
    blocks_per_seq = max(-(-length // BLOCK_SIZE) for length in lengths)
    order = torch.randperm(NUM_BLOCKS, generator=impl.test_generator)
    block_table = order[: len(lengths) * blocks_per_seq].reshape(len(lengths), blocks_per_seq).to(torch.int32)
    positions = [torch.arange(length) for length in lengths]
    slots = torch.cat([block_table[seq, p // BLOCK_SIZE].long() * BLOCK_SIZE + p % BLOCK_SIZE
                       for seq, p in enumerate(positions)]).to(DEVICE)
    tokens = slots.numel()
    # vLLM's padded rows (CUDA graphs) come after the slot mapping's length and must not be stored
    kv_c, k_pe = randn(impl, tokens + 3, LATENT), randn(impl, tokens + 3, 1, ROPE)
    impl.do_kv_cache_update(kv_c, k_pe, cache, slots, "auto", None)
    return cache, block_table.to(DEVICE), slots, kv_c[:tokens], k_pe[:tokens, 0]


def test_store_writes_what_the_reference_writes(impl):
    from turboquant.kernels.reference import latent_store_reference

    cache, _, slots, kv_c, k_pe = filled_cache(impl, [21, 9])
    assert impl.codec.layout.block_size == BLOCK_SIZE and impl.codec.layout.bits == 4
    expected = torch.zeros_like(cache)
    latent_store_reference(kv_c, k_pe, slots, expected, impl.codec)
    codes, norms, rope = impl.codec.layout.views(cache)
    expected_codes, expected_norms, expected_rope = impl.codec.layout.views(expected)
    # codes may differ in the rare coordinate that sits on a decision boundary after fp32 rounding
    assert (codes != expected_codes).float().mean() < 1e-3
    torch.testing.assert_close(norms, expected_norms, rtol=1e-5, atol=1e-6)
    assert torch.equal(rope, expected_rope)


def test_decode_with_folded_projections_matches_the_reference(impl):
    from turboquant.kernels.reference import latent_decode_reference

    lengths = [37, 5, 50]
    cache, block_table, *_ = filled_cache(impl, lengths)
    rotation = impl.codec.rotation
    W_UK_T, W_UV = impl.test_unfolded
    # the folded projections: q_nope·W_UK_T' = (q_nope·W_UK_T)·Rᵀ and o_rot·W_UV' = (o_rot·R)·W_UV
    q_nope, o_rot = torch.randn(HEADS, 2, NOPE).to(DEVICE), torch.randn(HEADS, 2, LATENT).to(DEVICE)
    torch.testing.assert_close(q_nope @ impl.test_layer.W_UK_T, (q_nope @ W_UK_T) @ rotation.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o_rot @ impl.test_layer.W_UV, (o_rot @ rotation) @ W_UV, atol=1e-4, rtol=1e-4)

    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    # as vLLM hands them over: q_latent from a per-head bmm with the folded W_UK_T, [heads, batch, latent]
    # transposed, so already rotated
    q_latent, q_pe = randn(impl, HEADS, 3, LATENT).transpose(0, 1), randn(impl, 3, HEADS, ROPE)
    metadata = SimpleNamespace(decode=SimpleNamespace(block_table=block_table, seq_lens=seq_lens))
    out, lse = impl.forward_mqa((q_latent, q_pe), cache, metadata, layer=None)
    assert lse is None and out.dtype == torch.bfloat16 and out.shape == (3, HEADS, LATENT)
    expected = latent_decode_reference(q_latent.float() @ rotation, q_pe, cache, impl.codec, block_table, seq_lens,
                                       impl.scale) @ rotation.T  # the reference in the original space, rotated
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)  # bf16 output, fp16 level products
    concatenated, _ = impl.forward_mqa(torch.cat([q_latent, q_pe], -1), cache, metadata, layer=None)
    assert torch.equal(concatenated, out)
    with pytest.raises(RuntimeError, match="already folded"):
        impl.fold_rotation(impl.test_layer)


class ContextAttention:
    """A prefill backend's context step: each sequence's queries attend (no mask) to its chunk's keys."""

    def __init__(self, query_start: list[int], chunk_starts: list[list[int]]):
        self.query_start, self.chunk_starts = query_start, chunk_starts  # per chunk: cumulative key rows

    def run_prefill_context_chunk(self, chunk_idx, q, k, v):
        out = torch.full((q.shape[0], HEADS, V_DIM), float("nan"), device=q.device)  # undefined where empty
        lse = torch.full((HEADS, q.shape[0]), float("-inf"), device=q.device)
        starts = self.chunk_starts[chunk_idx]
        for seq in range(len(self.query_start) - 1):
            rows, keys = slice(self.query_start[seq], self.query_start[seq + 1]), slice(starts[seq], starts[seq + 1])
            if keys.stop > keys.start:
                scores = torch.einsum("qhd,khd->hqk", q[rows].float(), k[keys].float()) * (NOPE + ROPE) ** -0.5
                lse[:, rows] = scores.logsumexp(-1)
                out[rows] = torch.einsum("hqk,khd->qhd", (scores - lse[:, rows, None]).exp(), v[keys].float())
        return out.to(q.dtype), lse


def test_prefill_context_in_two_chunks_matches_attention_over_the_dequantized_context(impl):
    from turboquant.kernels.reference import latent_gather_reference

    contexts, queries = [37, 20], [3, 4]
    cache, block_table, *_ = filled_cache(impl, contexts)
    # vLLM's plan for a workspace of 24 rows: chunk 0 = tokens 0:24 and 0:20, chunk 1 = 24:37 and nothing
    chunks = [([0, 0], [24, 20]), ([24, 20], [13, 0])]
    cu = [torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
          for _, lens in chunks]
    query_start = [0, 3, 7]
    context = SimpleNamespace(
        cu_seq_lens=cu, starts=[torch.tensor(starts, dtype=torch.int32, device=DEVICE) for starts, _ in chunks],
        seq_tot=[sum(lens) for _, lens in chunks], max_seq_lens=[max(lens) for _, lens in chunks],
        workspace=torch.full((44, LATENT + ROPE), float("nan"), dtype=torch.bfloat16, device=DEVICE),
        has_empty_context=[False, True])
    prefill = SimpleNamespace(chunked_context=context, block_table=block_table,
                              query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=DEVICE),
                              prefill_backend=ContextAttention(query_start, [c.tolist() for c in cu]))
    q = randn(impl, sum(queries), HEADS, NOPE + ROPE)
    out, lse = impl._compute_prefill_context(q, cache, SimpleNamespace(prefill=prefill), None)

    weight = impl.test_weight.view(LATENT, HEADS, NOPE + V_DIM)
    for seq, length in enumerate(contexts):
        kv_c, k_pe = latent_gather_reference(cache, impl.codec, block_table[seq], 0, length)
        kv_c = kv_c.bfloat16().float()  # the workspace holds the model's dtype
        k_nope, v = torch.einsum("tl,lhd->thd", kv_c, weight).split([NOPE, V_DIM], -1)
        k = torch.cat([k_nope, k_pe.float()[:, None].expand(-1, HEADS, -1)], -1)
        rows = slice(query_start[seq], query_start[seq + 1])
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), k) * (NOPE + ROPE) ** -0.5
        expected_lse = scores.logsumexp(-1)
        expected = torch.einsum("hqk,khd->qhd", (scores - expected_lse[..., None]).exp(), v)
        # bf16 keys/values from the workspace and bf16 partial outputs
        torch.testing.assert_close(out[rows].float(), expected, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(lse[:, rows].float(), expected_lse, atol=3e-2, rtol=1e-2)
