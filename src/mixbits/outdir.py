"""Output folders are owned: a command claims its folder before the first expensive step.

A folder may be claimed when it is new, empty, or holds an earlier mixbits output of a kind the
command may replace. mixbits recognises its own outputs by the manifest it writes into each one,
`.mixbits-manifest.json`: the kind of output, the command, when it started and finished, the files
that were there before (`kept`: never touched) and every file the run wrote (`files`). An earlier
output is replaced only with `overwrite=True` (`--overwrite`), and then as a whole: every file its
manifest lists is removed, so nothing of the older run stays beside the new one, while files
mixbits did not write survive byte for byte. A folder with foreign content and no manifest, an
existing file where a folder is wanted, and a location that cannot be written are refused with a
`UserError` before anything is loaded or computed.

While a command runs, `.mixbits.lock` in the folder (pid, host, command, start; hard-linked into place whole)
stops a second command from writing into it; a lock whose pid is dead on this host is stale and is
taken over with a warning. Staged writes (`mixbits.export.staging`) build in hidden temporary
folders named `.<target>.<random>` that hold a marker, `.mixbits-staging`; a kill -9 during a save
leaves one behind, and the next claim of that location removes it (only folders with the marker,
only when the pid in the marker is not alive).

A run killed before it finished leaves a manifest without `finished`; everything in its folder
that is not in `kept` counts as that run's output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mixbits.errors import UserError
from mixbits.lock import acquire_lock, alive, held_here, holder, read_lock, release_lock

log = logging.getLogger(__name__)

MANIFEST = ".mixbits-manifest.json"
LOCK = ".mixbits.lock"
STAGING_MARKER = ".mixbits-staging"
MANIFEST_FORMAT = "mixbits.manifest/1"
EXPORT_KINDS = ("native", "gptq", "compressed", "gguf")
_OWN = frozenset({MANIFEST, LOCK})


@dataclass(frozen=True)
class Manifest:
    """What one mixbits output wrote into its folder (paths relative to it, '/'-separated)."""

    kind: str
    command: str = ""
    started: float = 0.0
    finished: float | None = None
    kept: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    format: str = field(default=MANIFEST_FORMAT)

    def save(self, folder: Path) -> None:
        from mixbits.io import atomic_write_text

        data = {**asdict(self), "kept": list(self.kept), "files": list(self.files)}
        atomic_write_text(folder / MANIFEST, json.dumps(data, indent=1) + "\n")


def read_manifest(folder: str | Path) -> Manifest | None:
    """The manifest of `folder`, or None when it holds none (or an unreadable one)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return Manifest(kind=str(data["kind"]), command=str(data.get("command", "")),
                        started=float(data.get("started", 0.0)), finished=data.get("finished"),
                        kept=tuple(data.get("kept", ())), files=tuple(data.get("files", ())))
    except (ValueError, KeyError, TypeError, OSError):
        log.warning("%s is not a readable mixbits manifest; the folder is treated as foreign", path)
        return None


def files_under(folder: Path) -> list[str]:
    """Every file below `folder` (relative, sorted), leaving out the lock and staging leftovers."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_staging_dir(Path(root) / d)]
        rel = Path(root).relative_to(folder)
        out += [(rel / n).as_posix() for n in names if not (root == str(folder) and n == LOCK)]
    return sorted(out)


def record(folder: Path, manifest: Manifest, *, finished: bool) -> Manifest:
    """Write `manifest` listing every file now in `folder` that was not there before the run."""
    kept = set(manifest.kept)
    files = tuple(f for f in files_under(folder) if f not in kept and f != MANIFEST)
    updated = replace(manifest, files=files, finished=time.time() if finished else None)
    updated.save(folder)
    return updated


def owned_files(folder: Path, manifest: Manifest) -> set[str]:
    """The files of `folder` that the output described by `manifest` wrote. A finished output lists
    them; for one that never finished, every file not `kept`, except where a staged subfolder's own
    manifest (model/) says which of its files are mixbits'."""
    if manifest.finished:
        return set(manifest.files)
    owned = set(files_under(folder)) - set(manifest.kept) - {MANIFEST}
    for sub in {Path(f).parent for f in owned if Path(f).parent != Path(".")}:
        own = read_manifest(folder / sub)
        if own is not None:
            mine = {(sub / f).as_posix() for f in (*own.files, MANIFEST)}
            owned -= {f for f in owned if Path(f).parent == sub and f not in mine}
    return owned


def remove_output(folder: Path, manifest: Manifest) -> None:
    """Delete what an earlier output wrote into `folder` (`owned_files`), then the folders that this
    leaves empty. Foreign files stay untouched; a staged subfolder keeps an emptied manifest, so the
    next staged write into it still knows its foreign files from its own."""
    owned = owned_files(folder, manifest)
    staged = {sub: own for sub in {Path(f).parent for f in owned if Path(f).parent != Path(".")}
              if (own := read_manifest(folder / sub)) is not None}
    for rel in sorted(owned - {MANIFEST} - {(sub / MANIFEST).as_posix() for sub in staged}):
        (folder / rel).unlink(missing_ok=True)
    for sub, own in staged.items():
        if [p.name for p in (folder / sub).iterdir()] == [MANIFEST]:
            (folder / sub / MANIFEST).unlink()
        else:
            replace(own, files=()).save(folder / sub)
    for rel in sorted({p.as_posix() for f in owned for p in Path(f).parents if p != Path(".")}, key=len, reverse=True):
        d = folder / rel
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


# --- temporary folders of staged writes -------------------------------------------------------


def is_staging_dir(path: Path) -> bool:
    return path.name.startswith(".") and (path / STAGING_MARKER).is_file()


def write_staging_marker(tmp: Path, target: Path) -> None:
    (tmp / STAGING_MARKER).write_text(json.dumps({"target": target.name, "pid": os.getpid(),
                                                  "host": socket.gethostname(), "started": time.time()}))


def remove_stale_staging(parent: Path, target_name: str | None = None) -> list[Path]:
    """Remove staging folders that an interrupted save left in `parent` (all of them, or those for
    `target_name`), skipping any whose writer is still alive, and (all only) the temporaries of
    atomic file writes. Call it holding the lock of what they were for. Returns what was removed."""
    from mixbits.io import TEMP_SUFFIX

    removed = []
    if not parent.is_dir():
        return removed
    if target_name is None:
        for path in parent.glob(f".*{TEMP_SUFFIX}"):
            log.warning("removing %s, left by an interrupted save", path)
            path.unlink(missing_ok=True)
            removed.append(path)
    for path in parent.glob(".*"):
        if not (path.is_dir() and is_staging_dir(path)):
            continue
        try:
            info = json.loads((path / STAGING_MARKER).read_text())
        except (ValueError, OSError):
            continue
        if target_name is not None and info.get("target") != target_name:
            continue
        if alive(info.get("pid"), info.get("host")) and info.get("pid") != os.getpid():
            continue
        log.warning("removing %s, left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# --- checks --------------------------------------------------------------------------------------


def check_writable(folder: Path, what: str) -> None:
    """Create `folder` if needed and write a probe file in it: the reliable test (root ignores modes)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} is an existing file, not a folder; choose a folder path")
    for up in (folder, *folder.parents):
        if up.exists() and not up.is_dir():
            raise UserError(f"{what} {folder} lies under {up}, which is a file; choose another path")
        if up.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mixbits-probe-"):
            pass
    except OSError as err:
        raise UserError(f"{what} {folder} cannot be written ({err.strerror or err}); choose a writable location") from None


def _foreign(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in _OWN and not is_staging_dir(p)
                  and not p.name.startswith(".mixbits-probe-") and not p.name.endswith(".mixbits-tmp"))


def check_folder(path: Path, kind: str, *, overwrite: bool, resume: bool = False,
                 replaces: Iterable[str] | None = None, flag: str = "--output-dir") -> Manifest | None:
    """Refuse `path` unless it is new, empty, or an earlier output of a kind in `replaces` (default:
    `kind`) that `overwrite` or `resume` allows; returns that earlier output's manifest."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is an existing file; choose a folder that does not exist yet")
    if not path.is_dir():
        return None
    lock = path / LOCK
    if lock.exists() and (held := read_lock(lock)) and alive(held.get("pid"), held.get("host")):
        raise UserError(f"{path} is in use by another mixbits command, {holder(held)}; wait for it to finish or "
                        f"choose another output folder")
    earlier = read_manifest(path)
    if earlier is None:
        foreign = _foreign(path)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UserError(f"{flag} {path} already holds files that mixbits did not write ({shown}); choose another "
                            "folder (mixbits writes only into a new folder, an empty one, or an earlier mixbits output)")
        return None
    if earlier.kind not in set(replaces or (kind,)):
        raise UserError(f"{flag} {path} holds a mixbits {earlier.kind} output, which a {kind} output does not "
                        "replace; choose another folder")
    if not (overwrite or resume):
        raise UserError(f"{flag} {path} holds an earlier mixbits {earlier.kind} output; pass --overwrite to replace it "
                        "as a whole, or choose another folder")
    return earlier


@dataclass
class Claim:
    """A claimed output folder: `manifest` is what this run has written so far (None for staged ones)."""

    path: Path
    manifest: Manifest | None

    def record(self, finished: bool = False) -> None:
        """Update the manifest with the files written so far (call after each save stage)."""
        if self.manifest is not None:
            self.manifest = record(self.path, self.manifest, finished=finished)


@contextmanager
def claim(path: str | Path, kind: str, *, overwrite: bool = False, resume: bool = False, command: str = "",
          staged: bool = False, replaces: Iterable[str] | None = None, flag: str = "--output-dir") -> Iterator[Claim]:
    """Own the output folder `path` for the duration of the block (see the module docstring).

    staged=False: the command writes files into the folder; an earlier output's files are removed now
    (overwrite) or kept (resume), and the manifest lists what the block wrote, also when it fails.
    staged=True: a staged writer replaces the folder as a whole and writes its manifest; the claim only
    checks, locks and cleans leftovers. The lock is released on every exit, exceptions included.
    """
    path = Path(path)
    if held_here(path / LOCK):  # a job that claimed this folder runs a stage into it (ablate runs `run`)
        yield Claim(path, None)
        return
    # a folder inside one this process claimed was allowed with it: its outputs are the job's own
    overwrite = overwrite or any(held_here(up / LOCK) for up in path.parents)
    earlier = check_folder(path, kind, overwrite=overwrite, resume=resume, replaces=replaces, flag=flag)
    created = not path.exists()
    check_writable(path, flag)
    try:
        acquire_lock(path / LOCK, command or kind)
    except UserError:
        if created and not any(path.iterdir()):
            path.rmdir()
        raise
    ok, owned = False, Claim(path, None)
    try:
        remove_stale_staging(path)
        remove_stale_staging(path.parent, path.name)
        if earlier is not None and overwrite and not staged:
            log.info("--overwrite: removing the earlier %s output in %s", earlier.kind, path)
            remove_output(path, earlier)
        if not staged:
            keep = {f for f in files_under(path) if Path(f).name != MANIFEST}
            if earlier is not None and resume and not overwrite:  # the earlier run's files stay its own
                keep -= owned_files(path, earlier)
            owned.manifest = Manifest(kind=kind, command=command or kind, started=time.time(), kept=tuple(sorted(keep)))
            owned.manifest.save(path)
        yield owned
        ok = True
    finally:
        try:
            owned.record(finished=ok)
            if not ok and earlier is None and owned.manifest is not None and not owned.manifest.files:
                (path / MANIFEST).unlink(missing_ok=True)  # refused before writing anything: leave no trace
        finally:
            release_lock(path / LOCK)
            if created and path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def refresh(folder: str | Path) -> None:
    """List in `folder`'s manifest the files a command wrote after its claim ended (plots)."""
    manifest = read_manifest(folder)
    if manifest is not None:
        record(Path(folder), manifest, finished=manifest.finished is not None)


def written_names(folder: str | Path) -> list[str]:
    """The top-level files and folders (with '/') that the last output in `folder` wrote, from its manifest."""
    manifest = read_manifest(folder)
    if manifest is None:
        return []
    tops = {f.split("/")[0] + ("/" if "/" in f else "") for f in manifest.files}
    return sorted(tops, key=lambda n: (n.endswith("/"), n))


def adopt(parent: Path, written: Path) -> None:
    """Add the files of `written` (inside `parent`) to `parent`'s manifest, so that replacing `parent`
    with --overwrite also removes them (an export written into a run folder)."""
    manifest = read_manifest(parent)
    if manifest is None or parent.resolve() not in written.resolve().parents:
        return
    rel = written.resolve().relative_to(parent.resolve())
    new = [rel.as_posix()] if written.is_file() else [(rel / f).as_posix() for f in files_under(written)]
    replace(manifest, files=tuple(sorted(set(manifest.files) | set(new)))).save(parent)


# --- single-file outputs (GGUF) ---------------------------------------------------------------


@contextmanager
def claim_file(path: str | Path, *, overwrite: bool, is_ours, command: str = "", flag: str = "--out") -> Iterator[Path]:
    """Own the output file `path`: refused when it is a folder, a file mixbits did not write
    (`is_ours(path)` False), or an earlier mixbits file without `overwrite`. The lock is
    `.<name>.mixbits.lock` beside it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file path ending in {path.suffix or 'the format suffix'}")
    if path.exists():
        if not is_ours(path):
            raise UserError(f"{flag} {path} is an existing file that mixbits did not write; choose another path")
        if not overwrite:
            raise UserError(f"{flag} {path} holds an earlier mixbits export; pass --overwrite to replace it, or choose "
                            "another path")
    created = not path.parent.exists()
    check_writable(path.parent, flag)
    lock = acquire_lock(path.parent / f".{path.name}{LOCK}", command or "export")
    try:
        for stale in path.parent.glob(f".{path.name}.*.mixbits-tmp"):
            log.warning("removing %s, left by an interrupted save", stale)
            stale.unlink(missing_ok=True)
        yield path
    finally:
        release_lock(lock)
        if created and path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()
