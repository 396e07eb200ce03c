"""bench/speed.py end to end in --quick mode on a tiny random model, so the script cannot rot.

No timing is asserted (CI machines differ); the test checks the shape of what the benchmark
reports: every stage asked for has a positive time, ratios are time / fwd+bwd time, memory
fields are numbers, and the JSON, markdown and plot are written.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from tests.bench import load_bench_script


@pytest.fixture(scope="module")
def speed():
    return load_bench_script("speed")


@pytest.fixture(scope="module")
def quick(speed, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    result = speed.main(["--quick", "--out", str(out), "--widths", "32,64", "--skip-stages", "export.gptq"])
    return speed, result, out


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_requested_stage_has_a_positive_time_and_its_ratio(quick):
    speed, result, _ = quick
    stages = result["main"]["stages"]
    expected = ["load", speed.REFERENCE, *speed.main_stages(speed.method_names())]
    assert list(stages) == [n for n in expected if n != "export.gptq"]
    units = result["main"]["units"]
    assert stages[speed.REFERENCE]["seconds"] == pytest.approx(statistics.median(result["main"]["unit_runs"]))
    for name, row in stages.items():
        assert row["seconds"] > 0 and all(t > 0 for t in row["runs"]), name
        # the unit of a stage is the mean of fwd+bwd passes of this run measured around it
        assert min(units) <= row["unit_s"] <= max(units), name
        assert row["ratio"] == pytest.approx(row["seconds"] / row["unit_s"]), name
        assert _number(row["peak_rss_mb"]) and _number(row["rss_start_mb"]) and row["peak_rss_mb"] > 0, name
        assert row["cuda_peak_mb"] is None or _number(row["cuda_peak_mb"]), name


def test_scaling_tables_have_one_value_per_size(quick):
    speed, result, _ = quick
    tokens, width = result["scaling_tokens"], result["scaling_width"]
    assert tokens["x"] == [32.0, 64.0] and width["x"] == [32.0, 64.0]
    for table in (tokens, width):
        assert list(table["stages"]) == list(speed.SCALING_DEFAULT)
        for row in table["stages"].values():
            assert all(s > 0 for s in row["seconds"]) and _number(row["slope"])
        assert table["stages"][speed.REFERENCE]["ratio"] == [1.0, 1.0]


def test_json_markdown_and_plot_are_written(quick):
    _, result, out = quick
    assert json.loads((out / "speed.json").read_text())["main"]["stages"] == result["main"]["stages"]
    text = (out / "speed.md").read_text()
    assert "| sensitivity.fisher |" in text and "### Growth with model width" in text
    assert result["machine"]["torch"] in text and result["machine"]["rss_peak_method"] in text
    assert (out / "speed.png").stat().st_size > 0


def test_from_json_redraws_the_same_tables(quick, tmp_path):
    speed, _, out = quick
    speed.main(["--from-json", str(out / "speed.json"), "--out", str(tmp_path)])
    assert (tmp_path / "speed.md").read_text() == (out / "speed.md").read_text()
    assert (tmp_path / "speed.png").is_file()


def test_peak_memory_is_per_stage(speed):
    """64 MiB written inside a stage show in its peak; a later empty stage does not inherit them."""
    import _measure  # on sys.path once bench/speed.py is imported

    cpu = torch.device("cpu")
    _, big = _measure.measure(lambda: float(torch.ones(16 * 2**20).sum()), device=cpu)
    _, empty = _measure.measure(lambda: None, device=cpu)
    assert big.peak_rss_mb - big.rss_start_mb > 60
    if _measure.rss_peak_method() != "clear_refs":
        pytest.skip("this system cannot reset the RSS high-water mark; only ru_maxrss is reported")
    assert empty.peak_rss_mb - empty.rss_start_mb < 30
