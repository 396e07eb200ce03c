"""`mixbits run --recipe`: a recipe gives what the same flags give, a run's recorded recipe repeats
it, typed flags override recipe fields, bad recipes stop before any load; the flag table covers
every config field."""

import dataclasses
import inspect
import json

import pytest
import yaml
from typer.testing import CliRunner

import mixbits.pipeline
from mixbits.cli import app
from mixbits.cli.options import FLAG_OF, FLAGS, RECIPE_ONLY, flags_in
from mixbits.config import RunConfig
from mixbits.outdir import read_manifest
from mixbits.recipe import field_paths

runner = CliRunner()
FIGURES = ("ppl", "nll", "kl", "top1", "bpw", "linear_bytes", "bytes_on_disk", "plan")


def flags(model, text) -> list[str]:
    return ["--model", str(model), "--dataset", str(text), "--seqlen", "32", "--calib-windows", "4",
            "--eval-windows", "4", "--target-bpw", "3.5", "--group-sizes", "32,64", "--quantizer", "rtn",
            "--pin", "down_proj=w4g32", "--device", "cpu", "--no-report"]


def recipe_text(model, text) -> str:
    return yaml.safe_dump({
        "model": str(model), "device": "cpu", "quantizer": "rtn", "report": False,
        "data": {"dataset": str(text), "seqlen": 32, "calib_windows": 4, "eval_windows": 4},
        "allocation": {"target_bpw": 3.5, "group_sizes": [32, 64], "pins": {"down_proj": "w4g32"}},
    })


def run_cli(*args):
    r = runner.invoke(app, ["run", "--no-verbose", *map(str, args)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def same_outcome(a, b) -> None:
    """Identical plan.json and identical figures of every variant in results.json."""
    assert json.loads((a / "plan.json").read_text()) == json.loads((b / "plan.json").read_text())
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["recipe"] == rb["recipe"]
    assert set(ra["models"]) == set(rb["models"])
    for name in ra["models"]:
        assert {k: ra["models"][name][k] for k in FIGURES} == {k: rb["models"][name][k] for k in FIGURES}, name


@pytest.fixture(scope="module")
def flag_run(tiny_model_dir, tiny_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("flags") / "run"
    run_cli(*flags(tiny_model_dir, tiny_text_file), "--output-dir", out)
    return out


def test_a_recipe_gives_the_results_of_the_same_flags(flag_run, tiny_model_dir, tiny_text_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_model_dir, tiny_text_file))
    run_cli("--recipe", recipe, "--output-dir", tmp_path / "out")
    same_outcome(flag_run, tmp_path / "out")


def test_a_recorded_recipe_repeats_the_run(flag_run, tmp_path):
    recorded = flag_run / "recipe.yaml"
    assert "recipe.yaml" in read_manifest(flag_run).files  # listed: replaced with the run on --overwrite
    results = json.loads((flag_run / "results.json").read_text())
    assert yaml.safe_load(recorded.read_text()) == results["recipe"]
    assert results["recipe"]["allocation"]["pins"] == ["down_proj=w4g32"] and "output_dir" not in results["recipe"]
    run_cli("--recipe", recorded, "--output-dir", tmp_path / "again")
    same_outcome(flag_run, tmp_path / "again")
    run_cli("--recipe", flag_run / "results.json", "--output-dir", tmp_path / "from-results")  # its `recipe`
    same_outcome(flag_run, tmp_path / "from-results")


class Captured(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """The RunConfig the CLI would run (the pipeline is replaced: nothing loads)."""
    seen = []

    def fake_run(cfg):
        seen.append(cfg)
        raise Captured

    monkeypatch.setattr(mixbits.pipeline, "run", fake_run)
    return seen


def config_of(captured, *args) -> RunConfig:
    r = runner.invoke(app, ["run", "--no-verbose", *map(str, args)])
    assert isinstance(r.exception, Captured), r.output
    return captured[-1]


def test_typed_flags_override_recipe_fields_and_defaults_do_not(captured, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {seqlen: 64, seed: 5}\nallocation: {target_bpw: 3.5, bits: [2, 4]}\n"
                      "quantizer: clip\ntrain: {epochs: 1}\n")
    cfg = config_of(captured, "--recipe", recipe, "--seqlen", "128", "--quantizer", "rtn", "--bits", "3,4",
                    "--output-dir", tmp_path / "o")
    assert cfg.data.seqlen == 128 and cfg.data.seed == 5  # typed flag wins; untouched field from the recipe
    assert cfg.allocation.bits == (3, 4) and cfg.allocation.target_bpw == 3.5
    assert cfg.quantizer == "rtn" and cfg.train.init == "rtn" and cfg.train.epochs == 1.0  # init follows
    assert cfg.output_dir == tmp_path / "o"
    size = config_of(captured, "--recipe", recipe, "--target-size-mb", "5")
    assert size.allocation.target_size_mb == 5.0 and size.allocation.target_bpw is None
    default = config_of(captured, "--recipe", recipe, "--seqlen", "512")  # typed, though equal to the default
    assert default.data.seqlen == 512 and default.data.seed == 5
    off = config_of(captured, "--recipe", recipe, "--no-qat", "--gptq-act-order")
    assert off.train is None and off.gptq.act_order and off.gptq.static_groups


def test_flags_alone_build_the_default_config(captured):
    assert config_of(captured) == RunConfig()
    cfg = config_of(captured, "--qat", "--qat-epochs", "3", "--iterative", "--iterative-spec", "w3g64")
    assert cfg.train.epochs == 3.0 and cfg.train.init == "gptq" and cfg.iterative.spec.label == "w3g64"


@pytest.mark.parametrize("text, words", [
    ("allocation: {target_bwp: 3}", ["allocation.target_bwp", "did you mean allocation.target_bpw"]),
    ("data: {seqlen: 'long'}", ["data.seqlen = 'long'", "expected an integer"]),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "\n".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")), ["alias"]),
])
def test_bad_recipes_stop_before_any_load(captured, tmp_path, text, words):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    r = runner.invoke(app, ["run", "--no-verbose", "--recipe", str(recipe), "--output-dir", str(out)])
    assert r.exit_code == 2 and str(recipe) in r.output, r.output
    assert all(w in r.output for w in words), r.output
    assert not captured and not out.exists()  # the pipeline was never reached


def test_every_config_field_has_a_flag_or_is_recipe_only():
    paths = set(field_paths())
    missing = paths - set(FLAG_OF) - set(RECIPE_ONLY)
    assert not missing, f"config fields with neither a flag nor a RECIPE_ONLY line: {sorted(missing)}"
    assert set(FLAG_OF) <= paths and set(RECIPE_ONLY) <= paths  # no flag of a field that does not exist
    assert not set(FLAG_OF) & set(RECIPE_ONLY)


def test_run_takes_every_flag_of_the_table_and_no_other_run_option():
    from typer.main import get_command

    names = {p.name for p in get_command(app).commands["run"].params}
    assert names == set(FLAGS) | {"verbose", "recipe"}


def test_library_errors_name_fields_the_cli_shows_flags(captured):
    assert flags_in("`data.seqlen` 8 and `train` and `train.batch_size` and `mixbits run`") == \
        "--seqlen 8 and --qat and `train.batch_size` and `mixbits run`"
    r = runner.invoke(app, ["run", "--no-verbose", "--qat-epochs", "3", "--max-ppl-increase", "0.1"])
    assert r.exit_code == 2 and not captured
    assert "--qat-epochs" in r.output and "--qat" in r.output and "`" not in r.output
    r = runner.invoke(app, ["run", "--no-verbose", "--seqlen", "4"])  # the config's check names data.seqlen
    assert r.exit_code == 2 and "error: --seqlen 4 is too short" in r.output and not captured


def test_sweep_compare_and_ablate_share_the_table_and_take_a_recipe(monkeypatch, tmp_path):
    import mixbits.jobs.ablate
    import mixbits.jobs.compare
    import mixbits.jobs.sweep

    seen = {}

    def capture(name):
        def fake(cfg):
            seen[name] = cfg
            raise Captured
        return fake

    monkeypatch.setattr(mixbits.jobs.sweep, "run_sweep", capture("sweep"))
    monkeypatch.setattr(mixbits.jobs.compare, "run_compare", capture("compare"))
    monkeypatch.setattr(mixbits.jobs.ablate, "run_ablation", capture("ablate"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {seqlen: 64}\nallocation: {bits: [2, 4], target_bpw: 3.0}\nquantizer: clip\n")
    for args in (["sweep", "--bpw", "3,4"], ["compare", "--models", "a,b"], ["ablate"]):
        r = runner.invoke(app, [*args, "--no-verbose", "--recipe", str(recipe), "--seed", "3",
                                "--output-dir", str(tmp_path / args[0]), "--overwrite"])
        assert isinstance(r.exception, Captured), r.output
        run = seen[args[0]].run
        assert (run.data.seqlen, run.data.seed, run.allocation.bits, run.quantizer) == (64, 3, (2, 4), "clip")
        assert run.overwrite is False and run.output_dir == tmp_path / args[0]  # the job's folder is claimed apart
    assert seen["sweep"].run.allocation.target_bpw == 4.0 and seen["ablate"].run.allocation.target_bpw == 3.0
    assert seen["compare"].run.model == "a" and seen["ablate"].train.init == "clip"
