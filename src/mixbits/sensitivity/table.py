"""The damage table: what allocation consumes.

For every quantizable unit u (a linear layer) and every candidate config c (bits x group
size, plus "keep in 16 bit"), `damage[u, c]` is the predicted increase in loss when u alone is
stored with c. Keeping a unit has damage 0. Storage cost is not stored here: it follows from
the unit's shape through the cost model (`quant/cost.py`), so it can never disagree with it.

`scores[method][u]` is one scalar per unit and method, for ranking and for the heuristic
strategies. The table is saved as `sensitivity.json`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np

from mixbits.io import atomic_write_json
from mixbits.quant.cost import layer_storage_bytes
from mixbits.quant.spec import QuantSpec

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
            [[8 * layer_storage_bytes(o, i, c) for c in self.configs] for o, i in self.shapes], dtype=np.float64
        )

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
                    "scores": {k: float(v[u]) for k, v in self.scores.items()},
                    "damage": {c.label: float(self.damage[u, j]) for j, c in enumerate(self.configs)},
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
    def from_dict(cls, data: Mapping) -> "DamageTable":
        if data.get("format") != TABLE_FORMAT:
            raise ValueError(f"not a mixbits sensitivity table (format {data.get('format')!r}, expected {TABLE_FORMAT!r})")
        configs = tuple(QuantSpec.parse(c) for c in data["configs"])
        units = data["units"]
        score_names = list(units[0]["scores"]) if units else []
        return cls(
            units=tuple(u["name"] for u in units),
            shapes=tuple(tuple(u["shape"]) for u in units),
            configs=configs,
            damage=np.array([[u["damage"][c.label] for c in configs] for u in units], dtype=np.float64),
            method=data["method"],
            scores={k: np.array([u["scores"][k] for u in units]) for k in score_names},
            meta=data.get("meta", {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> "DamageTable":
        return cls.from_dict(json.loads(Path(path).read_text()))
