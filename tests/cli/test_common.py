"""What every command's process gets from the CLI: glibc's mmap threshold pinned (model/memory.py)."""

from typer.testing import CliRunner

from mixbits.cli import app
from mixbits.model.memory import MMAP_THRESHOLD


def test_every_command_pins_the_mmap_threshold_before_it_runs(monkeypatch, tmp_path):
    pinned = []
    monkeypatch.setattr("mixbits.model.memory.fix_mmap_threshold", lambda nbytes: pinned.append(nbytes) or True)
    result = CliRunner().invoke(app, ["run", "--model", str(tmp_path / "absent"), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "error:" in result.output and "absent" in result.output  # refused; the process was set up first
    assert pinned == [MMAP_THRESHOLD]
