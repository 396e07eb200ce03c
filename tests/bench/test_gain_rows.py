"""bench/gain_rows.py in --quick mode (tiny random Llama), so the script cannot rot.

No figure is asserted: the test checks that every arm of every budget is scored on both domains,
that the agreement is measured against the every-row table, and that a rerun reads the tables back."""

from __future__ import annotations

import math

import pytest

from tests.bench import load_bench_script


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    bench = load_bench_script("gain_rows")
    out = tmp_path_factory.mktemp("gain_rows")
    argv = ["--quick", "--out", str(out), "--budgets", "3,4"]
    return bench, bench.main(argv), out, argv


def test_every_arm_is_scored_at_every_budget(quick):
    _, data, out, _ = quick
    arms = {(r["bpw_budget"], r["arm"]) for r in data["results"]}
    assert arms == {(b, a) for b in (3.0, 4.0) for a in ("rtn damage (Fisher)", "follow, every row", "follow, 8 rows")}
    for r in data["results"]:
        assert r["bpw"] <= r["bpw_budget"] + 1e-9
        for domain in ("first", "second"):
            assert math.isfinite(r[domain]["ppl"]) and r[domain]["kl"] >= 0
    assert set(data["agreement"]) == {"8 rows"} and data["agreement"]["8 rows"]["max"] > 0  # sampled, not every row
    assert data["seconds"]["gain, every row"] > 0
    assert "| 8 rows |" in (out / "gain_rows.md").read_text()


def test_a_rerun_reads_the_tables_back(quick):
    bench, data, _, argv = quick
    again = bench.main(argv)
    assert all(v is None for v in again["seconds"].values())
    assert again["agreement"] == data["agreement"]
