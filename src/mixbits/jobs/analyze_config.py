"""The frozen configuration of `mixbits analyze` (light imports: the CLI builds its options from it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mixbits.config import DEFAULT_BITS, DEFAULT_GROUPS, candidate_set, check_candidates, check_damage_rows
from mixbits.devices import compute_torch_dtype
from mixbits.errors import UserError
from mixbits.quant.spec import GGMLSpec, QuantSpec, parse_spec
from mixbits.sensitivity.methods import METHODS, check_methods
from mixbits.sensitivity.units import check_granularity

__all__ = ["MEASURED", "AnalyzeConfig"]

MEASURED = tuple(m for m, spec in METHODS.items() if spec.kind == "measured")


def _parse(labels: tuple[str, ...], flag: str) -> tuple[QuantSpec | GGMLSpec, ...]:
    try:
        return tuple(parse_spec(label) for label in labels)
    except ValueError as err:
        raise UserError(f"{flag} {','.join(labels)}: {err}") from None


@dataclass(frozen=True)
class AnalyzeConfig:
    model: str = "smollm2-135m"
    dataset: str = "wiki"
    methods: tuple[str, ...] = ("fisher", "gradient", "output_error")
    granularity: str = "layer"
    calib_windows: int = 16
    seqlen: int = 512
    seed: int = 0
    bits: tuple[int, ...] = DEFAULT_BITS
    group_sizes: tuple[int | None, ...] = DEFAULT_GROUPS
    candidates: str = "affine"  # affine grids (bits x group sizes), ggml types for GGUF, or both
    damage_rows: int | None = 64  # ggml types: fisher/gradient damage on this many strided rows per layer, scaled
    measure_configs: tuple[str, ...] | None = None  # configs measured methods run (None: all)
    validate: bool = True
    validate_configs: tuple[str, ...] = ("w2g128", "w3g128")
    validate_windows: int = 8
    validate_with: str = "divergence"  # measured method on held-out windows: divergence | ablation
    output_dir: Path = Path("runs/analyze")
    sensitivity_file: Path | None = None  # seed format {"sensitivity_scores": [...]}, one per block
    device: str = "auto"
    progress: bool = True
    use_cache: bool = True
    compute_dtype: str | None = None  # streamed; None: float32 on CPU, the stored dtype on CUDA
    offload_dir: Path | None = None  # streamed: where block boundaries wait on disk instead of in memory
    stream: bool = True  # block by block from the checkpoint when the methods allow; False: the whole model

    def __post_init__(self) -> None:
        check_methods(self.methods)
        check_granularity(self.granularity)
        check_candidates(self.candidates, "--candidates")
        check_damage_rows(self.damage_rows)
        compute_torch_dtype(self.compute_dtype)
        if self.offload_dir is not None and Path(self.offload_dir).exists() and not Path(self.offload_dir).is_dir():
            raise UserError(f"--offload-dir {str(self.offload_dir)!r} is a file; give a folder (it is created if "
                            "missing)")
        if self.validate_with not in MEASURED:
            raise UserError(f"--validate-with {self.validate_with!r}; use one of {MEASURED}")
        for flag, value, low in (("--calib-windows", self.calib_windows, 1), ("--seqlen", self.seqlen, 2),
                                 ("--validate-windows", self.validate_windows, 1)):
            if value < low:
                raise UserError(f"{flag} {value} must be at least {low}")
        if self.validate and not self.validation_specs():
            raise UserError("--validate-configs holds no quantizing config; give e.g. w2g128,w3g128")
        self.configs()

    def validation_specs(self) -> tuple[QuantSpec | GGMLSpec, ...]:
        return tuple(s for s in _parse(self.validate_configs, "--validate-configs") if not s.keep)

    def measure_specs(self) -> tuple[QuantSpec | GGMLSpec, ...] | None:
        return None if self.measure_configs is None else _parse(self.measure_configs, "--measure-configs")

    def configs(self) -> tuple[QuantSpec | GGMLSpec, ...]:
        """The candidates (bits x groups and/or the ggml types, keep last), plus validation/measured configs
        not among them. A ggml type is measured only on the layers whose rows it can store."""
        base = list(candidate_set(self.candidates, self.bits, self.group_sizes))
        extra = [*self.validation_specs(), *(self.measure_specs() or ())]
        extra = [s for s in dict.fromkeys(extra) if s not in base]
        return tuple(base[:-1] + extra + base[-1:])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["sensitivity_file"] = None if self.sensitivity_file is None else str(self.sensitivity_file)
        d["offload_dir"] = None if self.offload_dir is None else str(self.offload_dir)
        return d


