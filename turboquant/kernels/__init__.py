"""Triton kernels over the paged compressed cache (needs `triton`; the PyTorch definitions they are
tested against are in `reference.py`)."""

from .codec import KernelCodec
from .decode import paged_decode_attention
from .exact_ring import ExactRing
from .extend import cached_attention, extend_attention
from .gather import gather_sequences
from .latent import LatentCodec, latent_decode, latent_gather, latent_store
from .store import compress_store

__all__ = ["KernelCodec", "ExactRing", "compress_store", "paged_decode_attention", "extend_attention",
           "cached_attention", "gather_sequences", "LatentCodec", "latent_store", "latent_decode", "latent_gather"]
