"""The lock file that keeps two mixbits commands out of one output folder: who holds it (pid,
host, command, start), written whole in one step, refused while its holder lives, taken over when
its holder is gone. `outdir.claim` takes it around every command that writes a folder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from mixbits.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["acquire_lock", "alive", "held_here", "holder", "read_lock", "release_lock"]


def alive(pid, host) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process: it cannot be checked from here, so it is respected
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def read_lock(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError):
        return {}


def holder(info: dict) -> str:
    return (f"pid {info.get('pid')} on {info.get('host')} ({info.get('command') or 'mixbits'}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('started', 0)))})")


def acquire_lock(path: Path, command: str) -> Path:
    """Create the lock file `path` with its content in one step; a live holder is refused, a dead one's
    lock taken over.

    The content is written to a private temporary file first and then hard-linked to `path`, which
    fails if `path` exists: a lock is never seen empty. (Creating `path` with O_EXCL and writing
    afterwards let a second process read the empty file in between, take it for a dead holder's, and
    take it over: both runs held the folder.) Two runs that find the same dead holder's lock at once
    may both remove it; the link then lets only one of them create the new lock.
    """
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle)
        for _ in range(2):
            try:
                os.link(tmp, path)
            except FileExistsError:
                held = read_lock(path)
                if held and alive(held.get("pid"), held.get("host")):
                    raise UserError(f"{path.parent} is in use by another mixbits command, {holder(held)}; wait "
                                    f"for it to finish or choose another output folder (if no such process runs, "
                                    f"delete {path})") from None
                log.warning("taking over the stale lock %s of %s, which no longer runs", path, holder(held))
                path.unlink(missing_ok=True)
                continue
            return path
    finally:
        os.unlink(tmp)
    raise UserError(f"could not take the lock {path}; another command keeps creating it; retry")


def held_here(lock: Path) -> bool:
    """Whether this process holds the lock file `lock`."""
    held = read_lock(lock) if lock.is_file() else {}
    return held.get("pid") == os.getpid() and held.get("host") == socket.gethostname()


def release_lock(path: Path) -> None:
    if read_lock(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)
