"""Output folders are owned and files are never lost (issue 18: Bad 1-3, "Leftovers and races").

Each case asserts the exact behaviour: exit code 2, a one-line message naming the folder (no
traceback), nothing loaded when the refusal was knowable up front, a user's files unchanged by
sha256, nothing stale left after --overwrite, temporary folders of a killed save removed, the lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixbits.cli import app

runner = CliRunner()
FAST = ("--quantizer", "rtn", "--seqlen", "32", "--calib-windows", "4", "--eval-windows", "4",
        "--group-sizes", "32,64", "--target-bpw", "3.5", "--no-verbose")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def run_cli(model_dir, text_file, out, *extra):
    return invoke("run", "--model", str(model_dir), "--dataset", str(text_file), "--output-dir", str(out), *FAST, *extra)


def one_line_refusal(result, *words: str) -> None:
    """Exit 2, an `error:` line holding every word, and no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    text = " ".join(result.output.split())  # rich may wrap long paths
    for word in words:
        assert " ".join(str(word).split()) in text, (word, result.output)


@pytest.fixture
def no_load(monkeypatch):
    """The model loader fails the test if called: refusals come before any expensive step."""
    from mixbits import pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tiny_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    r = run_cli(tiny_model_dir, tiny_text_file, out, "--no-baselines")
    assert r.exit_code == 0, r.output
    return out


def copy_run(first_run: Path, dest: Path) -> Path:
    shutil.copytree(first_run, dest)
    return dest


# --- mixbits run --output-dir ------------------------------------------------------------------


def test_run_into_an_earlier_run_is_refused_without_overwrite(first_run, tiny_model_dir, tiny_text_file, tmp_path, no_load):
    out = copy_run(first_run, tmp_path / "run")
    before = {p: sha(p) for p in out.rglob("*") if p.is_file()}
    r = run_cli(tiny_model_dir, tiny_text_file, out)
    one_line_refusal(r, out, "--overwrite")
    assert {p: sha(p) for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_the_earlier_run_as_a_whole_and_keeps_user_files(first_run, tiny_model_dir, tiny_text_file, tmp_path):
    out = copy_run(first_run, tmp_path / "run")
    assert (out / "report.html").is_file() and (out / "sensitivity.json").is_file()
    (out / "model" / "my-notes.txt").write_text("the user's own notes")
    (out / "README.user").write_text("keep me")
    kept = {p: sha(p) for p in (out / "model" / "my-notes.txt", out / "README.user")}
    r = run_cli(tiny_model_dir, tiny_text_file, out, "--plan", str(first_run / "plan.json"), "--no-report",
                "--no-baselines", "--overwrite")
    assert r.exit_code == 0, r.output
    assert {p: sha(p) for p in kept} == kept  # a user's files survive byte for byte
    assert not (out / "report.html").exists() and not (out / "plots").exists()  # nothing stale of the older run
    assert not (out / "sensitivity.json").exists()  # --plan computes none ...
    wrote = "".join(r.output.split()).split("wrote", 1)[1]  # rich wraps the line
    assert "sensitivity.json" not in wrote and "report.html" not in wrote  # ... and does not claim to have
    assert "results.json" in wrote and "model/" in wrote
    assert json.loads((out / "results.json").read_text())["budget"]["solver"] is None
    manifest = json.loads((out / ".mixbits-manifest.json").read_text())
    assert manifest["finished"] and "README.user" not in manifest["files"] and "README.user" in manifest["kept"]
    assert not (out / ".mixbits.lock").exists()


def test_run_into_a_folder_with_foreign_files_is_refused(tiny_model_dir, tiny_text_file, tmp_path, no_load):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    before = sha(out / "holiday.jpg")
    r = run_cli(tiny_model_dir, tiny_text_file, out)
    one_line_refusal(r, out, "choose another folder")
    assert sha(out / "holiday.jpg") == before and sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_an_existing_file_as_output_dir_is_refused_up_front(tiny_model_dir, tiny_text_file, tmp_path, no_load):
    out = tmp_path / "results.txt"
    out.write_text("important")
    r = run_cli(tiny_model_dir, tiny_text_file, out)
    one_line_refusal(r, out, "existing file")
    assert out.read_text() == "important"


def _unwritable_dir(tmp_path: Path) -> Path | None:
    """A folder this process cannot write: a read-only one, or (root ignores modes) a read-only fs."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").write_text("x")
    except OSError:
        return ro
    (ro / "probe").unlink()
    sysfs = Path("/sys/kernel")
    try:
        (sysfs / "mixbits-probe").mkdir()
    except OSError:
        return sysfs if sysfs.is_dir() else None
    (sysfs / "mixbits-probe").rmdir()
    return None


def test_an_unwritable_location_is_refused_before_loading(tiny_model_dir, tiny_text_file, tmp_path, no_load):
    parent = _unwritable_dir(tmp_path)
    if parent is None:
        pytest.skip("no location here that this user cannot write")
    out = parent / "mixbits-run"
    r = run_cli(tiny_model_dir, tiny_text_file, out)
    one_line_refusal(r, out, "cannot be written")
    assert not out.exists()
    (tmp_path / "ro").chmod(0o755)


def test_a_path_under_a_file_is_refused(tiny_model_dir, tiny_text_file, tmp_path, no_load):
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "run"
    r = run_cli(tiny_model_dir, tiny_text_file, out)
    one_line_refusal(r, "notes.txt", "which is a file")


# --- the lock ----------------------------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_names_the_holder(tiny_model_dir, tiny_text_file, tmp_path, no_load):
    out = tmp_path / "run"
    out.mkdir()
    holder = os.getppid()  # a live process that is not this one
    (out / ".mixbits.lock").write_text(json.dumps({"pid": holder, "host": os.uname().nodename,
                                                   "command": "mixbits run", "started": 0}))
    r = run_cli(tiny_model_dir, tiny_text_file, out)
    one_line_refusal(r, out, f"pid {holder}")
    assert (out / ".mixbits.lock").is_file()  # the holder's lock is left alone


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    from mixbits.outdir import LOCK, claim

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename, "command": "x", "started": 0}))
    with caplog.at_level("WARNING"), claim(out, "run", command="test"):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and not (out / LOCK).exists()


def test_the_lock_is_released_when_the_command_fails(tmp_path):
    from mixbits.outdir import LOCK, claim, read_manifest

    out = tmp_path / "run"
    with pytest.raises(RuntimeError), claim(out, "run"):
        (out / "results.json").write_text("{}")
        raise RuntimeError("a stage failed")
    assert not (out / LOCK).exists()
    manifest = read_manifest(out)
    assert manifest.finished is None and manifest.files == ("results.json",)


def test_two_processes_race_for_one_folder_and_one_wins(tmp_path):
    """Both processes import mixbits, meet at a barrier (files), then claim at once; the winner holds the
    folder until the loser has tried, so the outcome does not depend on how long the imports took."""
    sync = tmp_path / "sync"
    sync.mkdir()
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        from mixbits.errors import UserError
        from mixbits.outdir import claim
        me, sync = sys.argv[1], pathlib.Path({str(sync)!r})
        (sync / ("ready-" + me)).touch()
        deadline = time.monotonic() + 60
        while len(list(sync.glob("ready-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            with claim({str(tmp_path / 'run')!r}, "run"):
                while not (sync / "tried").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
        except UserError as err:
            (sync / "tried").touch()
            print("REFUSED", err); sys.exit(3)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [(p.wait(), p.stdout.read()) for p in procs]
    assert sorted(code for code, _ in outs) == [0, 3], outs
    refused = [text for code, text in outs if code == 3][0]
    assert "in use by another mixbits command, pid" in refused


# --- temporary folders of a killed save ----------------------------------------------------------------


KILLED_SAVE = """
import os, signal, sys
from mixbits.export.staging import staged_dir
from mixbits.outdir import claim
out, target = sys.argv[1], sys.argv[2]
with claim(out, "run"):
    with staged_dir(target, kind="native") as tmp:
        (tmp / "model.safetensors").write_bytes(b"0" * 1_000_000)
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_save_killed_midway_leaves_a_marked_temporary_that_the_next_run_removes(tmp_path, caplog):
    from mixbits.outdir import LOCK, claim

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(out), str(out / "model")])
    assert done.returncode == -9
    leftovers = [p for p in out.iterdir() if p.name.startswith(".model.")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").stat().st_size == 1_000_000
    with caplog.at_level("WARNING"), claim(out, "run", overwrite=True):  # dead pid: stale lock, taken over
        assert not leftovers[0].exists()
    assert "interrupted save" in caplog.text and not (out / LOCK).exists()


def test_an_interrupted_export_beside_its_target_is_removed_by_the_next_export(first_run, tmp_path):
    target = tmp_path / "exports" / "native"
    holder = tmp_path / "holder"  # the killed process claimed another folder; its staging is beside `target`
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(holder), str(target)])
    assert done.returncode == -9
    assert [p.name.startswith(".native.") for p in target.parent.iterdir()] == [True]
    (target.parent / ".native.user-folder").mkdir()  # hidden, same name pattern, but no marker: not mixbits'
    (target.parent / ".native.user-folder" / "keep.txt").write_text("mine")
    r = invoke("export", "--format", "native", "--run-dir", str(first_run), "--out", str(target), "--no-verbose")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in target.parent.iterdir()) == [".native.user-folder", "native"]
    assert (target.parent / ".native.user-folder" / "keep.txt").read_text() == "mine"


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    from mixbits.outdir import STAGING_MARKER, remove_stale_staging

    live = tmp_path / ".model.abc123"
    live.mkdir()
    (live / STAGING_MARKER).write_text(json.dumps({"target": "model", "pid": os.getppid(), "host": os.uname().nodename}))
    assert remove_stale_staging(tmp_path) == [] and live.is_dir()


# --- mixbits export --out --------------------------------------------------------------------------------


def test_export_into_a_folder_with_user_files_deletes_nothing(first_run, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work")
    before = sha(out / "thesis.tex")
    r = invoke("export", "--format", "native", "--run-dir", str(first_run), "--out", str(out), "--no-verbose")
    one_line_refusal(r, out, "choose another folder")
    assert sha(out / "thesis.tex") == before and sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("where", [".", "model", ".."])
def test_export_onto_the_run_folder_its_model_or_a_parent_is_refused(first_run, tmp_path, where):
    run_dir = copy_run(first_run, tmp_path / "parent" / "run")
    before = {p: sha(p) for p in run_dir.rglob("*") if p.is_file()}
    out = (run_dir / where).resolve()
    r = invoke("export", "--format", "native", "--run-dir", str(run_dir), "--out", str(out), "--no-verbose")
    one_line_refusal(r, "--out", "run folder")
    r = invoke("export", "--format", "native", "--run-dir", str(run_dir), "--out", str(out), "--overwrite",
               "--no-verbose")
    one_line_refusal(r, "--out", "run folder")  # --overwrite does not make a run folder an export
    assert {p: sha(p) for p in run_dir.rglob("*") if p.is_file()} == before


def test_an_earlier_export_is_replaced_only_with_overwrite(first_run, tmp_path):
    out = tmp_path / "export"
    args = ("export", "--format", "native", "--run-dir", str(first_run), "--out", str(out), "--no-verbose")
    assert invoke(*args).exit_code == 0
    (out / "notes.md").write_text("my notes")
    weights = {p.name: sha(p) for p in out.glob("*.safetensors")}
    assert weights
    again = invoke(*args)
    one_line_refusal(again, out, "--overwrite")
    r = invoke(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert (out / "notes.md").read_text() == "my notes" and {p.name: sha(p) for p in out.glob("*.safetensors")} == weights
    assert not (out / ".mixbits.lock").exists() and [p for p in tmp_path.iterdir()] == [out]


def test_an_existing_file_as_gguf_out_is_refused(first_run, tmp_path):
    out = tmp_path / "llama.gguf"
    out.write_bytes(b"GGUF but somebody else's")
    before = sha(out)
    for extra in ((), ("--overwrite",)):
        r = invoke("export", "--format", "gguf", "--run-dir", str(first_run), "--out", str(out), *extra, "--no-verbose")
        one_line_refusal(r, out, "mixbits did not write")
    assert sha(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["llama.gguf"]


def test_an_earlier_mixbits_gguf_is_replaced_only_with_overwrite(tiny_model_dir, tmp_path):
    from mixbits.errors import UserError
    from mixbits.export.gguf import is_mixbits_gguf, write_gguf
    from mixbits.model.apply import layer_shapes
    from mixbits.model.load import load_model
    from mixbits.outdir import claim_file
    from mixbits.plan import Plan
    from mixbits.quant.spec import QuantSpec

    model, tokenizer = load_model(str(tiny_model_dir))
    out = tmp_path / "m.gguf"
    write_gguf(model, Plan.uniform(layer_shapes(model), QuantSpec(4, 32)), out, tokenizer)
    assert is_mixbits_gguf(out) and not is_mixbits_gguf(tiny_model_dir / "config.json")
    with pytest.raises(UserError, match="--overwrite"), claim_file(out, overwrite=False, is_ours=is_mixbits_gguf):
        pass
    with claim_file(out, overwrite=True, is_ours=is_mixbits_gguf) as path:
        assert path == out and (tmp_path / ".m.gguf.mixbits.lock").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# --- the one folder writer ------------------------------------------------------------------------------


@pytest.mark.parametrize("swap", [True, False], ids=["renameat2", "two-renames"])
def test_replacing_a_folder_keeps_foreign_files_and_drops_only_its_own(tmp_path, monkeypatch, swap):
    from mixbits.export import staging

    if not swap:
        monkeypatch.setattr(staging, "exchange", lambda a, b: False)
    target = tmp_path / "model"
    with staging.staged_dir(target, kind="native") as tmp:
        (tmp / "old-only.bin").write_text("old")
        (tmp / "weights.bin").write_text("old weights")
    (target / "user.txt").write_text("user")
    with staging.staged_dir(target, kind="native") as tmp:
        (tmp / "weights.bin").write_text("new weights")
    assert sorted(p.name for p in target.iterdir()) == [".mixbits-manifest.json", "user.txt", "weights.bin"]
    assert (target / "weights.bin").read_text() == "new weights" and (target / "user.txt").read_text() == "user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left


def test_the_swap_is_atomic_on_linux(tmp_path):
    from mixbits.export.staging import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_a_folder_of_foreign_files_is_never_replaced_by_the_library(tmp_path):
    from mixbits.errors import UserError
    from mixbits.export.staging import staged_dir

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"), staged_dir(tmp_path / "docs") as tmp:
        (tmp / "w").write_text("w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"] and (tmp_path / "docs" / "a.txt").read_text() == "mine"


# --- every command that writes an output folder ----------------------------------------------------------


@pytest.mark.parametrize("command", [["analyze"], ["sweep"], ["train", "plan.json"], ["classify"], ["compare"],
                                     ["ablate"]], ids=lambda c: c[0])
def test_every_folder_writing_command_refuses_foreign_folders_and_offers_overwrite(command, tmp_path):
    missing = str(tmp_path / "no-such-model")  # whatever runs past the check fails fast, it never computes
    command = [*command, "--models" if command[0] == "compare" else "--model", missing]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("a,b\n1,2\n")
    before = sha(out / "data.csv")
    r = invoke(*command, "--output-dir", str(out), "--no-verbose")
    one_line_refusal(r, out, "did not write", "choose another folder")
    assert sha(out / "data.csv") == before and sorted(p.name for p in out.iterdir()) == ["data.csv"]
    assert "--overwrite" in " ".join(invoke(command[0], "--help").output.split())


def test_an_export_inside_the_run_folder_goes_with_the_run_on_overwrite(first_run, tiny_model_dir, tiny_text_file,
                                                                        tmp_path):
    run_dir = copy_run(first_run, tmp_path / "run")
    r = invoke("export", "--format", "native", "--run-dir", str(run_dir), "--no-verbose")  # default: RUN_DIR/export-native
    assert r.exit_code == 0, r.output
    listed = json.loads((run_dir / ".mixbits-manifest.json").read_text())["files"]
    assert "export-native/mixbits.json" in listed and any(f.endswith(".safetensors") for f in listed
                                                          if f.startswith("export-native/"))
    r = run_cli(tiny_model_dir, tiny_text_file, run_dir, "--plan", str(first_run / "plan.json"), "--no-report",
                "--no-baselines", "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (run_dir / "export-native").exists()  # no export of the older model beside the new one
