"""The one writer of whole folders: build beside the destination, then swap it into place.

`staged_dir(path, kind)` yields an empty hidden sibling folder, `.<name>.<random>`, marked with
`outdir.STAGING_MARKER` so that a save killed midway can be recognised and removed by the next
claim of that location (`mixbits.outdir`). When the block ends normally, the folder receives its
manifest (`kind` and every file written) and replaces `path` (`replace_dir`); on any error it is
deleted and `path` is untouched. Single files have their own atomic writer in `mixbits.io`.

`replace_dir` never leaves a moment without a folder at `path`: on Linux the new folder and the
old one swap names in one step, renameat2(RENAME_EXCHANGE) through libc. Where that call is
missing (other systems, old kernels, file systems without it) it falls back to two renames, the
old folder aside and the new one into place, so `path` is absent for that instant. Files in the
old folder that its manifest does not list (a user's notes, the command's lock) move into the new
folder; only mixbits' own files are deleted with the old folder, and a folder that holds foreign
files and no manifest is refused before anything is written.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mixbits.errors import UserError
from mixbits.io import atomic_file
from mixbits.outdir import (
    LOCK, MANIFEST, STAGING_MARKER, Manifest, files_under, read_manifest, write_staging_marker,
)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _refuse_other_kind(path: Path, want_dir: bool) -> None:
    if path.exists() and path.is_dir() != want_dir:
        kind = "a folder" if path.is_dir() else "a file"
        raise UserError(f"{str(path)!r} exists and is {kind}; remove it or choose another output path")


def _foreign_files(folder: Path, manifest: Manifest | None) -> list[str]:
    """Files in `folder` that mixbits did not write into it (its lock included: it belongs to the claim)."""
    listed = set(manifest.files) if manifest is not None else set()
    found = files_under(folder) + ([LOCK] if (folder / LOCK).is_file() else [])
    return [f for f in found if f not in listed and f != MANIFEST]


def check_replaceable(path: Path) -> None:
    """Refuse a folder at `path` that holds foreign files and no mixbits manifest."""
    _refuse_other_kind(path, want_dir=True)
    if path.is_dir() and read_manifest(path) is None:
        foreign = [f for f in _foreign_files(path, None) if f != LOCK]
        if foreign:
            raise UserError(f"{path} holds files that mixbits did not write ({', '.join(foreign[:3])}); mixbits "
                            "replaces only its own outputs: choose another folder")


def exchange(a: Path, b: Path) -> bool:
    """Swap the names of `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _check_clash(new: Path, path: Path) -> None:
    if path.is_dir():
        clash = [f for f in _foreign_files(path, read_manifest(path)) if (new / f).exists()]
        if clash:
            raise UserError(f"{path} holds {', '.join(clash[:3])}, which mixbits did not write and the new output "
                            "would replace; move it away or choose another folder")


def replace_dir(new: Path, path: Path) -> None:
    """Put the finished folder `new` at `path` (see the module docstring); foreign files in an old
    folder at `path` are carried into the new one, refused up front when a name clashes."""
    if not path.exists():
        os.rename(new, path)
        return
    old_manifest = read_manifest(path)
    _check_clash(new, path)
    if exchange(new, path):
        old = new
    else:
        old = path.parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(path, old)
        os.rename(new, path)
    for rel in _foreign_files(old, old_manifest):
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        os.rename(old / rel, path / rel)
    shutil.rmtree(old)


@contextmanager
def staged_dir(path: str | Path, kind: str = "export") -> Iterator[Path]:
    """Yield a temporary folder that replaces `path` when the block succeeds."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write_staging_marker(tmp, path)
        yield tmp
        tmp.chmod(0o755)  # mkdtemp folders are private; an export is an ordinary folder
        (tmp / STAGING_MARKER).unlink()
        Manifest(kind=kind, command=kind, started=time.time(), finished=time.time(),
                 files=tuple(f for f in files_under(tmp) if f != MANIFEST)).save(tmp)
        _check_clash(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)  # after its swap `tmp` names the old folder: never deleted here


@contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path that replaces the file `path` when the block succeeds."""
    path = Path(path)
    _refuse_other_kind(path, want_dir=False)
    with atomic_file(path) as tmp:
        yield tmp
