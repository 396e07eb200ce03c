"""The damage table: what allocation consumes.

For every quantizable unit u (a linear layer) and every candidate config c (bits x group
size, plus "keep in 16 bit"), `damage[u, c]` is the predicted increase in loss when u alone is
stored with c. Keeping a unit has damage 0. Storage cost is not stored here: it follows from
the unit's shape through the cost model (`quant/cost.py`), so it can never disagree with it.

`scores[method][u]` is one scalar per unit and method, for ranking and for the heuristic
strategies. The table is saved as `sensitivity.json`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mixbits.errors import UserError
from mixbits.io import atomic_write_json
from mixbits.safeload import load_file
from mixbits.quant.cost import layer_storage_bytes
from mixbits.quant.spec import GGMLSpec, QuantSpec, parse_spec

TABLE_FORMAT = "mixbits.sensitivity/1"


@dataclass(frozen=True)
class DamageTable:
    units: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # (out, in) per unit
    configs: tuple[QuantSpec, ...]
    damage: np.ndarray  # [U, C] float64, predicted damage per unit and config
    method: str
    scores: Mapping[str, np.ndarray] = field(default_factory=dict)  # method -> [U]
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        damage = np.asarray(self.damage, dtype=np.float64)
        expected = (len(self.units), len(self.configs))
        if damage.shape != expected:
            raise ValueError(f"damage has shape {damage.shape}; expected {expected} (units x configs)")
        if len(self.shapes) != len(self.units):
            raise ValueError(f"{len(self.shapes)} shapes for {len(self.units)} units")
        object.__setattr__(self, "damage", damage)
        object.__setattr__(self, "scores", MappingProxyType({k: np.asarray(v, float) for k, v in self.scores.items()}))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def with_meta(self, **extra: object) -> "DamageTable":
        """The same table with `extra` added to (or replacing keys of) its meta."""
        return replace(self, meta={**dict(self.meta), **extra})

    def cost_bits(self) -> np.ndarray:
        """[U, C] stored bits of each unit under each config, from the cost model."""
        return np.array(
            [[8 * layer_storage_bytes(o, i, c) if _storable(c, i) else np.inf for c in self.configs]
             for o, i in self.shapes], dtype=np.float64
        )  # inf: a ggml type the unit's row length cannot take (allocation masks it)

    def numels(self) -> np.ndarray:
        return np.array([o * i for o, i in self.shapes], dtype=np.int64)

    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.units)}

    def to_dict(self) -> dict:
        units = []
        for u, name in enumerate(self.units):
            units.append(
                {
                    "name": name,
                    "shape": list(self.shapes[u]),
                    "params": int(self.shapes[u][0] * self.shapes[u][1]),
                    "scores": {k: _finite_or_none(v[u]) for k, v in self.scores.items()},
                    "damage": {c.label: _finite_or_none(self.damage[u, j]) for j, c in enumerate(self.configs)},
                }
            )
        return {
            "format": TABLE_FORMAT,
            "method": self.method,
            "configs": [c.label for c in self.configs],
            "meta": dict(self.meta),
            "units": units,
        }

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: object, source: str = "sensitivity table") -> "DamageTable":
        """Validate `data` field by field (strict types); `source` names the file in every error.

        null damage or score (written for a value that was not measured) reads back as NaN."""
        try:
            head = _TableFile.model_validate(data)
        except ValidationError as err:
            raise UserError(f"{source}: {_describe(err, data)}") from None
        if head.format != TABLE_FORMAT:
            raise UserError(f"{source} is not a mixbits sensitivity table (format {head.format!r}, "
                            f"expected {TABLE_FORMAT!r})")
        try:
            configs = tuple(parse_spec(c) for c in head.configs)
        except ValueError as err:
            raise UserError(f"{source}: configs: {err}") from None
        labels = [c.label for c in configs]
        units = []
        for i, row in enumerate(head.units):
            where = f"{source}: layer {row.get('name', f'#{i}') if isinstance(row, Mapping) else f'#{i}'!r}"
            try:
                unit = _UnitRow.model_validate(row)
            except ValidationError as err:
                raise UserError(f"{where}: {_describe(err, row)}") from None
            missing = [c for c in labels if c not in unit.damage]
            if missing:
                raise UserError(f"{where}: no damage for config(s) {missing}; every layer needs one per config {labels}")
            units.append(unit)
        score_names = list(units[0].scores) if units else []
        try:
            return cls(
                units=tuple(u.name for u in units),
                shapes=tuple((u.shape[0], u.shape[1]) for u in units),
                configs=configs,
                damage=np.array([[_nan_if_none(u.damage[c]) for c in labels] for u in units], dtype=np.float64),
                method=head.method,
                scores={k: np.array([_nan_if_none(u.scores.get(k)) for u in units]) for k in score_names},
                meta=head.meta,
            )
        except ValueError as err:
            raise UserError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> "DamageTable":
        """Read sensitivity.json with the limits of `mixbits.safeload`; errors name the file and the layer."""
        return cls.from_dict(load_file(path, "sensitivity file"), source=f"sensitivity file {str(path)!r}")


def _storable(spec: QuantSpec | GGMLSpec, in_features: int) -> bool:
    """False only for a ggml type whose blocks do not divide the row."""
    return not isinstance(spec, GGMLSpec) or spec.fits(in_features)


class _TableFile(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    format: str
    method: str
    configs: list[str]
    meta: dict = {}
    units: list[object]


class _UnitRow(BaseModel):
    """One layer of a saved table; numbers strict (no strings, no bools), null where not measured."""

    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    shape: Annotated[list[int], Field(min_length=2, max_length=2)]
    scores: dict[str, Optional[float]] = {}
    damage: dict[str, Optional[float]]


def _describe(err: ValidationError, data: object) -> str:
    """pydantic's errors as "field 'damage.w4g128' = 'x' (str): Input should be a valid number"."""
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "missing":
            parts.append(f"field {loc!r} is missing")
        else:
            value = e.get("input")
            parts.append(f"field {loc!r} = {_short(value)} ({type(value).__name__}): {e['msg'].lower()}")
    return "; ".join(parts)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or inf: a value that was not measured is written as null."""
    value = float(value)
    return value if np.isfinite(value) else None


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)
