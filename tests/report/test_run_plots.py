"""The per-run plots: written for real tiny runs and for synthetic optional sections, and the
data they draw (the heat map's cells, the scores, the budget lines) checked against the files."""

import json

import numpy as np
import pytest

from mixbits.quant.spec import QuantSpec
from mixbits.report.allocation_grid import allocation_grid, short_labels, split_name
from mixbits.report.plot_set import make_plots
from mixbits.report.run_files import layer_scores, load_run
from mixbits.report.run_plots import budget_lines, model_mb
from mixbits.report.section_plots import epochs_of, plot_iterative, plot_training, plot_zeroshot

from .conftest import edit_results, iterative_section, zeroshot_section


def is_png(path):
    data = path.read_bytes()
    return len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plain_run_gets_its_three_core_plots(plain_run):
    plots = make_plots(load_run(plain_run))
    assert set(plots.plots) == {"quality_vs_size", "sensitivity", "allocation"} and not plots.failed
    for p in plots.plots.values():
        assert p.path.parent == plain_run / "plots" and is_png(p.path) and p.alt


def test_every_optional_section_gets_its_plot(full_run):
    plots = make_plots(load_run(full_run), full_run / "figs")
    assert set(plots.plots) == {"quality_vs_size", "sensitivity", "allocation", "training", "zeroshot", "iterative"}
    assert all(is_png(p.path) and p.path.parent == full_run / "figs" for p in plots.plots.values())


def test_section_plots_draw_synthetic_dicts(tmp_path):
    assert is_png(plot_zeroshot(zeroshot_section(), tmp_path / "z.png"))
    assert is_png(plot_iterative(iterative_section(), tmp_path / "i.png"))
    blocks = [{"index": i, "loss_start": 1e-3 * (i + 1), "loss_end": 8e-4 * (i + 1), "best_epoch": 1.5,
               "epochs_run": 1.5, "val_history": [1e-3 * (i + 1), 9e-4 * (i + 1), 8e-4 * (i + 1)],
               "fallback": i == 2} for i in range(30)]
    e2e = {"val_history": [3.1, 3.0, 2.95], "best_epoch": 2}
    assert is_png(plot_training(blocks, tmp_path / "t.png", e2e=e2e))
    with pytest.raises(ValueError, match="no tasks"):
        plot_zeroshot({"tasks": {}}, tmp_path / "none.png")
    with pytest.raises(ValueError, match="no steps"):
        plot_iterative({"steps": []}, tmp_path / "none.png")


def test_a_partial_last_epoch_sits_at_its_own_x():
    assert epochs_of([1.0, 0.9, 0.8], 1.5) == [0.0, 1.0, 1.5]
    assert epochs_of([1.0, 0.9, 0.8], 2.0) == [0.0, 1.0, 2.0]


def test_heat_map_cells_show_the_plans_bits(tiny_run):
    plan = json.loads((tiny_run / "plan.json").read_text())["layers"]
    rows = json.loads((tiny_run / "layer_statistics.json").read_text())["layers"]
    grid = allocation_grid(plan, [r["name"] for r in rows], {r["name"]: r["block"] for r in rows})
    assert grid.blocks == (0, 1) and grid.labels == ("q", "k", "v", "o", "gate", "up", "down")
    assert grid.bits.shape == (2, 7) and np.isfinite(grid.bits).all()
    for name, label in plan.items():
        spec = QuantSpec.parse(label)
        block, column = split_name(name)
        bits, text = grid.cell(block, column)
        assert bits == spec.bits and text == f"{spec.bits}/{spec.group_size}"


def test_grid_names_gpt2_columns_and_kept_or_unusual_specs():
    names = [f"transformer.h.{b}.{p}" for b in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    plan = {names[0]: "w4pc", names[1]: "w3g64s", names[2]: "fp16"}  # the rest: not in the plan, kept
    grid = allocation_grid(plan, names)
    assert grid.labels == ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")
    assert grid.cell(0, "c_attn") == (4.0, "4/pc") and grid.cell(0, "attn.c_proj") == (3.0, "3/64s")
    assert grid.cell(0, "c_fc") == (16.0, "16") and grid.cell(1, "mlp.c_proj") == (16.0, "16")
    assert short_labels(["self_attn.q_proj", "mlp.down_proj"]) == ("q", "down")


def test_scores_come_from_the_files(plain_run):
    table = json.loads((plain_run / "sensitivity.json").read_text())
    stats_path = plain_run / "layer_statistics.json"
    stats = json.loads(stats_path.read_text())
    for row in stats["layers"]:  # a run folder whose layer rows lack scores: sensitivity.json supplies them
        del row["scores"]
    stats_path.write_text(json.dumps(stats))
    rows, scores = layer_scores(load_run(plain_run))
    assert [r["name"] for r in rows] == [u["name"] for u in table["units"]]
    assert scores["fisher_trace"] == [u["scores"]["fisher_trace"] for u in table["units"]]


def test_budget_lines_and_sizes_are_the_files_numbers(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    bpw, size = budget_lines(results)
    assert bpw == pytest.approx(results["config"]["allocation"]["target_bpw"])
    other = results["model"]["other_bytes_fp16"]
    assert size == pytest.approx((results["budget"]["bits"] / 8 + other) / 1e6)
    assert model_mb(results)["mixed"] == pytest.approx((results["models"]["mixed"]["linear_bytes"] + other) / 1e6)
    assert model_mb(results)["mixed"] <= size  # the mixed plan fits the budget in the plot too


def test_only_what_the_folder_holds_is_drawn(plain_run):
    for name in ("layer_statistics.json", "plan.json", "sensitivity.json"):
        (plain_run / name).unlink()
    assert set(make_plots(load_run(plain_run)).plots) == {"quality_vs_size"}


def test_malformed_section_is_reported_and_the_rest_drawn(plain_run):
    def broken(results):
        results["iterative"] = {"steps": [{"step": 1}]}  # no ppl, no bpw

    edit_results(plain_run, broken)
    plots = make_plots(load_run(plain_run))
    assert "iterative" in plots.failed and "KeyError" in plots.failed["iterative"]
    assert {"quality_vs_size", "sensitivity", "allocation"} <= set(plots.plots)
