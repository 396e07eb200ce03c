"""The bit plan: layer name -> QuantSpec, as data.

A plan is what allocation produces and what quantization, export and training consume. It is
saved as JSON (or YAML) so a person can read, edit and reuse it:

    {"format": "mixbits.plan/1",
     "layers": {"model.layers.0.self_attn.q_proj": "w4g64", ...},
     "meta": {...}}

Each layer value is a spec label (``w3g128``, ``w4pc``, ``w4g64s``, ``fp16``), a ggml type
label for GGUF (``q4_k``, ``q8_0``: `GGMLSpec`, allowed only on layers whose row length splits
into its blocks) or a mapping ``{"bits": 3, "group_size": 128, "symmetric": false}``. Layers of the model that a plan does
not name stay in 16-bit floating point.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mixbits.errors import UserError
from mixbits.io import atomic_write_text
from mixbits.quant.cost import layer_storage_bytes
from mixbits.quant.spec import GGML_TYPES, VALID_BITS, VALID_GROUP_SIZES, GGMLSpec, QuantSpec, ggml_types_for_row
from mixbits.safeload import load_file

PLAN_FORMAT = "mixbits.plan/1"


class PlanError(UserError):
    """A plan that cannot be applied to the model it was given."""


@dataclass(frozen=True)
class Plan:
    specs: Mapping[str, QuantSpec | GGMLSpec]
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", MappingProxyType(dict(self.specs)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @classmethod
    def uniform(cls, layers: Mapping[str, object], spec: QuantSpec, **meta) -> "Plan":
        return cls({name: spec for name in layers}, {"strategy": f"uniform {spec.label}", **meta})

    def quantized(self) -> dict[str, QuantSpec]:
        """The layers that are actually quantized (not kept in 16 bit)."""
        return {n: s for n, s in self.specs.items() if not s.keep}

    def validate(self, shapes: Mapping[str, tuple[int, int]], *, rows: bool = True) -> None:
        """Check every named layer exists in the model, and (`rows`) that each ggml type's blocks
        divide its layer's rows; `shapes` maps name -> (out, in). Exporters pass rows=False: they
        list every such layer with the nearest storable spec themselves (`export.rules`)."""
        unknown = [n for n in self.specs if n not in shapes]
        if unknown:
            known = list(shapes)[:3]
            raise PlanError(
                f"plan names {len(unknown)} layer(s) the model does not have, e.g. {unknown[:3]}; "
                f"layer names look like {known} (see `mixbits analyze` output or layer_statistics.json)"
            )
        for name, spec in self.specs.items() if rows else ():
            in_features = shapes[name][1]
            if isinstance(spec, GGMLSpec) and not spec.fits(in_features):
                allowed = [s.label for s in ggml_types_for_row(in_features)]
                raise PlanError(
                    f"plan gives layer {name!r} the ggml type {spec.label}, but its rows of {in_features} weights "
                    f"do not split into blocks of {spec.block}; that row length allows "
                    f"{allowed or 'no ggml type'} (or an affine spec such as w4g128)"
                )

    def storage_bytes(self, shapes: Mapping[str, tuple[int, int]]) -> int:
        """Bytes of every layer in `shapes`, quantized per the plan or kept in 16 bit."""
        keep = QuantSpec(16, None)
        return sum(layer_storage_bytes(o, i, self.specs.get(n, keep)) for n, (o, i) in shapes.items())

    def bits_per_weight(self, shapes: Mapping[str, tuple[int, int]]) -> float:
        """Average stored bits per weight over the layers in `shapes`, overhead included."""
        numel = sum(o * i for o, i in shapes.values())
        return 8.0 * self.storage_bytes(shapes) / numel

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "layers": {n: s.label for n, s in self.specs.items()},
            "meta": dict(self.meta),
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        data = self.to_dict()
        text = yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(data, indent=2)
        atomic_write_text(path, text)

    @classmethod
    def from_dict(cls, data: object, source: str = "plan") -> "Plan":
        """Validate `data` field by field (strict types: 4.5 bits or "false" are refused, never cast)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), Mapping):
            raise PlanError(f"{source} is not a plan: expected a mapping with a 'layers' mapping of name -> spec")
        unknown = sorted(set(map(str, data)) - {"format", "layers", "meta"})
        if unknown:
            raise PlanError(f"{source} has unknown top-level key(s) {unknown}; a plan has format, layers and meta")
        fmt = data.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise PlanError(f"{source} has format {fmt!r}; this mixbits reads {PLAN_FORMAT!r}")
        meta = data.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise PlanError(f"{source}: 'meta' is {type(meta).__name__} {meta!r}; it must be a mapping (or absent)")
        specs = {}
        for name, value in data["layers"].items():
            if not isinstance(name, str):
                raise PlanError(f"{source}: layer name {name!r} is of type {type(name).__name__}; layer names are strings")
            specs[name] = _layer_spec(value, f"{source}: layer {name!r}")
        return cls(specs, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file (JSON, or YAML by suffix) with the limits of `mixbits.safeload`.

        A plan that quantizes no layer is refused: running it would measure the original model."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {str(path)!r} does not exist; write one with `mixbits allocate` or `mixbits run`")
        source = f"plan file {str(path)!r}"
        try:
            data = load_file(path, "plan file")
        except UserError as err:
            raise PlanError(str(err)) from None
        plan = cls.from_dict(data, source=source)
        if not plan.quantized():
            raise PlanError(
                f"{source} quantizes no layer ({len(plan.specs)} layer(s), all kept in 16 bit); give at least one "
                "layer a spec such as \"w4g128\", or run without --plan to let mixbits allocate one"
            )
        return plan


class _SpecFields(BaseModel):
    """A layer's spec written as a mapping; strict: no casts from float, string or bool."""

    model_config = ConfigDict(strict=True, extra="forbid")
    bits: int
    group_size: Optional[int] = 128
    symmetric: bool = False


_ACCEPTED = {
    "bits": f"an integer, one of {VALID_BITS} (16 keeps the layer)",
    "group_size": f"an integer, one of {tuple(g for g in VALID_GROUP_SIZES if g)}, or null for per-channel",
    "symmetric": "true or false (a boolean, not a string)",
}


def _layer_spec(value: object, where: str) -> QuantSpec | GGMLSpec:
    """The QuantSpec of one plan entry; `where` ("plan file 'p.json': layer 'x'") leads every error."""
    if isinstance(value, str):
        if value.strip().upper() in GGML_TYPES:
            return GGMLSpec.parse(value)
        try:
            return QuantSpec.parse(value)
        except ValueError as err:
            raise PlanError(f"{where}: {err}; or a ggml type for GGUF: {', '.join(s.label for s in GGML_TYPES.values())}") from None
    if not isinstance(value, Mapping):
        raise PlanError(f"{where}: {value!r} is of type {type(value).__name__}; write a spec label such as \"w4g128\" "
                        "or a mapping {bits, group_size, symmetric}")
    try:
        fields = _SpecFields.model_validate(dict(value))
    except ValidationError as err:
        raise PlanError(f"{where}: " + "; ".join(_describe(e) for e in err.errors())) from None
    try:
        return QuantSpec(fields.bits, fields.group_size, fields.symmetric)
    except ValueError as err:
        raise PlanError(f"{where}: {err}") from None


def _describe(error: Mapping) -> str:
    """One pydantic error as "field 'bits' = 4.5 (float): expected an integer, one of ..."."""
    field_name = str(error["loc"][0]) if error["loc"] else "?"
    if error["type"] == "extra_forbidden":
        return f"unknown keys [{field_name!r}]; allowed: bits, group_size, symmetric"
    if error["type"] == "missing":
        return f"field {field_name!r} is missing; it must be {_ACCEPTED.get(field_name, 'given')}"
    value = error.get("input")
    accepted = _ACCEPTED.get(field_name, error["msg"])
    return f"field {field_name!r} = {value!r} ({type(value).__name__}) is not accepted; it must be {accepted}"
