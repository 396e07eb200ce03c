"""`mixbits run --damage-rows N` over ggml candidates: the ggml types' Fisher damage on N strided rows per layer,
scaled to the layer; the affine configs' damage stays exact; results.json, sensitivity.json and plan.json say so.
A tiny random Llama 256 wide (rows of 256 and 512), as tests/cli/test_run_gguf.py."""

from __future__ import annotations

import json

import numpy as np

from mixbits.plan import Plan
from mixbits.quant.spec import GGMLSpec
from mixbits.sensitivity.table import DamageTable
from tests.cli.test_run_gguf import run, setup  # noqa: F401  (setup: the module's model fixture)

ARGS = ("--candidates", "both", "--bits", "4", "--group-sizes", "128", "--quantizer", "rtn", "--damage", "rtn",
        "--no-baselines", "--no-cache")


def test_the_run_records_its_damage_rows_and_samples_only_the_ggml_types(setup, tmp_path):  # noqa: F811
    *_, smallest, largest = setup
    target = int(smallest + 0.3 * (largest - smallest)) / 1e6
    tables = {}
    for rows in (16, 0):
        out = tmp_path / f"rows{rows}"
        r = run(setup, out, "--target-size-mb", target, "--damage-rows", rows, *ARGS)
        assert r.exit_code == 0, r.output + repr(r.exception)
        assert json.loads((out / "results.json").read_text())["config"]["damage_rows"] == rows
        tables[rows] = DamageTable.load(out / "sensitivity.json")
        assert tables[rows].meta["options"] == ({"damage_rows": 16} if rows else {})
        assert Plan.load(out / "plan.json").meta.get("damage_rows") == (16 if rows else None)
    part, full = tables[16], tables[0]
    ggml = [j for j, c in enumerate(full.configs) if isinstance(c, GGMLSpec)]
    affine = [j for j, c in enumerate(full.configs) if not isinstance(c, GGMLSpec)]
    assert ggml and affine and min(o for o, _ in full.shapes) > 16  # every layer sampled
    np.testing.assert_array_equal(part.damage[:, affine], full.damage[:, affine])
    est, ref = part.damage[:, ggml], full.damage[:, ggml]
    ok = np.isfinite(ref)
    assert np.array_equal(ok, np.isfinite(est)) and not np.allclose(est[ok], ref[ok])
    assert np.median(np.abs(est[ok] / ref[ok] - 1)) < 0.15
