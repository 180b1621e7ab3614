"""Hugging Face transformers integration. Importing it registers attn_implementation="turboquant"."""

from .attention import register

register()
