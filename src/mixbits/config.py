"""Frozen configuration of every stage. The CLI builds these; nothing else reads argv.

Defaults are sized for the embedded demo on 2 CPU cores (`make demo`: about 5.5 minutes with GPTQ and
`--damage rtn`); the same fields scale to real runs (`--calib-windows 128 --seqlen 2048 --eval-windows 0`).
Device, compute dtype and memory-budget values are read by `mixbits.devices`.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mixbits.data.windows import MIN_SEQLEN
from mixbits.devices import compute_torch_dtype, parse_max_memory
from mixbits.errors import UserError
from mixbits.quant.gptq import GPTQConfig
from mixbits.quant.spec import GGML_TYPES, KEEP, QUANT_BITS, GGMLSpec, QuantSpec, parse_spec

QUANTIZERS = ("rtn", "clip", "gptq")  # how a plan's weights are rounded (model.quantize); also QAT's starting point
DAMAGE_MODES = ("follow", "rtn")
CANDIDATE_SETS = ("affine", "gguf", "both")  # AllocationConfig.candidates
SCHEDULES = ("fixed", "linear", "sqrt", "conservative", "joint")  # QAT schedules (train.schedule)

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GROUPS = (64, 128)


def check_candidates(name: str, field: str) -> str:
    """`name` if it is a candidate set (CANDIDATE_SETS), else a UserError naming `field` and the sets."""
    if name not in CANDIDATE_SETS:
        raise UserError(f"{field} {name!r} is not known; use one of {', '.join(CANDIDATE_SETS)} (gguf: the ggml "
                        "types llama.cpp loads, per row length)")
    return name


def candidate_set(candidates: str, bits: tuple[int, ...], groups: tuple[int | None, ...]) -> tuple[QuantSpec | GGMLSpec, ...]:
    """The candidates of a set: affine bits x groups, the ggml types, or both; keeping in 16 bit last."""
    affine = candidate_configs(bits, groups)[:-1] if candidates != "gguf" else ()
    ggml = tuple(GGML_TYPES.values()) if candidates != "affine" else ()
    return affine + ggml + (KEEP,)


def candidate_configs(bits: tuple[int, ...], groups: tuple[int | None, ...], symmetric: bool = False) -> tuple[QuantSpec, ...]:
    """Every bits x group size pair, plus keeping the layer in 16 bit (always last)."""
    for b in bits:
        if b not in QUANT_BITS:
            raise UserError(f"candidate bits {b} not supported; choose from {QUANT_BITS}")
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
        if self.seqlen < MIN_SEQLEN:
            raise UserError(f"`data.seqlen` {self.seqlen} is too short; use at least {MIN_SEQLEN} tokens "
                            "(2048 for paper numbers)")
        if self.calib_windows < 1:
            raise UserError(f"`data.calib_windows` {self.calib_windows} must be at least 1")
        if self.eval_windows < 0:
            raise UserError(f"`data.eval_windows` {self.eval_windows} must be >= 0 (0 = the whole test split)")


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
    candidates: str = "affine"  # affine grids (bits x group sizes), ggml types for GGUF, or both

    def __post_init__(self) -> None:
        check_candidates(self.candidates, "`allocation.candidates`")
        if (self.target_bpw is None) == (self.target_size_mb is None):
            raise UserError("give exactly one of `allocation.target_bpw` and `allocation.target_size_mb`")
        for name in ("target_bpw", "target_size_mb"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"`allocation.{name}` {value!r} must be a positive number, e.g. 3.25 bits per weight "
                                "or 110 MB")
        if self.min_bits > self.max_bits:
            raise UserError(f"`allocation.min_bits` {self.min_bits} is above `allocation.max_bits` {self.max_bits}")
        if self.keep is not None:
            check_regex(self.keep, "`allocation.keep`")
        for pin in self.pins:
            parse_pin(pin)

    def configs(self) -> tuple[QuantSpec | GGMLSpec, ...]:
        """The candidate specs; ggml types are offered to a layer only where its row length allows
        them (allocate.optimal.allowed_options masks the others). Keeping in 16 bit is always last."""
        return candidate_set(self.candidates, self.bits, self.group_sizes)


def check_schedule(name: str) -> str:
    if name not in SCHEDULES:
        raise UserError(f"schedule={name!r} is not known; use one of {', '.join(SCHEDULES)}")
    return name


def weight_lr_for_bits(bits: int) -> float:
    """EfficientQAT's weight learning rate: 2e-5 at 2 bits, 1e-5 at 3 bits and above."""
    return 2e-5 if bits <= 2 else 1e-5


# Left out of checkpoint fingerprints: where data waits (never changes a number), which windows
# to cut (the windows themselves are hashed), and E2E-QP (it runs after the last block).
_NOT_BLOCKWISE = ("offload", "offload_dir", "dataset", "train_size", "val_size", "seqlen",
                  "e2e", "e2e_epochs", "e2e_lr", "e2e_batch_size", "e2e_grad_clip")


@dataclass(frozen=True)
class TrainConfig:
    """Quantization-aware training: Block-AP, then optionally E2E-QP (`mixbits.train`).

    Defaults are EfficientQAT's published ones (Chen et al. 2024, `main_block_ap.py` and the
    `examples/` scripts of OpenGVLab/EfficientQAT): AdamW without weight decay, quant-parameter lr
    1e-4, weight lr 2e-5 at 2 bits and 1e-5 at 3-4 bits (1e-5 above 4 bits too), cosine decay to
    lr / 20, 2 epochs, batch 2, gradient clipping at 0.3; E2E-QP trains the step sizes 1 epoch with
    lr 2e-5 at 2 bits / 1e-5 above and clipping at 0.3. Only the data sizes are cut down so the
    default runs on 2 CPU cores in minutes; `TrainConfig.paper()` gives EfficientQAT's sizes
    (4096 training windows, 64 validation windows, 2048 tokens each). EfficientQAT's E2E batch is
    4 windows x 8 accumulated; mixbits does not accumulate gradients, so paper() uses batches of 4
    and E2E-QP takes 8x more, smaller steps than the paper's.

    train_size / val_size / seqlen / dataset say which windows the train job cuts
    (`train.windows.training_windows`); `train_model` itself takes the windows. epochs may be
    fractional (a schedule scales them); patience None never stops early. weight_lr / e2e_lr None:
    the per-bits rule above for each linear. offload: activations wait on disk (offload_dir,
    default the system temp) instead of in CPU memory.
    """

    dataset: str = "wiki"
    train_size: int = 32
    val_size: int = 8
    seqlen: int = 256
    epochs: float = 2.0
    batch_size: int = 2
    quant_lr: float = 1e-4
    weight_lr: float | None = None
    min_lr_factor: float = 20.0
    weight_decay: float = 0.0
    grad_clip: float | None = 0.3
    patience: int | None = None
    schedule: str = "fixed"
    total_epoch_budget: bool = False
    init: str = "rtn"
    max_nonfinite: int = 5
    offload: bool = False
    offload_dir: Path | None = None
    e2e: bool = False
    e2e_epochs: float = 1.0
    e2e_lr: float | None = None
    e2e_batch_size: int = 2
    e2e_grad_clip: float | None = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        check_schedule(self.schedule)
        if self.init not in QUANTIZERS:
            raise UserError(f"init={self.init!r} is not known; use one of {', '.join(QUANTIZERS)}")
        for name in ("train_size", "val_size", "seqlen", "batch_size", "e2e_batch_size", "max_nonfinite"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name}={value!r} must be a positive integer")
        for name in ("epochs", "e2e_epochs"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise UserError(f"{name}={value!r} must be a positive number of epochs (fractions allowed)")
        for name in ("quant_lr", "weight_lr", "e2e_lr", "grad_clip", "e2e_grad_clip"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise UserError(f"{name}={value!r} must be a positive number (or None for the default)")
        if self.min_lr_factor < 1:
            raise UserError(f"min_lr_factor={self.min_lr_factor!r} must be >= 1 (the cosine ends at lr / factor)")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if self.patience is not None and self.patience < 1:
            raise UserError(f"patience={self.patience!r} must be a positive number of epochs, or None (never stop)")

    @classmethod
    def paper(cls, **overrides) -> "TrainConfig":
        """EfficientQAT's data sizes (4096 x 2048 training tokens, 64 validation windows)."""
        return cls(**{"train_size": 4096, "val_size": 64, "seqlen": 2048, "e2e_batch_size": 4, **overrides})

    def weight_lr_of(self, bits: int) -> float:
        return self.weight_lr if self.weight_lr is not None else weight_lr_for_bits(bits)

    def e2e_lr_of(self, bits: int) -> float:
        return self.e2e_lr if self.e2e_lr is not None else weight_lr_for_bits(bits)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["offload_dir"] = None if self.offload_dir is None else str(self.offload_dir)
        return d

    def blockwise_dict(self) -> dict:
        """The fields that decide the Block-AP numbers: what a resumed run must share."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_BLOCKWISE}


@dataclass(frozen=True)
class IterativeConfig:
    """Iterative mode (`jobs.iterative`): move `layers_per_iteration` units at a time to `spec`,
    least sensitive first, while validation perplexity stays within `max_ppl_increase` (relative)."""

    spec: QuantSpec = QuantSpec(4, 128)
    layers_per_iteration: int = 5
    max_ppl_increase: float = 0.01  # relative: 0.01 = 1 % above the original's validation perplexity
    max_iterations: int = 100
    windows: int = 4  # validation windows scored after each step (cfg.data.seqlen tokens each)

    def __post_init__(self) -> None:
        if self.spec.keep:
            raise UserError("`iterative.spec` must be a quantized config such as w4g128, not 16-bit keep")
        if self.layers_per_iteration < 1:
            raise UserError(f"`iterative.layers_per_iteration` {self.layers_per_iteration} must be at least 1")
        if not self.max_ppl_increase > 0:
            raise UserError(f"`iterative.max_ppl_increase` {self.max_ppl_increase} must be > 0 (relative: 0.05 = 5 %)")
        if self.max_iterations < 1:
            raise UserError(f"`iterative.max_iterations` {self.max_iterations} must be at least 1")
        if self.windows < 1:
            raise UserError(f"`iterative.windows` {self.windows} must be at least 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spec"] = self.spec.label
        return d


def check_damage_rows(rows: int | None) -> None:
    """Refuse a `damage_rows` (run and analyze) that is not a whole number of rows; 0 / None: every row."""
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
        raise UserError(f"`damage_rows` {rows!r} must be a whole number of output rows per layer on which each ggml "
                        "type's damage is measured and scaled to the layer (`sensitivity.damage_rows`), e.g. 64 "
                        "(0: every row)")


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
    gain_rows: int | None = 64  # follow: output rows per layer whose gain is measured (evenly strided); 0/None: all
    damage_rows: int | None = 64  # ggml candidates: rows per layer each type's damage is measured on, scaled; 0/None: all
    use_cache: bool = True  # reuse damage tables cached under $MIXBITS_CACHE_DIR/sensitivity (default MIXBITS_HOME/cache)
    train: TrainConfig | None = None  # Block-AP (+ E2E-QP) of the mixed plan after quantization; None: PTQ only
    baselines: bool = True  # also quantize and score the uniform configs around the budget (False: the mixed model only)
    train_baselines: bool = False  # also train the uniform baselines, for a comparison at equal training
    resume: bool = False  # continue a killed run: its finished blocks of output_dir/model, its --qat checkpoint
    overwrite: bool = False  # replace an earlier run in output_dir as a whole (mixbits.outdir)
    iterative: IterativeConfig | None = None  # quantize least-sensitive units first until a perplexity limit
    tasks: tuple[str, ...] = ()  # zero-shot tasks (lm-eval) scored on the original and mixed models
    task_limit: int | None = None  # documents per task (None: all)
    report: bool = True  # write report.html (and plots/) into output_dir
    progress: bool = True
    compute_dtype: str | None = None  # float32 | bfloat16 | float16; None: float32 on CPU, the checkpoint's on CUDA
    max_memory: str | None = None  # accelerate's format "cuda:0=20GiB,cpu=16GiB": refuse a run predicted above it
    offload_dir: Path | None = None  # where block-boundary activations wait on disk instead of in memory
    stream: bool = True  # block by block from the checkpoint; False: the whole model in memory (the reference path)
    preload: bool = False  # streamed: hold the checkpoint in RAM in its own dtype (one read; + its bytes to the peak)
    gguf_pre: str = "default"  # tokenizer.ggml.pre of the GGUF file a size target over ggml candidates counts

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise UserError(f"`quantizer` {self.quantizer!r} is not one of {', '.join(QUANTIZERS)}")
        if self.allocation.candidates != "affine" and self.train is not None and self.train.e2e:  # before any work
            raise UserError(f"`allocation.candidates` {self.allocation.candidates!r} with E2E-QP (`train.e2e`): E2E-QP "
                            "trains affine step sizes only (Block-AP trains ggml grids too); drop --qat-e2e or use "
                            "`allocation.candidates` affine")
        if self.train is not None and self.train.init != self.quantizer:
            raise UserError(f"training starts from the run's quantizer ({self.quantizer}), not {self.train.init}; "
                             "set TrainConfig(init=...) to the same value")
        if self.train is not None and self.train.schedule != "fixed" and self.plan is not None:
            raise UserError(f"--qat-schedule {self.train.schedule} needs the run's sensitivity, which a given --plan "
                             "skips; drop --plan or use --qat-schedule fixed")
        if self.train_baselines and not self.baselines:
            raise UserError("--qat-baselines trains the uniform baselines, which --no-baselines leaves out; drop one")
        if self.train_baselines and self.train is None:
            raise UserError("--qat-baselines only applies with --qat")
        if self.damage not in DAMAGE_MODES:
            raise UserError(f"`damage` {self.damage!r} is not one of {', '.join(DAMAGE_MODES)} (follow: the damage "
                             "of the quantizer that will be used; rtn: the damage of round-to-nearest)")
        if self.gain_rows is not None and (isinstance(self.gain_rows, bool) or not isinstance(self.gain_rows, int)
                                           or self.gain_rows < 0):
            raise UserError(f"`gain_rows` {self.gain_rows!r} must be a whole number of output rows per layer, e.g. "
                             "128 (0: every row)")
        check_damage_rows(self.damage_rows)

        if self.iterative is not None and self.plan is not None:
            raise UserError("`iterative` builds its own plan; drop `plan` or `iterative`")
        if self.iterative is not None and self.iterative.spec not in self.allocation.configs():
            raise UserError(f"`iterative.spec` {self.iterative.spec.label} is not among the candidate configs "
                             f"{[c.label for c in self.allocation.configs()[:-1]]}; add its bits to `allocation.bits` "
                             "and its group size to `allocation.group_sizes`")
        if self.task_limit is not None and self.task_limit < 1:
            raise UserError(f"`task_limit` {self.task_limit} must be at least 1 (or omitted for every document)")
        if self.compute_dtype is not None:
            compute_torch_dtype(self.compute_dtype)
        if self.max_memory is not None:
            parse_max_memory(self.max_memory)
        if self.offload_dir is not None and Path(self.offload_dir).exists() and not Path(self.offload_dir).is_dir():
            raise UserError(f"offload_dir (--offload-dir) {str(self.offload_dir)!r} is a file; give a folder "
                            "(it is created when missing)")
        if self.preload and not self.stream:
            raise UserError("`preload` holds the checkpoint for the streamed path, and `stream` is off (the whole "
                            "model is loaded in float32 anyway); drop --preload or --no-stream")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = None if self.train is None else self.train.to_dict()
        d["iterative"] = None if self.iterative is None else self.iterative.to_dict()
        d["tasks"] = list(self.tasks)
        d["output_dir"] = str(self.output_dir)
        d["plan"] = None if self.plan is None else str(self.plan)
        d["offload_dir"] = None if self.offload_dir is None else str(self.offload_dir)
        return d


def check_regex(pattern: str, flag: str) -> re.Pattern:
    """The compiled `pattern`, or a UserError naming the field (or flag), the pattern and the regex error."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise UserError(f"{flag} {pattern!r} is not a valid regular expression ({err}); "
                        "escape special characters, e.g. 'layers\\.0\\.' or 'down_proj'") from None


def parse_pin(text: str) -> tuple[str, QuantSpec | GGMLSpec]:
    """Read ``REGEX=SPEC`` (``down_proj=w4g64``, a ggml type ``down_proj=q4_k``) or ``REGEX=BITS``
    (``down_proj=4``, group 128)."""
    if "=" not in text:
        raise UserError(f"`allocation.pins` {text!r} must look like 'down_proj=4', 'down_proj=w4g64' or "
                        "'down_proj=q4_k'")
    pattern, value = text.rsplit("=", 1)
    check_regex(pattern, "`allocation.pins`")
    try:
        return pattern, QuantSpec(int(value)) if value.isdigit() else parse_spec(value)
    except ValueError as err:
        raise UserError(f"`allocation.pins` {text!r}: {err}") from None


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"`device` {name!r} is not a device mixbits runs on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"`device` {name} asked for CUDA, but none is available here; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(f"`device` {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                        "use one of them, or auto")
    return device
