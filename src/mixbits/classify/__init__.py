"""Sentence classifiers: a trained linear head for encoders without one, and the layer-wise
quantization flow of `mixbits classify` (per-layer accuracy drops, fixed-tier strategies)."""
