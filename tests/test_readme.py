"""The README is a front door that works: its Python example runs, its first screen holds what a
newcomer needs, and every result table in docs/results/ names the command that produced it."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results"
COMMAND = re.compile(r"`(?:mixbits|python|bash|make|PYTHONPATH=)[^`]*`")


def python_example() -> str:
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_the_readme_python_example_runs_on_a_tiny_model(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch, capsys):
    code = python_example()
    assert len(code.strip().splitlines()) <= 10
    # The example names the embedded model and text; here they are the tiny ones (no download).
    swaps = {'"smollm2-135m"': repr(str(tiny_model_dir)), '"wiki"': repr(str(tiny_text_file)),
             "seqlen=512": "seqlen=32"}
    for old, new in swaps.items():
        assert old in code, f"the README example no longer contains {old}; update this test's swaps"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    exec(compile(code, "README.md (python example)", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert "QuantizedModel(" in printed and "'ppl'" in printed and "'kl'" in printed
    assert (tmp_path / "runs" / "quick-api" / "model" / "mixbits.json").is_file()


def test_the_first_screen_holds_pitch_commands_quickstart_example_and_command_table():
    first = "\n".join(README.read_text().splitlines()[:60])
    for needed in ("make demo", "make test", "Quickstart", "mixbits run --model", "```python",
                   "| command | what it does |", "`mixbits export`", "Reliability: "):
        assert needed in first, f"README's first 60 lines lack {needed!r}"


def tables(text: str) -> list[tuple[int, int]]:
    """(first line, line after the end) of each markdown table."""
    lines, found, start = text.splitlines(), [], None
    for i, line in enumerate(lines + [""]):
        if line.startswith("|") and start is None:
            start = i
        elif not line.startswith("|") and start is not None:
            found.append((start, i))
            start = None
    return found


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.md")), ids=lambda p: p.name)
def test_every_result_table_has_the_command_that_produced_it_above_it(path):
    if path.name == "README.md":
        return
    text = path.read_text()
    lines = text.splitlines()
    found = tables(text)
    assert found, f"{path.name} has no table"
    previous_end = 0
    for start, end in found:
        above = "\n".join(lines[previous_end:start])
        assert COMMAND.search(above), f"{path.name}: the table at line {start + 1} has no command above it"
        previous_end = end


@pytest.mark.parametrize("path", [README, *sorted(RESULTS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_and_images_resolve(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if target.startswith(("http://", "https://", "#")):
            continue
        assert (path.parent / target.split("#")[0]).exists(), f"{path.name}: broken link {target}"


def test_every_command_line_in_the_readme_uses_flags_the_cli_has():
    import typer

    from mixbits.cli import app

    commands = typer.main.get_command(app).commands
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), re.S))
    lines = re.findall(r"^(?:\.venv/bin/)?mixbits (\S+)([^#\n]*)", blocks, re.M)
    assert len(lines) >= 10
    for name, rest in lines:
        assert name in commands, f"README: `mixbits {name}` is not a command"
        flags = {o for p in commands[name].params for o in (*p.opts, *p.secondary_opts)}
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", rest):
            assert flag in flags, f"README: `mixbits {name}` has no option {flag}"
