"""Write an export so that a crash never leaves half of it behind: build it beside its
destination under a hidden temporary name, then rename it into place.

`staged_dir(path)` yields an empty temporary sibling folder. When the block ends normally the
folder takes the name `path` (a folder already there is first moved aside, then deleted, so
at every instant `path` is either the old complete export or the new one); on any error the
temporary folder is deleted and `path` is untouched. `staged_file(path)` does the same for a
single file with `os.replace`, which is atomic on POSIX filesystems.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _refuse_other_kind(path: Path, want_dir: bool) -> None:
    if path.exists() and path.is_dir() != want_dir:
        kind = "a folder" if path.is_dir() else "a file"
        raise FileExistsError(f"{str(path)!r} exists and is {kind}; remove it or choose another output path")


@contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces `path` when the block succeeds."""
    path = Path(path)
    _refuse_other_kind(path, want_dir=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp folders are private; an export is an ordinary folder
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path that replaces `path` when the block succeeds."""
    path = Path(path)
    _refuse_other_kind(path, want_dir=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
