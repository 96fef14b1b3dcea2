"""Compression Studio: see, quantize, measure and export language models on a desktop."""

__version__ = "0.1.0"
