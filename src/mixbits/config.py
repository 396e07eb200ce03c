"""Frozen configuration of every stage. The CLI builds these; nothing else reads argv.

Defaults are sized for the embedded demo on 2 CPU cores (about 25 minutes end to end with the
default GPTQ, ~10 with --quantizer clip); the
same fields scale to real runs (`--calib-windows 128 --seqlen 2048 --eval-windows 0`).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mixbits.iterative import IterativeConfig
from mixbits.quant.gptq import GPTQConfig
from mixbits.quant.spec import KEEP, QUANT_BITS, QuantSpec
from mixbits.train.config import TrainConfig

QUANTIZERS = ("rtn", "clip", "gptq")
DAMAGE_MODES = ("follow", "rtn")

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GROUPS = (64, 128)


def candidate_configs(bits: tuple[int, ...], groups: tuple[int | None, ...], symmetric: bool = False) -> tuple[QuantSpec, ...]:
    """Every bits x group size pair, plus keeping the layer in 16 bit (always last)."""
    for b in bits:
        if b not in QUANT_BITS:
            raise ValueError(f"candidate bits {b} not supported; choose from {QUANT_BITS}")
    specs = [QuantSpec(b, g, symmetric) for b, g in itertools.product(sorted(set(bits)), groups)]
    return tuple(specs) + (KEEP,)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "wiki"  # calibration text and held-out evaluation text
    seqlen: int = 512
    calib_windows: int = 16
    eval_windows: int = 24  # 0 = every window of the test split
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seqlen < 16:
            raise ValueError(f"--seqlen {self.seqlen} is too short; use at least 16 tokens (2048 for paper numbers)")
        if self.calib_windows < 1:
            raise ValueError(f"--calib-windows {self.calib_windows} must be at least 1")
        if self.eval_windows < 0:
            raise ValueError(f"--eval-windows {self.eval_windows} must be >= 0 (0 = the whole test split)")


@dataclass(frozen=True)
class AllocationConfig:
    target_bpw: float | None = None
    target_size_mb: float | None = None
    bits: tuple[int, ...] = DEFAULT_BITS
    group_sizes: tuple[int | None, ...] = DEFAULT_GROUPS
    min_bits: int = 2
    max_bits: int = 16
    keep: str | None = None
    pins: tuple[str, ...] = ()
    tie: bool = True

    def __post_init__(self) -> None:
        if (self.target_bpw is None) == (self.target_size_mb is None):
            raise ValueError("give exactly one of --target-bpw and --target-size-mb")
        if self.min_bits > self.max_bits:
            raise ValueError(f"--min-bits {self.min_bits} is above --max-bits {self.max_bits}")

    def configs(self) -> tuple[QuantSpec, ...]:
        return candidate_configs(self.bits, self.group_sizes)


@dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2-135m"
    output_dir: Path = Path("runs/demo")
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    allocation: AllocationConfig = field(default_factory=lambda: AllocationConfig(target_bpw=3.25))
    plan: Path | None = None  # a given plan replaces sensitivity + allocation
    quantizer: str = "gptq"  # rtn | clip | gptq; gptq (+ clip): chosen by bench/quantizers.sh (README "Quantizers")
    gptq: GPTQConfig = field(default_factory=lambda: GPTQConfig(clip=True))  # with clip-searched group scales
    damage: str = "follow"  # follow: Fisher x the quantizer's gain over RTN (sensitivity.follow); rtn: Fisher as is
    use_cache: bool = True  # reuse damage tables cached under MIXBITS_HOME/cache/sensitivity
    train: TrainConfig | None = None  # Block-AP (+ E2E-QP) of the mixed plan after quantization; None: PTQ only
    baselines: bool = True  # also quantize and score the uniform configs around the budget (False: the mixed model only)
    train_baselines: bool = False  # also train the uniform baselines, for a comparison at equal training
    resume: bool = False  # continue training from output_dir/checkpoint
    iterative: IterativeConfig | None = None  # quantize least-sensitive units first until a perplexity limit
    tasks: tuple[str, ...] = ()  # zero-shot tasks (lm-eval) scored on the original and mixed models
    task_limit: int | None = None  # documents per task (None: all)
    report: bool = True  # write report.html (and plots/) into output_dir
    progress: bool = True

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"--quantizer {self.quantizer!r} is not one of {', '.join(QUANTIZERS)}")
        if self.train is not None and self.train.init != self.quantizer:
            raise ValueError(f"training starts from the run's quantizer ({self.quantizer}), not {self.train.init}; "
                             "set TrainConfig(init=...) to the same value")
        if self.train is not None and self.train.schedule != "fixed" and self.plan is not None:
            raise ValueError(f"--qat-schedule {self.train.schedule} needs the run's sensitivity, which a given --plan "
                             "skips; drop --plan or use --qat-schedule fixed")
        if self.train_baselines and not self.baselines:
            raise ValueError("--qat-baselines trains the uniform baselines, which --no-baselines leaves out; drop one")
        if (self.train_baselines or self.resume) and self.train is None:
            raise ValueError("--qat-baselines and --resume only apply with --qat")
        if self.damage not in DAMAGE_MODES:
            raise ValueError(f"--damage {self.damage!r} is not one of {', '.join(DAMAGE_MODES)} (follow: the damage "
                             "of the quantizer that will be used; rtn: the damage of round-to-nearest)")

        if self.iterative is not None and self.plan is not None:
            raise ValueError("--iterative builds its own plan; drop --plan or --iterative")
        if self.iterative is not None and self.iterative.spec not in self.allocation.configs():
            raise ValueError(f"--iterative-spec {self.iterative.spec.label} is not among the candidate configs "
                             f"{[c.label for c in self.allocation.configs()[:-1]]}; add its bits to --bits and "
                             "its group size to --group-sizes")
        if self.task_limit is not None and self.task_limit < 1:
            raise ValueError(f"--task-limit {self.task_limit} must be at least 1 (or omitted for every document)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = None if self.train is None else self.train.to_dict()
        d["iterative"] = None if self.iterative is None else self.iterative.to_dict()
        d["tasks"] = list(self.tasks)
        d["output_dir"] = str(self.output_dir)
        d["plan"] = None if self.plan is None else str(self.plan)
        return d


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but none is available here; use --device auto or cpu")
    return device
