"""mixbits: sensitivity-guided mixed-precision quantization of transformer language models."""

__version__ = "0.1.0"
