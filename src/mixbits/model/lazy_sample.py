"""Fixed samples of a lazy checkpoint's tensors, read from the shards without materializing anything.

The sensitivity cache keys a table by a fingerprint of the model's weights: per tensor, `blocks`
runs of `size` consecutive elements of the flattened tensor at a fixed stride (all of a small
tensor; `sensitivity.cache._sample`). A lazy checkpoint's skeleton holds no values, so this reads
exactly those elements from the memory-mapped shards (the rows that hold them, through
`safe_open(...).get_slice`) and casts them as `LazyCheckpoint.materialize` would (floating tensors
to the compute dtype). The fingerprint of a lazy checkpoint is then the fingerprint of the same
model loaded whole in that dtype: a table computed either way is found by the other.

Cost: `blocks` small reads per tensor (a few rows each), whatever the model's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mixbits.model.lazy import LazyCheckpoint

__all__ = ["checkpoint_sampler"]


def checkpoint_sampler(checkpoint: LazyCheckpoint, *, blocks: int,
                       size: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """sample(name, meta_tensor) -> the flat sample of parameter/buffer `name` on the CPU, in the
    dtype `meta_tensor` has (what the materialized tensor would hold)."""
    from safetensors import safe_open

    canonical = {alias: name for name, aliases in checkpoint._aliases.items() for alias in aliases}
    handles: dict = {}

    def sample(name: str, tensor: torch.Tensor) -> torch.Tensor:
        key = checkpoint._keys[canonical[name]]
        file = checkpoint.entries[key].file
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt", device="cpu")
        piece = handles[file].get_slice(key)
        shape = tuple(piece.get_shape())
        n = math.prod(shape)
        if n <= blocks * size or not shape:
            flat = handles[file].get_tensor(key).reshape(-1)
        else:
            row = math.prod(shape[1:])
            parts = []
            for start in (k * (n - size) // (blocks - 1) for k in range(blocks)):
                first, last = start // row, (start + size - 1) // row
                rows = piece[first : last + 1].reshape(-1)
                offset = start - first * row
                parts.append(rows[offset : offset + size])
            flat = torch.cat(parts)
        return flat.to(tensor.dtype).contiguous()

    return sample
