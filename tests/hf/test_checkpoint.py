"""Native checkpoints of weight-compressed models: save → load gives the same model, built without
materialising the compressed weights."""

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from turboquant.hf.checkpoint import WEIGHTS_CONFIG, load_quantized, save_quantized  # noqa: E402
from turboquant.weights import TQLinear, quantize_model  # noqa: E402


def tiny_model(tie: bool):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_save_then_load_gives_identical_outputs(tie, tmp_path):
    model = quantize_model(tiny_model(tie), bits=3, group_size=64, progress=False)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert sum(isinstance(m, TQLinear) for m in loaded.modules()) == 2 * 7  # q k v o gate up down per layer
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    meta = json.loads((tmp_path / WEIGHTS_CONFIG).read_text())
    assert (meta["bits"], meta["group_size"]) == (3, 64)
    assert ("lm_head.weight" in meta["ties"]) == tie  # a tied head is stored once
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_layers_at_other_bits_load_at_their_bits(tmp_path):
    model = quantize_model(tiny_model(False), bits=3, group_size=64, progress=False)
    mlp = model.model.layers[1].mlp
    mlp.down_proj = TQLinear.from_linear(nn.Linear(256, 128, bias=False), bits=4, group_size=64)  # as the kurtosis rule would
    save_quantized(model, tmp_path)
    meta = json.loads((tmp_path / WEIGHTS_CONFIG).read_text())
    assert meta["bits"] == 3 and meta["layer_bits"] == {"model.layers.1.mlp.down_proj": 4}
    loaded = load_quantized(tmp_path)
    assert loaded.model.layers[1].mlp.down_proj.bits == 4 and loaded.model.layers[0].mlp.down_proj.bits == 3
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_loading_never_builds_a_full_weight_for_a_compressed_layer(tmp_path, monkeypatch):
    save_quantized(quantize_model(tiny_model(False), bits=4, group_size=64, progress=False), tmp_path)
    shapes = []
    original = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters",
                        lambda self: shapes.append(self.weight.device.type) or original(self))
    load_quantized(tmp_path)
    assert shapes and set(shapes) == {"meta"}  # every Linear weight was created on the meta device


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="no TQLinear layers"):
        save_quantized(tiny_model(False), tmp_path)
    with pytest.raises(ValueError, match="not a turboquant weight checkpoint"):
        load_quantized(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loading_onto_the_gpu_peaks_below_the_bf16_weights(tmp_path):
    """Measured: loading straight onto the GPU allocates about the checkpoint's bytes, never the bf16
    weights of the compressed layers (here 4.4x more than their codes)."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4)
    model = quantize_model(transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval(), bits=4, group_size=128,
                           progress=False)
    save_quantized(model, tmp_path)
    bf16_linear_bytes = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, TQLinear))
    stored_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loaded = load_quantized(tmp_path, "cuda")
    peak = torch.cuda.max_memory_allocated() - before
    assert loaded.model.layers[0].mlp.down_proj.packed.is_cuda
    assert peak < stored_bytes * 1.1 < bf16_linear_bytes
