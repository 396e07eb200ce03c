"""Wall-clock time per pipeline stage, recorded into a dict the results carry."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        log.info("%s ...", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            log.info("%s done in %.1f s", name, elapsed)


@torch.no_grad()
def time_forward(model: nn.Module, windows: torch.Tensor, *, device: torch.device, sample: int = 4) -> float:
    """Seconds of one forward pass (no gradients) over all `windows` [n, seqlen], timed on the first
    `sample` windows one at a time and scaled to the count: the unit that benchmark tables divide
    by, measured in the same run as what they compare."""
    k = max(1, min(sample, len(windows)))
    model.to(device)
    model(input_ids=windows[:1].to(device))  # warm-up: lazy inits and allocator growth are not the model's cost
    start = time.perf_counter()
    for window in windows[:k]:
        model(input_ids=window.unsqueeze(0).to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * len(windows) / k
