"""Native checkpoints of weight-compressed HF models: `save_quantized` / `load_quantized`.

A directory holds the HF `config.json` (and tokenizer files), `model.safetensors` (every tensor of the
state dict: TQLinear codes and norms, the rest as they are; a tied weight is stored once) and
`turboquant_weights.json` (bits, the layers at other bits, group size, seed, which Linear layers are
TQLinear, which names are ties).
Loading builds the model with its parameters on the meta device, swaps in TQLinear shells and assigns
the stored tensors read straight to the target device, so no full-precision copy of a compressed weight
is ever made there.
"""

from __future__ import annotations

import collections
import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..weights import TQLinear

WEIGHTS_CONFIG = "turboquant_weights.json"
TENSORS = "model.safetensors"
FORMAT_VERSION = 2  # 2: codes stored sign-magnitude (`core.packing.sign_magnitude`); 1 stored indices


def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS_CONFIG).is_file()


def save_quantized(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write a model whose Linear layers were swapped by `quantize_model` (one group size; bits may differ
    per layer, as the kurtosis rule chooses them)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, TQLinear)}
    if not layers:
        raise ValueError("the model has no TQLinear layers: run turboquant.weights.quantize_model first")
    shapes = {(m.group_size, m.seed) for m in layers.values()}
    if len(shapes) != 1:
        raise ValueError(f"save_quantized stores one group_size/seed per model, found {sorted(shapes)}")
    group_size, seed = shapes.pop()
    counts = collections.Counter(m.bits for m in layers.values())
    bits = counts.most_common(1)[0][0]
    layer_bits = {name: m.bits for name, m in sorted(layers.items()) if m.bits != bits}
    state, ties, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and key in seen:
            ties[name] = seen[key]
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / TENSORS)
    model.config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / WEIGHTS_CONFIG).write_text(json.dumps(dict(
        format=FORMAT_VERSION, bits=bits, layer_bits=layer_bits, group_size=group_size, seed=seed,
        layers=sorted(layers), ties=ties,
    ), indent=1) + "\n")
    return directory


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters created inside go to the meta device (no memory, no init); buffers stay real, so the
    ones a model computes at construction (rotary frequencies) need no checkpoint entry."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_quantized(directory: str | Path, device: str | torch.device = "cpu"):
    """The model saved by `save_quantized`, in eval mode on `device`, every tensor in its stored dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not is_quantized_checkpoint(directory):
        raise ValueError(f"{directory} is not a turboquant weight checkpoint (no {WEIGHTS_CONFIG})")
    meta = json.loads((directory / WEIGHTS_CONFIG).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT_VERSION}")
    config = AutoConfig.from_pretrained(directory)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    for name in meta["layers"]:
        linear = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        bits = meta.get("layer_bits", {}).get(name, meta["bits"])
        shell = TQLinear(linear.in_features, linear.out_features, linear.bias is not None, bits,
                         meta["group_size"], meta["seed"], device="meta")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, shell)
    state = load_file(directory / TENSORS, device=str(device))
    for name, source in meta["ties"].items():
        state[name] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()
