"""Where and in what the work runs: the compute dtype and the memory budget of a run, read from the
strings a config holds (`RunConfig.compute_dtype`, `RunConfig.max_memory`), with the refusals that name
the field, the flag, the bad value and what is accepted.
"""

from __future__ import annotations

import torch

from mixbits.errors import UserError

__all__ = ["COMPUTE_DTYPES", "compute_torch_dtype", "parse_max_memory"]

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a `compute_dtype` name (None stays None: the device's default)."""
    if name is None:
        return None
    if name not in COMPUTE_DTYPES:
        raise UserError(f"compute_dtype (--compute-dtype) {name!r} is not known; use one of "
                        f"{', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def parse_max_memory(text: str) -> dict[str, int]:
    """Read accelerate's budget format, ``cuda:0=20GiB,cpu=16GiB``, into {device: bytes}.

    Sizes use accelerate's own parser (``GiB``/``MiB``/``KiB`` are powers of 2, ``GB``/``MB``/``KB``
    powers of 10, a plain number is bytes). Devices: ``cpu``, ``cuda`` (= ``cuda:0``), ``cuda:N`` or
    accelerate's bare GPU index ``N``; a CUDA device must exist on this machine. Disk is not a budget
    here: ``--offload-dir`` says where activations may wait on disk."""
    from accelerate.utils import convert_file_size_to_int

    accepted = "accepted: 'cuda:0=20GiB,cpu=16GiB' (devices cpu, cuda:N; sizes such as 512MiB, 20GiB, 16GB)"
    budget: dict[str, int] = {}
    for item in (part.strip() for part in str(text).split(",")):
        device, sep, size = (x.strip() for x in item.partition("="))
        if not sep or not device or not size:
            raise UserError(f"max_memory (--max-memory) {text!r}: {item!r} is not DEVICE=SIZE; {accepted}")
        device = _budget_device(device, text, accepted)
        try:
            nbytes = int(size) if size.isdigit() else convert_file_size_to_int(size)
        except ValueError:
            nbytes = -1
        if nbytes <= 0:
            raise UserError(f"max_memory (--max-memory) {text!r}: size {size!r} of {device} is not a positive "
                            f"size; {accepted}")
        if device in budget:
            raise UserError(f"max_memory (--max-memory) {text!r} gives {device} twice; give each device once")
        budget[device] = nbytes
    return budget


def _budget_device(name: str, text: str, accepted: str) -> str:
    """`name` as cpu or cuda:N, refused when it is not a device or not on this machine."""
    name = name.lower()
    if name.isdigit():
        name = f"cuda:{name}"
    elif name == "cuda":
        name = "cuda:0"
    if name == "cpu":
        return name
    if name == "disk":
        raise UserError(f"max_memory (--max-memory) {text!r}: disk is not a memory budget here; give "
                        "--offload-dir FOLDER to let activations wait on disk")
    index = name.removeprefix("cuda:")
    if not name.startswith("cuda:") or not index.isdigit():
        raise UserError(f"max_memory (--max-memory) {text!r}: device {name!r} is not known; {accepted}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index) >= count:
        have = f"cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
        raise UserError(f"max_memory (--max-memory) {text!r}: {name} does not exist on this machine ({have}); "
                        "give a budget for cpu or a device that exists")
    return f"cuda:{int(index)}"
