"""`mixbits export` on the tiny run of tests/test_pipeline.py."""

from typer.testing import CliRunner

from mixbits.cli import app
from tests.test_pipeline import finished_run  # noqa: F401  (module fixture)


def test_export_gptq_with_nearest_plan(finished_run, tmp_path):  # noqa: F811
    cfg, _ = finished_run
    out = tmp_path / "gptq"
    r = CliRunner().invoke(app, ["export", "--format", "gptq", "--run-dir", str(cfg.output_dir), "--out", str(out),
                                 "--nearest", "--no-verbose"])
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def test_export_refuses_a_plan_gguf_cannot_store(finished_run, tmp_path):  # noqa: F811
    cfg, _ = finished_run
    out = tmp_path / "model.gguf"
    r = CliRunner().invoke(app, ["export", "--format", "gguf", "--run-dir", str(cfg.output_dir), "--out", str(out),
                                 "--no-verbose"])
    assert r.exit_code == 2 and "error: the plan cannot be written as gguf" in r.output and "--nearest" in r.output, r.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_help_names_every_ggml_type_gguf_writes():
    from mixbits.quant.spec import GGML_TYPES

    r = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "llama.cpp" in r.output
    assert [n for n in GGML_TYPES if n not in r.output] == []
