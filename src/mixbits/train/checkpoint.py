"""Per-block checkpoints of Block-AP, so a killed run resumes at the next block.

Layout of a checkpoint folder:
    run.json                 format tag and the fingerprint of the run (config fields that
                             decide the numbers, plan, window hashes, sensitivity, model)
    block_0000.safetensors   for each trained linear `{name}.weight` (the written weight, in
                             the model's dtype), `{name}.scale`, `{name}.zero` (float32 [out, G]);
                             a ggml type's grid instead: `{name}.d`, `.dmin`, `.sc`, `.mn`
    block_0000.json          the block's statistics; written last, so its presence marks the
                             block as finished

Every file is written atomically (`io.atomic_write_bytes`), so a kill leaves either a finished
block or none. Resume replays finished blocks from their files and recomputes the activation
streams through them (the same ops on the same inputs: bit-identical on the same device and
thread count), which is cheaper to store than the streams themselves. Block RNGs are seeded
per block from the run seed, so nothing else needs saving. A fingerprint mismatch refuses to
resume, naming the first differing field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mixbits.errors import UserError
from mixbits.io import atomic_write_bytes, atomic_write_json
from mixbits.safeload import check_safetensors, loads_json

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mixbits.train-checkpoint/1"


def _first_difference(a: object, b: object, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            diff = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if diff:
                return diff
        return None
    return None if a == b else f"{path or 'value'}: checkpoint has {a!r}, this run has {b!r}"


class BlockCheckpoint:
    """Finished blocks of one training run in `directory`; see the module docstring."""

    def __init__(self, directory: str | Path, fingerprint: Mapping[str, object], *, resume: bool) -> None:
        self.directory = Path(directory)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint)))  # JSON-normal form, as read back
        meta = self.directory / "run.json"
        finished = self.finished()
        if meta.is_file():
            saved = json.loads(meta.read_text())
            if finished and not resume:
                raise UserError(f"checkpoint folder {str(self.directory)!r} already holds {len(finished)} finished "
                                 "block(s) of a run; pass resume=True (--resume) to continue it, or choose an empty "
                                 "folder")
            diff = _first_difference(saved.get("run"), self.fingerprint)
            if finished and diff:
                raise UserError(f"cannot resume from {str(self.directory)!r}: it belongs to another run ({diff}); "
                                 "rerun with the same settings, or choose an empty folder")
        atomic_write_json(meta, {"format": CHECKPOINT_FORMAT, "run": self.fingerprint})
        if finished:
            log.info("resuming from %s: blocks %s already finished", self.directory, finished)

    def _paths(self, index: int) -> tuple[Path, Path]:
        stem = self.directory / f"block_{index:04d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def finished(self) -> list[int]:
        """Indices 0..k-1 of the finished blocks (the leading run without a gap)."""
        out = []
        while all(p.is_file() for p in self._paths(len(out))):
            out.append(len(out))
        return out

    def save(self, index: int, tensors: Mapping[str, torch.Tensor], stats: Mapping[str, object]) -> None:
        tensor_path, stats_path = self._paths(index)
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic_write_bytes(tensor_path, save_safetensors(data, metadata={"format": CHECKPOINT_FORMAT}))
        atomic_write_json(stats_path, dict(stats))

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        tensor_path, stats_path = self._paths(index)
        if not (tensor_path.is_file() and stats_path.is_file()):
            raise UserError(f"block {index} is not finished in checkpoint {str(self.directory)!r}")
        check_safetensors(tensor_path, "checkpoint block")
        try:
            return load_safetensors(tensor_path.read_bytes()), loads_json(stats_path.read_text(), str(stats_path))
        except Exception as err:  # a header that passed the check but data safetensors cannot read
            if type(err).__name__ != "SafetensorError":
                raise
            raise UserError(f"checkpoint block {str(tensor_path)!r} is corrupt ({err}); delete it to retrain "
                            "that block") from None
