"""Wall-clock time per pipeline stage, recorded into a dict the results carry."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

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
