"""Where a result came from: the versions and the device that computed it.

Every job writes this next to its numbers (results.json, analysis.json, sweep.json, ...), so a
figure can be traced to the library versions, the device, the thread count and MKL's
reproducibility mode (`MKL_CBWR`, set by `mixbits.reproducible`: with it, CPU results do not depend
on the thread count; without it, reduction order and so the last digits do) that produced it.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import version

import torch
import transformers


def environment(device: torch.device) -> dict:
    """Python, torch, transformers and mixbits versions, the device, torch's thread count and MKL_CBWR."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mixbits": version("mixbits"),  # the installed metadata: no import of the package root
        "device": str(device),
        "threads": torch.get_num_threads(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),  # None: MKL's default (thread-count-dependent sums)
    }
