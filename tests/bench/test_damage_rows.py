"""bench/damage_rows.py on hand-made run folders, so the script cannot rot: every figure of its table is
checked against a sum done here by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixbits.plan import Plan
from mixbits.quant.spec import GGML_TYPES, KEEP
from mixbits.sensitivity.table import DamageTable
from tests.bench import load_bench_script

Q4, Q8 = GGML_TYPES["Q4_0"], GGML_TYPES["Q8_0"]
CONFIGS = (Q4, Q8, KEEP)
UNITS = ("a", "b", "c")


def folder(path, rows, damage, specs, ppl):
    path.mkdir()
    options = {"damage_rows": rows} if rows else {}
    DamageTable(UNITS, ((64, 64),) * 3, CONFIGS, np.array(damage, float), "fisher", meta={"options": options}
                ).save(path / "sensitivity.json")
    Plan(dict(zip(UNITS, specs)), {"gguf": {"file_bytes": 1000}}).save(path / "plan.json")
    results = {"config": {"damage_rows": rows}, "timings_s": {"sensitivity": 100.0 if not rows else 10.0},
               "models": {"mixed": {"ppl": ppl, "kl": 0.1, "top1": 0.9}}}
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_the_table_prices_each_plan_under_the_full_table(tmp_path):
    bench = load_bench_script("damage_rows")
    full = folder(tmp_path / "full", 0, [[4, 1, 0], [2, 1, 0], [8, 1, 0]], (Q4, Q8, Q8), 10.0)
    part = folder(tmp_path / "part", 16, [[3, 1, 0], [2, 2, 0], [8, 1, 0]], (Q8, Q4, Q8), 10.5)
    rows = bench.compare([bench.load(full), bench.load(part)])
    assert [r["layers typed differently"] for r in rows] == [0, 2]
    assert [r["predicted damage (full table)"] for r in rows] == [4 + 1 + 1, 1 + 2 + 1]
    assert rows[1]["vs reference"] == pytest.approx(4 / 6 - 1)
    med, summed = rows[1]["ggml entries: median / summed error"]
    assert med == pytest.approx(np.median([0.25, 0, 0, 0, 1, 0]))  # |3/4 - 1|, |2/1 - 1| and four exact entries
    assert summed == pytest.approx((1 + 1) / (4 + 1 + 2 + 1 + 8 + 1))
    assert rows[1]["damage rows"] == 16 and rows[0]["damage rows"] == "all" and rows[1]["sensitivity s"] == 10.0
    text = bench.main([str(full), str(part), "--out", str(tmp_path / "t.md")])
    assert "| -33.33 % |" in text and (tmp_path / "t.md").read_text().startswith("    python bench/damage_rows.py")


def test_a_sampled_reference_is_refused(tmp_path):
    bench = load_bench_script("damage_rows")
    part = folder(tmp_path / "part", 16, [[3, 1, 0], [2, 2, 0], [8, 1, 0]], (Q8, Q4, Q8), 10.5)
    with pytest.raises(SystemExit, match="--damage-rows 0"):
        bench.compare([bench.load(part)])
