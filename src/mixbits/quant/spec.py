"""How one linear layer is stored: bits, group size and symmetry, as a frozen value.

A `QuantSpec` is the unit of per-layer precision. Bits 2-8 are integer codes; bits 16 means
"keep the layer in 16-bit floating point" (not quantized). `group_size` counts consecutive
input-dimension weights that share one scale (and one zero-point when asymmetric); `None`
means per-channel (one group per output row). A row whose length is not a multiple of the
group size ends with one shorter group, as GPTQ does.

The short label (``w3g128``, ``w4pc``, ``w4g64s``, ``fp16``) is the one every file and table
uses, so a spec can be written on a command line and read back unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mixbits.errors import UserError

QUANT_BITS = (2, 3, 4, 5, 6, 8)
KEEP_BITS = 16
VALID_BITS = QUANT_BITS + (KEEP_BITS,)
VALID_GROUP_SIZES = (32, 64, 128, 256, None)

_LABEL = re.compile(r"^w(?P<bits>\d+)(?:g(?P<group>\d+)|(?P<pc>pc))(?P<sym>s?)$")


@dataclass(frozen=True)
class QuantSpec:
    """Storage of one linear layer: `bits` in VALID_BITS, `group_size` in VALID_GROUP_SIZES."""

    bits: int
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in VALID_BITS:
            raise UserError(f"bits={self.bits!r} is not supported; use one of {VALID_BITS} (16 keeps the layer)")
        if not self.keep and self.group_size not in VALID_GROUP_SIZES:
            raise UserError(
                f"group_size={self.group_size!r} is not supported; use one of "
                f"{tuple(g for g in VALID_GROUP_SIZES if g)} or None (per-channel)"
            )

    @property
    def keep(self) -> bool:
        """True when the layer stays in 16-bit floating point."""
        return self.bits == KEEP_BITS

    @property
    def maxq(self) -> int:
        """Largest integer code, 2**bits - 1."""
        return (1 << self.bits) - 1

    @property
    def label(self) -> str:
        if self.keep:
            return "fp16"
        group = "pc" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.bits}{group}{'s' if self.symmetric else ''}"

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """Read a label such as ``w3g128``, ``w4pc``, ``w4g64s`` or ``fp16``."""
        text = text.strip().lower()
        if text in ("fp16", "bf16", "16", "keep"):
            return cls(bits=KEEP_BITS, group_size=None)
        m = _LABEL.match(text)
        if m is None:
            raise UserError(
                f"cannot read quantization spec {text!r}; write it as w<bits>g<group> (w3g128), "
                "w<bits>pc for per-channel, a trailing 's' for symmetric, or fp16 to keep the layer"
            )
        group = None if m["pc"] else int(m["group"])
        return cls(bits=int(m["bits"]), group_size=group, symmetric=bool(m["sym"]))

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        unknown = set(d) - {"bits", "group_size", "symmetric"}
        if unknown:
            raise UserError(f"unknown keys {sorted(unknown)} in quantization spec {d!r}; allowed: bits, group_size, symmetric")
        if "bits" not in d:
            raise UserError(f"quantization spec {d!r} has no 'bits'")
        return cls(bits=int(d["bits"]), group_size=d.get("group_size", 128), symmetric=bool(d.get("symmetric", False)))


KEEP = QuantSpec(bits=KEEP_BITS, group_size=None)
