"""Budgets in the units users speak, turned into stored bits for the solver.

- `bpw`: average stored bits per weight over the units of the damage table (the linears inside
  the blocks), counting codes, scales and zero-points exactly as the cost model stores them;
  a unit kept in 16 bit counts 16.
- `size_mb`: the whole saved model in MB (10^6 bytes): the units as above plus every other
  tensor (embeddings, norms, an untied lm_head, biases) stored in 16 bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixbits.errors import UserError


@dataclass(frozen=True)
class Budget:
    bpw: float | None = None
    size_mb: float | None = None

    def __post_init__(self) -> None:
        if (self.bpw is None) == (self.size_mb is None):
            raise UserError("give exactly one budget: --target-bpw or --target-size-mb")
        value = self.bpw if self.bpw is not None else self.size_mb
        if not value > 0:
            raise UserError(f"budget must be positive, got {value!r}")

    @property
    def label(self) -> str:
        return f"{self.bpw:g} bpw" if self.bpw is not None else f"{self.size_mb:g} MB"

    def to_bits(self, unit_numel: int, fixed_bytes: int) -> float:
        """Stored bits the units may use; `fixed_bytes` is everything outside the units."""
        if self.bpw is not None:
            return self.bpw * unit_numel
        return (self.size_mb * 1e6 - fixed_bytes) * 8.0

    def from_bits(self, bits: float, unit_numel: int, fixed_bytes: int) -> float:
        """The inverse of `to_bits`, in this budget's own unit (for error messages)."""
        if self.bpw is not None:
            return bits / unit_numel
        return (bits / 8.0 + fixed_bytes) / 1e6
