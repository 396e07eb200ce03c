"""What an export format can store, as data, and the check of a plan against it.

Each format states its `Rules`: the bit-widths it has codes for, whether groups must tile a
row exactly, what its packing asks of a layer's shape, and whether fused layers (q/k/v,
gate/up, which engines run as one matrix) must share one spec. `problems` lists every layer of
a plan that the format cannot express, each with the nearest spec it can; an export runs
`require_expressible` before it writes a single byte, so a refused plan leaves nothing behind.

"Nearest" keeps quality first: bits are rounded *up* to the next width the format has (down
only when none is higher), the group size is kept when it fits, else the next smaller one
that does (finer groups, a little more overhead), else per-channel; a layer no spec fits stays
in 16 bit. Fused layers that disagree get the most precise of their specs.

A ggml type (`GGMLSpec`, GGUF only) needs rows that are whole blocks (256 weights for the
K-quants, 32 for the legacy types); its nearest is the cheapest type of the format the row
allows at no fewer bits per weight (Q4_K on a 576-wide row: Q4_0; Q6_K: Q8_0; IQ4_XS: IQ4_NL, a tie
going to the same levels), else 16 bit.
A format without ggml types takes the affine spec with the same code bits and 32-wide groups.
In a format with ggml types, an affine spec it cannot store (2, 3 or 6 bits) becomes the
cheapest ggml type with as many code bits that the row allows (w3g128 -> Q3_K), before bits
are rounded up: the layer keeps its precision at close to its size, re-quantized on that grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mixbits.errors import UserError
from mixbits.plan import Plan
from mixbits.quant.spec import GGML_TYPES, KEEP, VALID_GROUP_SIZES, GGMLSpec, QuantSpec


class ExportError(UserError):
    """A plan or model that a format cannot store; raised before anything is written."""


@dataclass(frozen=True)
class Rules:
    """Constraints of one format. word_bits: in*bits and out*bits must be multiples of it."""

    name: str
    bits: tuple[int, ...]
    whole_groups: bool = False
    row_multiple: int = 1
    word_bits: int = 0
    fused_alike: bool = False
    ggml_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class Problem:
    """Layers a format cannot store as planned, why, and the nearest spec it can."""

    layers: tuple[str, ...]
    spec: str
    reason: str
    nearest: QuantSpec

    def __str__(self) -> str:
        names = self.layers[0] if len(self.layers) == 1 else "{" + ", ".join(self.layers) + "}"
        return f"{names} {self.spec}: {self.reason}; nearest: {self.nearest.label}"


def _ggml_problem(rules: Rules, spec: GGMLSpec, in_features: int) -> str | None:
    if spec.name not in rules.ggml_types:
        return f"{rules.name} has no ggml type {spec.name} (GGUF stores ggml types)"
    if not spec.fits(in_features):
        return f"its {in_features} inputs are not a multiple of {spec.block}, the {spec.name} block"
    return None


def _ggml_nearest(rules: Rules, spec: GGMLSpec, shape: tuple[int, int]) -> QuantSpec | GGMLSpec:
    in_features = shape[1]
    if not rules.ggml_types:  # another format: the affine spec with the same codes
        return nearest_spec(rules, QuantSpec(spec.code_bits, 32, spec.symmetric), shape)
    allowed = [GGML_TYPES[n] for n in rules.ggml_types if GGML_TYPES[n].fits(in_features)]
    richer = sorted((s for s in allowed if s.bits_per_weight >= spec.bits_per_weight),
                    key=lambda s: (s.bits_per_weight, s.levels != spec.levels))  # a tie keeps the grid: IQ4_XS -> IQ4_NL
    if richer:
        return richer[0]
    return max(allowed, key=lambda s: s.bits_per_weight) if allowed else KEEP


def spec_problem(rules: Rules, spec: QuantSpec | GGMLSpec, shape: tuple[int, int]) -> str | None:
    """Why `rules` cannot store a [out, in] layer as `spec`, or None when it can."""
    if spec.keep:
        return None
    out_features, in_features = shape
    if isinstance(spec, GGMLSpec):
        return _ggml_problem(rules, spec, in_features)
    if spec.bits not in rules.bits:
        return f"{rules.name} has no {spec.bits}-bit codes (it stores {', '.join(map(str, rules.bits))} bits)"
    if rules.whole_groups and spec.group_size is not None and in_features % spec.group_size:
        return f"groups of {spec.group_size} do not tile its {in_features} inputs"
    if in_features % rules.row_multiple:
        return f"its {in_features} inputs are not a multiple of {rules.row_multiple}"
    if rules.word_bits and (in_features * spec.bits % rules.word_bits or out_features * spec.bits % rules.word_bits):
        return (f"a [{out_features}, {in_features}] weight at {spec.bits} bits does not fill whole "
                f"{rules.word_bits}-bit words")
    return None


def _bit_order(rules: Rules, bits: int) -> list[int]:
    up = sorted(b for b in rules.bits if b >= bits)
    down = sorted((b for b in rules.bits if b < bits), reverse=True)
    return up + down


def _group_order(group: int | None) -> list[int | None]:
    finer = sorted((g for g in VALID_GROUP_SIZES if g is not None and (group is None or g < group)), reverse=True)
    return [group, *finer, None] if group is not None else [None, *finer]


def nearest_spec(rules: Rules, spec: QuantSpec | GGMLSpec, shape: tuple[int, int]) -> QuantSpec | GGMLSpec:
    """The spec `rules` can store that is closest to `spec` (see the module docstring)."""
    if spec_problem(rules, spec, shape) is None:
        return spec
    if isinstance(spec, GGMLSpec):
        return _ggml_nearest(rules, spec, shape)
    same_bits = [GGML_TYPES[n] for n in rules.ggml_types if GGML_TYPES[n].code_bits == spec.bits]
    same_bits = sorted((s for s in same_bits if s.fits(shape[1])), key=lambda s: s.bits_per_weight)
    if same_bits:
        return same_bits[0]
    for bits in _bit_order(rules, spec.bits):
        for group in _group_order(spec.group_size):
            candidate = QuantSpec(bits, group, spec.symmetric)
            if spec_problem(rules, candidate, shape) is None:
                return candidate
    return KEEP


def _most_precise(specs: Iterable[QuantSpec]) -> QuantSpec:
    specs = list(specs)
    if any(s.keep for s in specs):
        return KEEP
    bits = max(s.bits for s in specs)
    groups = [s.group_size for s in specs if s.bits == bits]
    sized = [g for g in groups if g is not None]
    return QuantSpec(bits, min(sized) if sized else None, all(s.symmetric for s in specs))


def _fused_spec(rules: Rules, members: Sequence[str], specs: Mapping[str, QuantSpec], shapes) -> QuantSpec:
    own = [_ggml_nearest(rules, specs[n], shapes[n]) if isinstance(specs[n], GGMLSpec) else specs[n] for n in members]
    unified = _most_precise(own)
    if all(spec_problem(rules, unified, shapes[n]) is None for n in members):
        return unified
    return KEEP


def problems(
    rules: Rules, plan: Plan, shapes: Mapping[str, tuple[int, int]], fused: Sequence[Sequence[str]] = ()
) -> list[Problem]:
    """Every layer (or fused group) of `plan` that `rules` cannot store, in plan order."""
    plan.validate(shapes, rows=False)  # rows a ggml type cannot split are problems listed here
    found = []
    for name, spec in plan.specs.items():
        reason = spec_problem(rules, spec, shapes[name])
        if reason is not None:
            found.append(Problem((name,), spec.label, reason, nearest_spec(rules, spec, shapes[name])))
    if rules.fused_alike:
        specs = {name: plan.specs.get(name, KEEP) for name in shapes}
        for members in fused:
            labels = {specs[n].label for n in members}
            if len(labels) > 1:
                reason = f"{rules.name} runs these fused layers as one matrix, so they must share one spec"
                found.append(Problem(tuple(members), "/".join(specs[n].label for n in members), reason,
                                     _fused_spec(rules, members, specs, shapes)))
    return found


def nearest_plan(
    rules: Rules, plan: Plan, shapes: Mapping[str, tuple[int, int]], fused: Sequence[Sequence[str]] = ()
) -> Plan:
    """`plan` with every layer `rules` cannot store replaced by its nearest storable spec."""
    plan.validate(shapes, rows=False)
    specs = {name: nearest_spec(rules, spec, shapes[name]) for name, spec in plan.specs.items()}
    if rules.fused_alike:
        full = {name: specs.get(name, KEEP) for name in shapes}
        for members in fused:
            if len({full[n].label for n in members}) > 1:
                unified = _fused_spec(rules, members, full, shapes)
                specs.update({n: unified for n in members})
    return Plan(specs, {**plan.meta, "nearest_for": rules.name})


def require_expressible(
    rules: Rules, plan: Plan, shapes: Mapping[str, tuple[int, int]], fused: Sequence[Sequence[str]] = ()
) -> None:
    """Raise ExportError naming every layer `rules` cannot store and the nearest plan."""
    found = problems(rules, plan, shapes, fused)
    if not found:
        return
    shown = "\n  ".join(str(p) for p in found[:20])
    more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
    raise ExportError(
        f"the plan cannot be written as {rules.name}: {len(found)} problem(s):\n  {shown}{more}\n"
        f"Nothing was written. Export the nearest expressible plan instead (bits rounded up, so quality is "
        f"kept): `mixbits.export.formats.nearest_plan({rules.name!r}, ...)` or `mixbits export --nearest`, "
        f"or choose a format that stores these layers (native stores every plan)"
    )
