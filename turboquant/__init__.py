"""turboquant: TurboQuant KV-cache (and weight) compression for vLLM and Hugging Face transformers."""

from .core import PRESETS, TurboQuantConfig

__version__ = "0.1.0"
__all__ = ["PRESETS", "TurboQuantConfig", "__version__"]
