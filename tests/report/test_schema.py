"""docs/schema.md documents every field a real run writes (a field added without its line fails here)."""

import json
import re
from pathlib import Path

import pytest

from mixbits.config import IterativeConfig
from mixbits.pipeline import run
from mixbits.quant.spec import QuantSpec
from tests.report.conftest import _config

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "schema.md"


def _section(title: str) -> str:
    text = SCHEMA.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    following = text.find("\n### ", start + 1)
    stops = [i for i in (end, following) if i != -1]
    return text[start:min(stops) if stops else len(text)]


def _documented(section: str) -> set[str]:
    """Every dotted name in backticks, split into its parts: `models.<variant>.kl` -> models, kl ..."""
    names = set()
    for token in re.findall(r"`([^`]+)`", section):
        names.update(p for p in re.split(r"[.\[\]/ ]+", token) if p)
    return names


def _keys(obj, skip_values_of=()) -> set[str]:
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(k)
            if k not in skip_values_of:
                out |= _keys(v, skip_values_of)
    elif isinstance(obj, list):
        for v in obj:
            out |= _keys(v, skip_values_of)
    return out


@pytest.fixture(scope="module")
def iterative_run(tiny_model_dir, tiny_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("schema-it")
    cfg = _config(tiny_model_dir, tiny_text_file, out, report=False,
                  iterative=IterativeConfig(spec=QuantSpec(3, 32), max_ppl_increase=0.5, windows=1))
    run(cfg)
    return out


def test_results_fields_are_documented(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    top = {k for k in results if k not in ("config",)}
    doc = _documented(_section("### results.json"))
    variant = next(iter(results["models"].values()))
    missing = (top | set(variant) | set(results["model"]) | set(results["budget"]) | set(results["evaluation"])) - doc
    assert not missing, f"results.json fields not in docs/schema.md: {sorted(missing)}"
    assert not (set(results["timings_s"]) - doc), "a stage of timings_s is not listed in docs/schema.md"


def test_layer_statistics_fields_are_documented(tiny_run):
    layers = json.loads((tiny_run / "layer_statistics.json").read_text())
    doc = _documented(_section("### layer_statistics.json"))
    missing = (set(layers) | _keys(layers["layers"], skip_values_of=("scores",))) - doc
    assert not missing, f"layer_statistics.json fields not in docs/schema.md: {sorted(missing)}"


def test_iterative_section_fields_are_documented(iterative_run):
    section = json.loads((iterative_run / "results.json").read_text())["iterative"]
    missing = _keys(section) - _documented(_section("### `iterative`"))
    assert not missing, f"iterative fields not in docs/schema.md: {sorted(missing)}"
