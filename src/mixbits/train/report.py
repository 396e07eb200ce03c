"""What training did, per block and overall: the statistics `train_model` returns and saves.

Per block (`BlockStats`): normalised sensitivity, spec label per trained linear, the schedule
used (epochs, lr multiplier, learning rates, patience), validation loss (block-output MSE)
at the start and of the kept state, best epoch (0 = start kept), epochs and steps run,
non-finite steps and whether the block fell back to its start, wall seconds, and whether it
was replayed from a checkpoint. `TrainReport` adds the QParams for export and the E2E-QP stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from mixbits.quant.affine import QParams

STATS_FORMAT = "mixbits.train/1"


@dataclass(frozen=True)
class BlockStats:
    index: int
    sensitivity: float | None
    bits: Mapping[str, str]
    epochs: float
    lr_scale: float
    quant_lr: float
    weight_lr: Mapping[str, float]
    patience: float | None
    loss_start: float
    loss_end: float
    best_epoch: float
    epochs_run: float
    steps: int
    train_loss: float | None
    nonfinite_steps: int
    fallback: bool
    seconds: float
    val_history: tuple[float, ...] = ()
    resumed: bool = False

    @property
    def kept_start(self) -> bool:
        return self.best_epoch == 0

    @property
    def ratio(self) -> float:
        """loss_end / loss_start: below 1 when training helped, exactly 1 when the start was kept."""
        return self.loss_end / self.loss_start if self.loss_start else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits"], d["weight_lr"], d["val_history"] = dict(self.bits), dict(self.weight_lr), list(self.val_history)
        d["kept_start"], d["ratio"] = self.kept_start, self.ratio
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "BlockStats":
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["val_history"] = tuple(kwargs.get("val_history", ()))
        return cls(**kwargs)


@dataclass(frozen=True, eq=False)
class TrainReport:
    """blocks: one BlockStats per block that has trained linears; qparams: linear -> QParams
    (CPU) reproducing the written weights, for `save_native(..., qparams=)`; e2e: the E2E-QP
    statistics or None; config: the TrainConfig as a dict."""

    blocks: tuple[BlockStats, ...]
    qparams: Mapping[str, QParams]
    init: str
    schedule: str
    config: Mapping[str, object] = field(default_factory=dict)
    e2e: Mapping[str, object] | None = None
    seconds: float = 0.0

    @property
    def resumed_blocks(self) -> tuple[int, ...]:
        return tuple(b.index for b in self.blocks if b.resumed)

    def to_dict(self) -> dict:
        return {
            "format": STATS_FORMAT,
            "init": self.init,
            "schedule": self.schedule,
            "config": dict(self.config),
            "seconds": self.seconds,
            "resumed_blocks": list(self.resumed_blocks),
            "fallback_blocks": [b.index for b in self.blocks if b.fallback],
            "kept_start_blocks": [b.index for b in self.blocks if b.kept_start],
            "blocks": [b.to_dict() for b in self.blocks],
            "e2e": None if self.e2e is None else dict(self.e2e),
        }
