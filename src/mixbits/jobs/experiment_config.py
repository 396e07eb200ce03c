"""Frozen configuration of the two experiments. Every check here is cheap and runs before any
model loads; checks that need the model (budgets against its layer shapes) run right after
loading, before calibration.

`CompareConfig`: one shared `RunConfig` (its `model` is ignored) run for each of `models`.
`AblateConfig`: one model, one calibration set, one test set, one sensitivity table, and the
sections to run on them (module `ablate`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mixbits.allocate.presets import PRESET_TARGET_BPW
from mixbits.allocate.registry import STRATEGIES
from mixbits.config import RunConfig
from mixbits.config import TrainConfig
from mixbits.config import SCHEDULES
from mixbits.errors import UserError

SECTIONS = ("strategy", "training", "budget")
SEED_STRATEGIES = tuple(PRESET_TARGET_BPW)  # conservative 5.0, adaptive 4.0, aggressive 3.0 bpw (seed 000)
DEFAULT_BUDGETS = (2.5, 3.0, 3.5, 4.0, 4.5)

# Small enough for a CPU: the ablation trains one plan once per schedule.
ABLATE_TRAIN = TrainConfig(train_size=8, val_size=4, seqlen=256, epochs=1.0)


def safe_name(model: str) -> str:
    """A folder/file name for a model: a local folder's own name, or the hub id with '/' -> '_'."""
    path = Path(model).expanduser()
    base = path.name if path.is_dir() else model.replace("/", "_")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")
    return name or "model"


def _known_arm(arm: str) -> bool:
    schedule, _, extra = arm.partition("+")
    return schedule in SCHEDULES and extra in ("", "e2e")


def _unique(values: tuple[str, ...], flag: str) -> None:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise UserError(f"{flag} lists {seen[0]!r} twice; give each once")


@dataclass(frozen=True)
class CompareConfig:
    run: RunConfig  # every option of the job; model and output_dir are set per model
    models: tuple[str, ...]
    output_dir: Path = Path("runs/compare")
    resume: bool = False  # skip models whose results.json exists with the same config

    def __post_init__(self) -> None:
        if not self.models:
            raise UserError("give at least one model, e.g. --models smollm2-135m org/other-model")
        _unique(self.models, "--models")
        clash = next(((a, b) for i, a in enumerate(self.models) for b in self.models[i + 1:]
                      if safe_name(a) == safe_name(b)), None)
        if clash:
            raise UserError(f"models {clash[0]!r} and {clash[1]!r} would share the folder {safe_name(clash[0])!r}; "
                             "rename one of the local folders")
        if self.run.plan is not None or self.run.train is not None:
            raise UserError("compare allocates each model's own plan without training; drop --plan / --qat")

    def model_dir(self, model: str) -> Path:
        return Path(self.output_dir) / safe_name(model)


@dataclass(frozen=True)
class AblateConfig:
    run: RunConfig  # model, data, candidates, quantizer; its budget: the training section's, and the
    # target of any strategy without a seed target
    output_dir: Path = Path("runs/ablate")
    sections: tuple[str, ...] = SECTIONS
    strategies: tuple[str, ...] = SEED_STRATEGIES
    budgets_bpw: tuple[float, ...] = DEFAULT_BUDGETS
    train: TrainConfig = field(default_factory=lambda: ABLATE_TRAIN)  # sizes, epochs, and init (the start)
    schedules: tuple[str, ...] = SCHEDULES
    resume: bool = False  # keep finished sections of output_dir/ablation.json with the same config
    models_per_pass: int = 4  # quantized models scored per pass over the test windows

    def __post_init__(self) -> None:
        self._check_sections()
        unknown = [s for s in self.strategies if s not in STRATEGIES or s == "optimal"]
        if unknown:
            raise UserError(f"--strategies {','.join(unknown)}: not a heuristic strategy; choose from "
                             f"{', '.join(s for s in STRATEGIES if s != 'optimal')} (each is paired with optimal)")
        if "strategy" in self.sections and not self.strategies:
            raise UserError("--strategies is empty; give at least one, e.g. conservative,adaptive,aggressive")
        _unique(self.strategies, "--strategies")
        bad = [b for b in self.budgets_bpw if not (math.isfinite(b) and b > 0)]
        if bad:
            raise UserError(f"--budgets {bad[0]!r} must be a positive number of bits per weight, e.g. 2.5,3,4")
        if "budget" in self.sections and not self.budgets_bpw:
            raise UserError("--budgets is empty; give at least one, e.g. 2.5,3,3.5,4,4.5")
        unknown = [s for s in self.schedules if not _known_arm(s)]
        if unknown:
            raise UserError(f"--qat-schedules {','.join(unknown)}: unknown; choose from {', '.join(SCHEDULES)}, "
                             "each optionally with +e2e (then E2E-QP), e.g. fixed,sqrt,fixed+e2e")
        if "training" in self.sections and not self.schedules:
            raise UserError(f"--qat-schedules is empty; give at least one of {', '.join(SCHEDULES)}")
        _unique(self.schedules, "--qat-schedules")
        if self.train.dataset != self.run.data.dataset:
            raise UserError(f"training text {self.train.dataset!r} differs from the run's {self.run.data.dataset!r}; "
                             "the ablation uses one text: set TrainConfig(dataset=...) to the run's dataset")
        if self.run.plan is not None or self.run.train is not None:
            raise UserError("ablate allocates its own plans and trains in its training section; drop --plan / --qat")
        if self.models_per_pass < 1:
            raise UserError(f"models_per_pass={self.models_per_pass} must be at least 1")

    def _check_sections(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise UserError(f"--sections {','.join(self.sections) or '(empty)'}: choose one or more of "
                             f"{','.join(SECTIONS)}")
        _unique(self.sections, "--sections")
