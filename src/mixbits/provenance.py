"""Where a result came from: the versions and the device that computed it.

Every job writes this next to its numbers (results.json, analysis.json, sweep.json, ...), so a
figure can be traced to the library versions, the device and the thread count (which changes
reduction order, hence the last digits) that produced it.
"""

from __future__ import annotations

import platform
from importlib.metadata import version

import torch
import transformers


def environment(device: torch.device) -> dict:
    """Python, torch, transformers and mixbits versions, the device and torch's thread count."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mixbits": version("mixbits"),  # the installed metadata: no import of the package root
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
