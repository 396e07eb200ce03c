"""Wall time and peak memory of one stage, and the facts of the machine that ran it.

Time: `time.perf_counter` around the stage, after `torch.cuda.synchronize` on CUDA so queued
kernels are charged to the stage that launched them. A stage shorter than `short_s` is run
again up to `repeats` times and the median kept: short stages are the ones that timer noise and
a busy machine distort most.

Peak resident memory (RSS) per stage, on Linux: writing "5" to /proc/self/clear_refs resets the
kernel's high-water mark of this process's RSS (VmHWM in /proc/self/status) to the current RSS,
so VmHWM read after the stage is the stage's own peak. Where clear_refs cannot be written (not
Linux, a locked-down container) the only figure left is getrusage's ru_maxrss, the peak of the
whole process so far, which never goes down: it is reported with method "ru_maxrss" and bounds
the stage's peak from above. On CUDA the allocator's peak (`max_memory_allocated`, reset before
each stage) is reported as well. Each figure is in MiB (2^20 bytes).

Before each run: `gc.collect()` and, with glibc, `malloc_trim(0)`, so memory that earlier stages
freed goes back to the OS instead of hiding in the allocator's arenas; RSS at the start of a
stage is then what is really alive, and "peak - start" is what the stage itself added.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

MIB = 2**20
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    """A `VmXXX:  123 kB` line of /proc/self/status in KiB; None off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    """Resident memory now."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024 / MIB


def _ru_maxrss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


def _clear_refs() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def rss_peak_method() -> str:
    """"clear_refs" when this process can reset its RSS high-water mark, else "ru_maxrss"."""
    return "clear_refs" if _status_kib("VmHWM") is not None and _clear_refs() else "ru_maxrss"


class PeakMemory:
    """The peak RSS (and CUDA allocation) between `start()` and `stop()`; `split()` returns the
    peak since the last start/split and begins a new interval without losing the overall peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = rss_peak_method()
        self._overall = 0.0

    def _reset(self) -> None:
        if self.method == "clear_refs":
            _clear_refs()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _read(self) -> float:
        if self.method == "clear_refs":
            return _status_kib("VmHWM") * 1024 / MIB
        return _ru_maxrss_mb()

    def start(self) -> None:
        self._overall = 0.0
        self._reset()

    def split(self) -> float:
        peak = self._read()
        self._overall = max(self._overall, peak)
        if self.method == "clear_refs":
            _clear_refs()
        return peak

    def stop(self) -> tuple[float, float | None]:
        """(peak RSS MiB over the whole interval, CUDA peak MiB or None)."""
        rss = max(self._overall, self._read())
        cuda = torch.cuda.max_memory_allocated(self.device) / MIB if self.device.type == "cuda" else None
        return rss, cuda


def _libc_trim() -> Callable[[], object]:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return lambda *_: None


_TRIM = _libc_trim()


def release() -> None:
    """Free what is unreachable and hand freed heap back to the OS."""
    gc.collect()
    _TRIM(0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    """One stage: median seconds over `runs`, peak RSS (max over runs), RSS when it started."""

    seconds: float
    runs: list[float]
    peak_rss_mb: float
    rss_start_mb: float
    cuda_peak_mb: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self, reference: float) -> dict:
        return {**asdict(self), "ratio": self.seconds / reference}


def measure(fn: Callable[[], object], *, device: torch.device, repeats: int = 1, short_s: float = 0.0,
            peaks: PeakMemory | None = None) -> tuple[object, Measurement]:
    """Run `fn` once, and up to `repeats` times while its first run took under `short_s` seconds;
    returns the last result and the measurement. The previous result is dropped before each run,
    so a repeat does not hold two copies of what the stage builds."""
    peaks = peaks or PeakMemory(device)
    runs, rss, cuda, result = [], [], [], None
    while not runs or (len(runs) < repeats and runs[0] < short_s):
        result = None
        release()
        sync(device)
        start_rss = rss_mb() or 0.0
        peaks.start()
        start = time.perf_counter()
        result = fn()
        sync(device)
        runs.append(time.perf_counter() - start)
        peak, cuda_peak = peaks.stop()
        rss.append((peak, start_rss))
        cuda.append(cuda_peak)
    peak, start_rss = max(rss)
    cuda_peak = None if cuda[0] is None else max(cuda)
    return result, Measurement(statistics.median(runs), runs, peak, start_rss, cuda_peak)


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x: the exponent k of y ~ x^k (None below 2 points)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict:
    """CPU, cores, threads, load, device, library versions and the date: what a timing depends on."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(), "python": platform.python_version(), "device": str(device),
        "torch": torch.__version__, "transformers": _version("transformers"), "mixbits": _version("mixbits"),
        "rss_peak_method": rss_peak_method(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
