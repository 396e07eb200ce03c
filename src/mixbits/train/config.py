"""Frozen configuration of quantization-aware training (Block-AP, then optionally E2E-QP).

Defaults are EfficientQAT's published ones (Chen et al. 2024, `main_block_ap.py` and the
`examples/` scripts of OpenGVLab/EfficientQAT): AdamW without weight decay, quant-parameter lr
1e-4, weight lr 2e-5 at 2 bits and 1e-5 at 3-4 bits (1e-5 above 4 bits too), cosine decay to
lr / 20, 2 epochs, batch 2, gradient clipping at 0.3; E2E-QP trains the step sizes 1 epoch with
lr 2e-5 at 2 bits / 1e-5 above and clipping at 0.3. Only the data sizes are cut down so the
default runs on 2 CPU cores in minutes; `TrainConfig.paper()` gives EfficientQAT's sizes
(4096 training windows, 64 validation windows, 2048 tokens each). EfficientQAT's E2E batch is
4 windows x 8 accumulated; mixbits does not accumulate gradients, so paper() uses batches of 4
and E2E-QP takes 8x more, smaller steps than the paper's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from mixbits.train.schedule import check_schedule

INITS = ("rtn", "clip", "gptq")

# Left out of checkpoint fingerprints: where data waits (never changes a number), which windows
# to cut (the windows themselves are hashed), and E2E-QP (it runs after the last block).
_NOT_BLOCKWISE = ("offload", "offload_dir", "dataset", "train_size", "val_size", "seqlen",
                  "e2e", "e2e_epochs", "e2e_lr", "e2e_batch_size", "e2e_grad_clip")


def weight_lr_for_bits(bits: int) -> float:
    """EfficientQAT's weight learning rate: 2e-5 at 2 bits, 1e-5 at 3 bits and above."""
    return 2e-5 if bits <= 2 else 1e-5


@dataclass(frozen=True)
class TrainConfig:
    """Block-AP and E2E-QP settings; see the module docstring for where the defaults come from.

    train_size / val_size / seqlen / dataset say which windows `train/command.py` cuts;
    `train_model` itself takes the windows. epochs may be fractional (a schedule scales them);
    patience None never stops early. weight_lr / e2e_lr None: the per-bits rule above for each
    linear. offload: activations wait on disk (offload_dir, default the system temp) instead of
    in CPU memory.
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
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is not known; use one of {', '.join(INITS)}")
        for name in ("train_size", "val_size", "seqlen", "batch_size", "e2e_batch_size", "max_nonfinite"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("epochs", "e2e_epochs"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive number of epochs (fractions allowed)")
        for name in ("quant_lr", "weight_lr", "e2e_lr", "grad_clip", "e2e_grad_clip"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive number (or None for the default)")
        if self.min_lr_factor < 1:
            raise ValueError(f"min_lr_factor={self.min_lr_factor!r} must be >= 1 (the cosine ends at lr / factor)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience={self.patience!r} must be a positive number of epochs, or None (never stop)")

    @classmethod
    def paper(cls, **overrides) -> "TrainConfig":
        """EfficientQAT's data sizes (4096 x 2048 training tokens, 64 validation windows)."""
        return cls(**{"train_size": 4096, "val_size": 64, "seqlen": 2048, "e2e_batch_size": 4, **overrides})

    def weight_lr_of(self, bits: int) -> float:
        return self.weight_lr if self.weight_lr is not None else weight_lr_for_bits(bits)

    def e2e_lr_of(self, bits: int) -> float:
        return self.e2e_lr if self.e2e_lr is not None else weight_lr_for_bits(bits)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["offload_dir"] = None if self.offload_dir is None else str(self.offload_dir)
        return d

    def blockwise_dict(self) -> dict:
        """The fields that decide the Block-AP numbers: what a resumed run must share."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_BLOCKWISE}
