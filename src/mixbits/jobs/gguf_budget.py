"""A run planned for a GGUF file: `--target-size-mb` with ggml candidates counts the file's bytes.

When the candidates include ggml types (`allocation.candidates` gguf or both) a size target means the
file `mixbits export --format gguf` writes from the run folder (model.gguf, general.name "model",
`gguf_pre` as tokenizer.ggml.pre), as `mixbits allocate` counts it (`jobs.allocate`): the fixed part
(embeddings and head in F16, norms in F32, header, metadata with the tokenizer, padding) from the
model's config and tokenizer (`export.gguf_size`), each block linear at its bytes in the file
(`allocate.file_cost`; an option GGUF cannot store on a row costs +inf and is never chosen). The
budget is checked before calibration, the exact solver keeps the file at or below the target, and
the plan records `meta.gguf` (predicted and target bytes, the name and pre it was sized for), so
the export writes every layer in its planned type and warns if it would exceed the target.

Uniform baselines of such a run are the uniform plans the file can store on every layer (a
K-quant only where every row splits into 256-blocks; an affine spec only at 4, 5 or 8 bits),
priced in file bytes: the richest one at or below the target and the cheapest one above it.
`--target-bpw` keeps the cost model's meaning (bits per weight of the native folder, where a ggml
type costs exactly its bits per weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixbits.allocate.budget import Budget
from mixbits.allocate.feasibility import around_limit, check_table_budget, shape_table
from mixbits.allocate.file_cost import FileCostTable, file_cost_table
from mixbits.allocate.optimal import Constraints
from mixbits.allocate.solver import REL_TOL
from mixbits.config import RunConfig
from mixbits.errors import UserError
from mixbits.export.gguf_size import GGUFSize, gguf_size, gguf_weight_bytes, meta_model
from mixbits.jobs.allocate import GGUF_NAME
from mixbits.plan import Plan
from mixbits.quant.spec import GGMLSpec, QuantSpec, ggml_types_for_row
from mixbits.sensitivity.table import DamageTable

__all__ = ["GGUFBudget", "check_ggml_rows", "counts_gguf", "gguf_budget"]

FILE = "GGUF file"


def counts_gguf(cfg: RunConfig) -> bool:
    """Whether the run's size target counts a GGUF file (a size target over ggml candidates)."""
    return cfg.allocation.target_size_mb is not None and cfg.allocation.candidates != "affine"


def check_ggml_rows(cfg: RunConfig, shapes: dict[str, tuple[int, int]], model_name: str) -> None:
    """With `allocation.candidates` gguf, at least one block linear must have rows a ggml type splits."""
    if cfg.allocation.candidates != "gguf" or any(ggml_types_for_row(i) for _, i in shapes.values()):
        return
    rows = sorted({i for _, i in shapes.values()})
    raise UserError(f"`allocation.candidates` gguf: no block linear of {model_name} has rows a ggml type can split "
                    f"(row lengths {rows[:6]}; the legacy types need a multiple of 32, the K-quants of 256), so "
                    "nothing could be quantized; use `allocation.candidates` affine")


@dataclass(frozen=True)
class GGUFBudget:
    """The file a run's size target counts: its fixed bytes and linears (`size`), the target in bytes,
    and the general.name / tokenizer.ggml.pre the size was computed for."""

    size: GGUFSize
    target_bytes: int
    tokenizer_pre: str
    name: str = GGUF_NAME

    def priced(self, table: DamageTable) -> FileCostTable:
        """`table` with every option priced at its bytes in the file."""
        return file_cost_table(table, gguf_weight_bytes, FILE)

    def budget_bits(self) -> float:
        """Bits the linears may take: whole bytes, the solver's relative slack kept below the target."""
        return 8.0 * (self.target_bytes - self.size.fixed) * (1 - 2 * REL_TOL)

    def record(self, plan: Plan) -> Plan:
        """`plan` with meta.gguf: its predicted file bytes, the target, the name and pre sized for."""
        gguf = {"file_bytes": self.size.file_bytes(plan), "target_bytes": self.target_bytes,
                "general_name": self.name, "tokenizer_pre": self.tokenizer_pre}
        return Plan(plan.specs, {**plan.meta, "gguf": gguf})

    def baselines(self, configs) -> list[tuple[QuantSpec | GGMLSpec, bool]]:
        """The uniform plans around the target, in file bytes (module docstring); flag: fits the target."""
        shapes = self.size.shapes
        priced = []
        for spec in (c for c in configs if not c.keep):
            sizes = [gguf_weight_bytes(s, spec) for s in shapes.values()]
            if all(b is not None for b in sizes):
                block = spec.block if isinstance(spec, GGMLSpec) else spec.group_size or 1 << 30
                priced.append((self.size.fixed + sum(sizes), block, spec))
        return around_limit(priced, self.target_bytes)


def gguf_budget(cfg: RunConfig, model, tokenizer, shapes: dict[str, tuple[int, int]], groups,
                constraints: Constraints) -> GGUFBudget:
    """The GGUF budget of `cfg` for `model` (a meta skeleton will do) and `tokenizer`, checked feasible
    before any compute: BudgetInfeasible names the smallest and largest file the candidates allow.
    ExportError (a UserError) for a model the GGUF writer cannot store (its architecture)."""
    size = gguf_size(meta_model(model.config), tokenizer, tokenizer_pre=cfg.gguf_pre, name=GGUF_NAME)
    if set(size.shapes) != set(shapes):
        raise ValueError(f"the GGUF file's linears differ from the run's: {sorted(set(size.shapes) ^ set(shapes))[:3]}")
    configs = cfg.allocation.configs()
    table = file_cost_table(shape_table(shapes, configs), gguf_weight_bytes, FILE)
    budget = Budget(size_mb=cfg.allocation.target_size_mb)
    check_table_budget(table, groups, constraints, budget, size.fixed, FILE)
    return GGUFBudget(size, math.floor(cfg.allocation.target_size_mb * 1e6), cfg.gguf_pre)

