"""Atomic file writes: a crash or kill midway never leaves a half-written file behind.

The one writer of single files: `atomic_file(path)` yields a hidden temporary sibling,
`.<name>.<random>.mixbits-tmp`, that replaces `path` with `os.replace` (atomic on POSIX) when the
block succeeds and is deleted when it fails; a kill -9 leaves the temporary, which the next claim
of that output removes (`mixbits.outdir`). Whole folders: `mixbits.export.staging.staged_dir`."""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mixbits.errors import UserError

TEMP_SUFFIX = ".mixbits-tmp"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` that replaces it when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp files are private; outputs are ordinary files
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk is named, not a traceback
            raise UserError(f"cannot write {str(path)!r}: no space left on its device ({err.strerror}); "
                            "free some space or choose an output folder on another disk") from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: object) -> None:
    """Write `data` as strict JSON (RFC 8259: no NaN or Infinity tokens, which strict parsers reject).

    A non-finite float stands for a value that does not exist (a correlation over fewer than two points,
    a damage that was not measured, a perplexity beyond the range of a double) and is written as null.
    Values that must never be non-finite (weights, damage used for allocation, evaluation NLL) are
    refused where they arise, naming their source, long before anything is written."""
    atomic_write_text(path, json.dumps(_strict(data), indent=2, default=_jsonable, allow_nan=False) + "\n")


def _strict(value: object) -> object:
    """`value` with numpy values as Python ones and every non-finite float as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _strict(value.tolist())
    return value


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
