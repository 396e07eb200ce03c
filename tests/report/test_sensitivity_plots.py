import numpy as np

from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.report.sensitivity_plots import plot_predicted_vs_measured, plot_scores
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.validate import validate_methods

W2, W3 = QuantSpec(2, 128), QuantSpec(3, 128)
UNITS = tuple(f"model.layers.{b}.l{i}" for b in range(3) for i in range(3))


def table(method, seed):
    rng = np.random.default_rng(seed)
    damage = np.column_stack([rng.random((9, 2)) + 1e-3, np.zeros(9)])
    damage[0, 0] = 0.0  # a point a log axis cannot show
    return DamageTable(UNITS, ((8, 8),) * 9, (W2, W3, KEEP), damage, method, {"s": rng.random(9)})


def is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_written_as_png(tmp_path):
    tables = {"fisher": table("fisher", 0), "gradient": table("gradient", 1), "output_error": table("output_error", 2)}
    measured = table("ablation", 3)
    validation = validate_methods(tables, measured, [W2, W3], {m: 1.0 for m in tables}, 1.0)
    a = plot_scores(tables, tmp_path / "plots" / "scores.png", block_of=[int(u.split(".")[2]) for u in UNITS])
    b = plot_predicted_vs_measured(tables, measured, validation, tmp_path / "plots" / "validation.png")
    assert a == tmp_path / "plots" / "scores.png" and is_png(a) and is_png(b)
