"""The bit plan: layer name -> QuantSpec, as data.

A plan is what allocation produces and what quantization, export and training consume. It is
saved as JSON (or YAML) so a person can read, edit and reuse it:

    {"format": "mixbits.plan/1",
     "layers": {"model.layers.0.self_attn.q_proj": "w4g64", ...},
     "meta": {...}}

Each layer value is a spec label (``w3g128``, ``w4pc``, ``w4g64s``, ``fp16``) or a mapping
``{"bits": 3, "group_size": 128, "symmetric": false}``. Layers of the model that a plan does
not name stay in 16-bit floating point.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import yaml

from mixbits.errors import UserError
from mixbits.io import atomic_write_text
from mixbits.quant.cost import layer_storage_bytes
from mixbits.quant.spec import QuantSpec

PLAN_FORMAT = "mixbits.plan/1"


class PlanError(UserError):
    """A plan that cannot be applied to the model it was given."""


@dataclass(frozen=True)
class Plan:
    specs: Mapping[str, QuantSpec]
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

    def validate(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Check every named layer exists in the model; `shapes` maps name -> (out, in)."""
        unknown = [n for n in self.specs if n not in shapes]
        if unknown:
            known = list(shapes)[:3]
            raise PlanError(
                f"plan names {len(unknown)} layer(s) the model does not have, e.g. {unknown[:3]}; "
                f"layer names look like {known} (see `mixbits analyze` output or layer_statistics.json)"
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
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), Mapping):
            raise PlanError(f"{source} is not a plan: expected a mapping with a 'layers' mapping of name -> spec")
        fmt = data.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise PlanError(f"{source} has format {fmt!r}; this mixbits reads {PLAN_FORMAT!r}")
        specs = {}
        for name, value in data["layers"].items():
            try:
                specs[name] = QuantSpec.parse(value) if isinstance(value, str) else QuantSpec.from_dict(dict(value))
            except (ValueError, TypeError) as err:
                raise PlanError(f"{source}: layer {name!r}: {err}") from err
        return cls(specs, data.get("meta") or {})

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {str(path)!r} does not exist; write one with `mixbits allocate` or `mixbits run`")
        text = path.read_text()
        try:
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise PlanError(f"plan file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'JSON'}: {err}") from err
        return cls.from_dict(data, source=f"plan file {str(path)!r}")
