"""The windows QAT trains on: calibration documents to fit, validation documents to pick each
block's best state (their own documents, so the pick is not fit to the training text)."""

from __future__ import annotations

import torch

from mixbits.config import TrainConfig
from mixbits.data.text import load_text
from mixbits.data.windows import calibration_windows


def training_windows(tokenizer, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Training windows from the calibration split and the windows that pick each block's best state
    from the validation split (its own documents), both cfg.seqlen tokens, sampled with cfg.seed."""
    return {
        "calibration": calibration_windows(tokenizer, load_text(cfg.dataset, "calibration"), cfg.seqlen,
                                           cfg.train_size, cfg.seed),
        "validation": calibration_windows(tokenizer, load_text(cfg.dataset, "validation"), cfg.seqlen,
                                          cfg.val_size, cfg.seed),
    }
