"""Independent pieces of a CPU search of many small tensor ops, spread over threads that never wait for each other.

Why: a search made of many small ops (ggml's grid search in `kquant`: about a thousand ops of
~0.5 MB per 64K weights) hands every op to torch's OpenMP pool, and each op ends at a barrier
where all the pool's threads meet. On a machine whose cores are shared with other processes, the
OS deschedules one of them and every op waits for it: on this project's 2-core machine, under a
load average of 4-5, `kquant.choose_params` of a 576 x 1536 weight at torch's default of 2 threads
took 6-34x as long that way as the way below (`bench/kquant_speed.py --omp`, docs/gguf.md "Speed of
the grid search"). So the ops run on ONE intra-op thread, and the cores are used one level
up instead: the pieces (row chunks) go to `torch.get_num_threads()` Python threads, which torch's
ops let run at once (they release the GIL) and which never wait for each other. A piece is computed
exactly as it would be alone, so the result does not depend on the number of threads.

`torch.set_num_threads` is process-wide: it is 1 while the map runs and restored afterwards, so
the map must not run beside other torch work of the same process (mixbits runs its stages one at
a time). Other devices run the pieces one after the other, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["map_pieces", "one_intraop_thread"]

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def one_intraop_thread() -> Iterator[int]:
    """torch's intra-op threads set to 1 inside; yields the number there was before (restored on exit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def map_pieces(fn: Callable[[T], R], pieces: Sequence[T], device: torch.device) -> list[R]:
    """[fn(p) for p in pieces], in order; on the CPU each call's ops on one intra-op thread and the
    calls spread over torch's usual number of threads (module docstring)."""
    if device.type != "cpu":
        return [fn(p) for p in pieces]
    with one_intraop_thread() as threads:
        if threads <= 1 or len(pieces) <= 1:
            return [fn(p) for p in pieces]
        with ThreadPoolExecutor(min(threads, len(pieces))) as pool:
            return list(pool.map(fn, pieces))
