"""Write a Hugging Face model folder in one piece: config.json (with its quantization_config),
model.safetensors, the tokenizer, and small JSON side files, built in a staged folder and
renamed into place (`staging.staged_dir`), so a crash never leaves half an export."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from mixbits.export.staging import staged_dir
from mixbits.io import atomic_write_json

WEIGHTS = "model.safetensors"


def write_hf_folder(
    path: str | Path,
    config,
    tensors: Mapping[str, Tensor],
    tokenizer=None,
    side_files: Mapping[str, object] | None = None,
    kind: str = "export",
) -> Path:
    """Write `tensors` with `config` (a PretrainedConfig) and the tokenizer to the folder `path`."""
    path = Path(path)
    with staged_dir(path, kind=kind) as tmp:
        # "format": "pt" is what transformers expects in a safetensors header
        save_file(dict(tensors), str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (side_files or {}).items():
            atomic_write_json(tmp / name, data)
    return path
