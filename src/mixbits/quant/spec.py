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


@dataclass(frozen=True)
class GGMLSpec:
    """A ggml block type (llama.cpp's GGUF tensor types) as data: the layout, not a function per type.

    A row is cut into blocks of `block` weights (256 for the K-quants, 32 for the legacy types).
    A block holds one fp16 super scale d (and, when mins are quantized, one fp16 super min dmin),
    then per sub-block of `sub_block` weights a `scale_bits` scale code (none when 0: the
    sub-block is the block and d is its scale) and a `min_bits` min code (0: symmetric; 16: an
    fp16 min per block, the legacy _1 types), then one `code_bits` code per weight. A weight is

        w = (d * sc) * q - (dmin * mn)          q in [qmin, qmax], sc in [scmin, scmax]

    with signed q and sc for symmetric types. A non-uniform type (`levels`, IQ4_NL, IQ4_XS) instead stores
    an index q in [0, len(levels)) per weight: w = (d * sc) * levels[q]. Bytes per block follow from the
    fields and equal ggml's (GGML_QUANT_SIZES), so bits_per_weight is exact: Q4_K = 144 * 8 / 256 = 4.5.
    """

    name: str
    block: int
    sub_block: int
    code_bits: int
    scale_bits: int
    min_bits: int
    levels: tuple[int, ...] = ()  # a non-uniform grid (IQ4_NL, IQ4_XS): the values an index selects, times the scale

    keep = False  # never the fp16 "keep" spec; lets a plan hold GGML types beside QuantSpecs

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def bits(self) -> int:
        return self.code_bits

    @property
    def symmetric(self) -> bool:
        return self.min_bits == 0

    @property
    def subs(self) -> int:
        """Sub-blocks per block."""
        return self.block // self.sub_block

    @property
    def qmin(self) -> int:
        return -(1 << (self.code_bits - 1)) if self.symmetric and not self.levels else 0

    @property
    def qmax(self) -> int:
        if self.levels:
            return len(self.levels) - 1
        return (1 << (self.code_bits - 1)) - 1 if self.symmetric else (1 << self.code_bits) - 1

    @property
    def sc_range(self) -> tuple[int, int]:
        """Range of the sub-block scale codes: signed for symmetric types; (1, 1) when there are none."""
        if self.scale_bits == 0:
            return (1, 1)
        if self.symmetric:
            return (-(1 << (self.scale_bits - 1)), (1 << (self.scale_bits - 1)) - 1)
        return (0, (1 << self.scale_bits) - 1)

    @property
    def type_size(self) -> int:
        """Bytes of one block: codes, sub-block scale and min codes, fp16 super scale(s)."""
        supers = 1 + (0 < self.min_bits < 16)  # d, plus dmin when mins are quantized codes
        bits = self.block * self.code_bits + self.subs * (self.scale_bits + self.min_bits)
        return bits // 8 + 2 * supers

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block

    def fits(self, in_features: int) -> bool:
        """Whether a row of `in_features` weights splits into whole blocks of this type."""
        return in_features > 0 and in_features % self.block == 0

    @classmethod
    def parse(cls, text: str) -> "GGMLSpec":
        """A type by name, any case: ``q4_k``, ``Q8_0``."""
        key = text.strip().upper()
        if key not in GGML_TYPES:
            raise UserError(f"unknown ggml type {text!r}; mixbits writes {', '.join(GGML_TYPES)}")
        return GGML_TYPES[key]


IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl

GGML_TYPES = {s.name: s for s in (
    GGMLSpec("Q2_K", 256, 16, 2, 4, 4),
    GGMLSpec("Q3_K", 256, 16, 3, 6, 0),
    GGMLSpec("Q4_K", 256, 32, 4, 6, 6),
    GGMLSpec("Q5_K", 256, 32, 5, 6, 6),
    GGMLSpec("Q6_K", 256, 16, 6, 8, 0),
    GGMLSpec("Q4_0", 32, 32, 4, 0, 0),
    GGMLSpec("IQ4_NL", 32, 32, 4, 0, 0, IQ4_NL_LEVELS),
    GGMLSpec("IQ4_XS", 256, 32, 4, 6, 0, IQ4_NL_LEVELS),  # IQ4_NL's levels, signed 6-bit sub-block scales under d
    GGMLSpec("Q4_1", 32, 32, 4, 0, 16),
    GGMLSpec("Q5_0", 32, 32, 5, 0, 0),
    GGMLSpec("Q5_1", 32, 32, 5, 0, 16),
    GGMLSpec("Q8_0", 32, 32, 8, 0, 0),
)}
"""Every ggml type mixbits quantizes to, by ggml's name, cheapest K-quant first."""


def ggml_types_for_row(in_features: int) -> tuple[GGMLSpec, ...]:
    """The ggml types a row of `in_features` weights can take, by bits per weight (cheapest first).

    K-quants need whole super-blocks of 256, the legacy types blocks of 32; llama.cpp falls
    back for other rows too. Empty when `in_features` is not a multiple of 32."""
    return tuple(sorted((s for s in GGML_TYPES.values() if s.fits(in_features)), key=lambda s: s.bits_per_weight))


def parse_spec(text: str) -> QuantSpec | GGMLSpec:
    """A spec from its label: a ggml type's name (``q4_k``) or an affine label (``w4g128``, ``fp16``)."""
    return GGMLSpec.parse(text) if text.strip().upper() in GGML_TYPES else QuantSpec.parse(text)
