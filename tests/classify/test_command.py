"""`mixbits classify` on the command line: a table on success, one red line on bad input."""

from typer.testing import CliRunner

from mixbits.cli import app

runner = CliRunner()


def test_command_prints_the_tables(encoder_dirs, sentiment_file, tmp_path):
    r = runner.invoke(app, ["classify", "--no-verbose", "--model", str(encoder_dirs["distilbert"]), "--dataset",
                            str(sentiment_file), "--output-dir", str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "int8_selective_int4" in r.output and "one sentence = 4.2 pp" in r.output
    assert (tmp_path / "classify.json").is_file() and (tmp_path / "classify.png").is_file()


def test_unknown_dataset_is_one_line_and_exit_2(encoder_dirs, tmp_path):
    r = runner.invoke(app, ["classify", "--no-verbose", "--model", str(encoder_dirs["bert"]), "--dataset", "imdb-xyz",
                            "--output-dir", str(tmp_path)])
    assert r.exit_code == 2 and "imdb-xyz" in r.output and "pang-lee-polarity" in r.output
    assert not (tmp_path / "classify.json").exists()


def test_bad_head_l2_is_refused(encoder_dirs, tmp_path):
    r = runner.invoke(app, ["classify", "--no-verbose", "--model", str(encoder_dirs["bert"]), "--head-l2", "x,y"])
    assert r.exit_code == 2 and "--head-l2 'x,y': 'x' is not a number" in r.output
