import json

import numpy as np
import pytest

from mixbits.model.arch import find_linears, get_weight
from mixbits.quant.affine import fake_quantize
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.seedfile import read_seed_file, relative_weight_mse, seed_table, write_seed_file
from mixbits.sensitivity.units import BlockDamageTable
from tests.conftest import tiny_llama

CONFIGS = (QuantSpec(2, 64), QuantSpec(4, 64), KEEP)


def test_round_trip(tmp_path):
    path = write_seed_file(tmp_path / "s.json", np.array([3.5, 1.25]))
    assert json.loads(path.read_text()) == {"sensitivity_scores": [3.5, 1.25]}
    np.testing.assert_array_equal(read_seed_file(path, 2), [3.5, 1.25])


def test_wrong_length_names_both_lengths(tmp_path):
    path = write_seed_file(tmp_path / "s.json", [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"has 3 scores but the model has 30 blocks"):
        read_seed_file(path, 30)


@pytest.mark.parametrize("content, words", [
    ('{"sensitivity_scores": [1, "high"]}', "score 1 is 'high'"),
    ('{"sensitivity_scores": [1, true]}', "finite number"),
    ('{"sensitivity_scores": 3}', "list of numbers"),
    ('{"scores": [1, 2]}', "no 'sensitivity_scores'"),
    ("not json", "is not (valid )?JSON"),
])
def test_bad_contents_are_refused(tmp_path, content, words):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=words):
        read_seed_file(path, 2)


def test_seed_table_is_score_times_config_proxy():
    model = tiny_llama()
    linears = find_linears(model)
    table = seed_table(np.array([2.0, 1.0]), model, linears, CONFIGS, source="s.json")
    assert isinstance(table, BlockDamageTable) and table.units == ("model.layers.0", "model.layers.1")
    w = {n: get_weight(model.get_submodule(n)).detach() for n in linears}
    e2 = np.mean([float((fake_quantize(x, CONFIGS[0]) - x).square().sum() / x.square().sum()) for x in w.values()])
    proxy = relative_weight_mse(w, CONFIGS)
    assert proxy[0] == pytest.approx(e2) and proxy[0] > proxy[1] > 0 and proxy[2] == 0
    np.testing.assert_allclose(table.damage, np.outer([2.0, 1.0], proxy))
    assert list(table.scores["seed"]) == [2.0, 1.0]
