"""Options generated from config dataclasses (cli/fields.py): every field a flag or named as set otherwise,
defaults and types from the dataclass, lists parsed, the config's own errors."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mixbits.classify.config import ClassifyConfig
from mixbits.cli.analyze import ANALYZE_HELPS, ANALYZE_HIDDEN
from mixbits.cli.classify import CLASSIFY_HELPS, CLASSIFY_HIDDEN
from mixbits.cli.common import user_errors
from mixbits.cli.fields import ConfigOptions, config_options, unexposed
from mixbits.cli.train import TRAIN_HELPS, TRAIN_HIDDEN
from mixbits.config import TrainConfig
from mixbits.errors import UserError
from mixbits.jobs.analyze_config import AnalyzeConfig


@pytest.mark.parametrize("cls, helps, hidden", [(AnalyzeConfig, ANALYZE_HELPS, ANALYZE_HIDDEN),
                                                (TrainConfig, TRAIN_HELPS, TRAIN_HIDDEN),
                                                (ClassifyConfig, CLASSIFY_HELPS, CLASSIFY_HIDDEN)])
def test_every_field_is_a_flag_or_named_as_set_otherwise(cls, helps, hidden):
    assert unexposed(cls, helps, hidden) == []  # a new field needs a flag (and its help) or a line in hidden
    assert not set(helps) & set(hidden)


@dataclass(frozen=True)
class Toy:
    name: str = "x"
    count: int = 3
    rate: float | None = None
    bits: tuple[int, ...] = (2, 4)
    groups: tuple[int | None, ...] = (64, None)
    words: tuple[str, ...] | None = None
    folder: Path | None = None
    on: bool = True

    def __post_init__(self):
        if self.count < 1:
            raise UserError(f"--count {self.count} must be at least 1")


def toy_app(seen: list):
    app = typer.Typer()

    @app.command()
    @config_options(Toy, {n: n for n in ("name", "count", "rate", "bits", "groups", "words", "folder", "on")},
                    flags={"on": "switch"})
    def toy(extra: int = typer.Option(0), *, options: ConfigOptions) -> None:
        with user_errors():
            seen.append((options.config(), extra))

    @app.command()
    def other() -> None:  # a second command: typer then takes the first one's name
        pass

    return app


def test_defaults_come_from_the_dataclass_and_typed_values_reach_it(tmp_path):
    seen, runner = [], CliRunner()
    app = toy_app(seen)
    assert runner.invoke(app, ["toy"]).exit_code == 0
    assert seen[-1] == (Toy(), 0)
    result = runner.invoke(app, ["toy", "--name", "y", "--count", "5", "--rate", "0.5", "--bits", "3,8",
                                 "--groups", "32,pc", "--words", "a, b", "--folder", str(tmp_path), "--no-switch",
                                 "--extra", "7"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == (Toy("y", 5, 0.5, (3, 8), (32, None), ("a", "b"), tmp_path, False), 7)
    assert "[default: 2,4]" in runner.invoke(app, ["toy", "--help"]).output


def test_bad_values_are_the_configs_own_errors_naming_the_flag():
    seen, runner = [], CliRunner()
    app = toy_app(seen)
    bad = runner.invoke(app, ["toy", "--bits", "3,x"])
    assert bad.exit_code == 2 and "--bits" in bad.output and "'x'" in bad.output
    bad = runner.invoke(app, ["toy", "--count", "0"])
    assert bad.exit_code == 2 and "--count 0 must be at least 1" in bad.output
    assert seen == []


def test_an_unknown_field_is_a_programming_error():
    with pytest.raises(TypeError, match="Toy has no field 'nope'"):
        config_options(Toy, {"nope": "?"})
