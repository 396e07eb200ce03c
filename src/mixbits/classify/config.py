"""The frozen configuration of `mixbits classify`; every flag of the command is one field.

Defaults are the embedded experiment: the MiniLM-L6 sentence encoder with a trained linear head
on Pang & Lee's 200 polarity sentences (140 train / 60 test, stratified, seed 0), 4-bit layers at
group 128 (MiniLM's rows of 384 and 1536 are multiples of 128).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mixbits.errors import UserError
from mixbits.quant.spec import QuantSpec


HEADS = ("auto", "train", "model")  # where the classifier head comes from (ClassifyConfig.head)


@dataclass(frozen=True)
class ClassifyConfig:
    model: str = "minilm-l6"
    dataset: str = "pang-lee-polarity"
    output_dir: Path = Path("runs/classify")
    head: str = "auto"  # auto: the checkpoint's own head if it has one, else train; train; model
    test_fraction: float = 0.3  # share of each class held out (embedded sets and files; sst2 has its own)
    seed: int = 0  # of the train/test split, the head's folds and the ranking subset
    max_length: int = 128  # tokens per sentence, longer ones truncated
    batch_size: int = 32
    group_size: int | None = 128  # None: per-channel
    int4_fraction: float = 0.5  # share of layers, least sensitive first, that the mixed strategies put at 4 bits
    rank_examples: int = 256  # training sentences that rank the layers (all when fewer)
    head_l2: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # λ grid of the head, chosen by cross-validation
    head_folds: int = 5
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise UserError(f"--head {self.head!r}; use one of {HEADS}")
        for flag, value in (("--test-fraction", self.test_fraction), ("--int4-fraction", self.int4_fraction)):
            if not 0.0 < value < 1.0:
                raise UserError(f"{flag} {value} must lie strictly between 0 and 1, e.g. 0.5")
        for flag, value, low in (("--max-length", self.max_length, 8), ("--batch-size", self.batch_size, 1),
                                 ("--rank-examples", self.rank_examples, 2), ("--head-folds", self.head_folds, 2)):
            if value < low:
                raise UserError(f"{flag} {value} must be at least {low}")
        if not self.head_l2 or any(v <= 0 for v in self.head_l2):
            raise UserError(f"--head-l2 {list(self.head_l2)} must hold one or more positive values, e.g. 0.01,0.1,1,10")
        try:
            QuantSpec(4, self.group_size)
        except ValueError as err:
            raise UserError(f"--group-size: {err}") from None

    def spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits, self.group_size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["head_l2"] = list(self.head_l2)
        return d
