"""The classifier flow end to end on tiny BERT / DistilBERT folders and a synthetic sentiment file."""

import json

import pytest
import torch

from mixbits.jobs import classify as flow
from mixbits.classify.config import ClassifyConfig
from mixbits.jobs.classify import prepare, run_classify
from mixbits.classify.strategies import STRATEGIES
from mixbits.data.errors import MixbitsDataError
from mixbits.model.apply import fake_quantize_model
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec

CPU = torch.device("cpu")


def config(model, dataset, out, **kw) -> ClassifyConfig:
    return ClassifyConfig(model=str(model), dataset=str(dataset), output_dir=out, device="cpu", progress=False, **kw)


def test_encoder_flow_trains_a_head_and_writes_json_and_plot(encoder_dirs, sentiment_file, tmp_path):
    results = run_classify(config(encoder_dirs["bert"], sentiment_file, tmp_path))
    saved = json.loads((tmp_path / "classify.json").read_text())
    assert saved["format"] == "mixbits.classify/1" and (tmp_path / "classify.png").stat().st_size > 10_000
    assert saved["model"]["task"] == "encoder" and saved["model"]["class"] == "EncoderClassifier"
    assert saved["data"]["train"]["examples"] == 56 and saved["data"]["test"]["per_class"] == {"neg": 12, "pos": 12}
    assert saved["original"]["accuracy"] > 0.75  # a separable task: the head learns it from 56 sentences
    assert saved["head"]["l2"] in (0.01, 0.1, 1.0, 10.0)
    assert saved["evaluation"]["one_example"] == pytest.approx(1 / 24)
    n = saved["model"]["linears"]
    assert len(saved["layers"]) == n == 12 and sorted(r["rank"] for r in saved["layers"]) == list(range(1, n + 1))
    rows = {r["name"]: r for r in saved["strategies"]}
    assert list(rows) == ["original", *STRATEGIES]
    assert rows["original"]["accuracy"] == saved["original"]["accuracy"] and rows["original"]["bpw"] == 16.0
    bpw = [rows[s]["bpw"] for s in ("uniform_int4", "int6_int4", "int8_selective_int4", "uniform_int8", "original")]
    assert bpw == sorted(bpw) and rows["original"]["mb"] > rows["uniform_int4"]["mb"]
    # the single-layer strategy is the per-layer ablation of the least sensitive layer, measured twice
    (least,) = rows["least_sensitive_int4"]["layers"]
    layer = next(r for r in saved["layers"] if r["name"] == least)
    assert layer["rank"] == n and rows["least_sensitive_int4"]["accuracy"] == layer["accuracy"]
    assert results["strategies"][0]["accuracy"] == results["original"]["accuracy"]


def test_classifier_flow_uses_the_checkpoint_head(encoder_dirs, sentiment_file, tmp_path):
    saved = run_classify(config(encoder_dirs["distilbert"], sentiment_file, tmp_path, group_size=None))
    assert saved["model"]["task"] == "sequence-classification" and saved["head"] is None
    assert {s for r in saved["strategies"] for s in r["layers"].values()} == {"w4pc", "w6pc", "w8pc"}
    assert len(saved["blocks"]) == 2 and all(-1 <= b["accuracy_drop"] <= 1 for b in saved["blocks"])


def test_one_layer_at_int4_changes_only_that_layer(encoder_dirs, sentiment_file, tmp_path):
    prepared = prepare(config(encoder_dirs["bert"], sentiment_file, tmp_path), CPU)
    model = prepared.classifier
    name = "bert.encoder.layer.1.intermediate.dense"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = fake_quantize_model(model, Plan({name: QuantSpec(4, 128)}), storage_dtype=None)
    changed = [k for k, v in quantized.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [f"{name}.weight"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched


@pytest.mark.parametrize("field, value, message", [
    ("dataset", "no-such-dataset", "unknown classification dataset 'no-such-dataset'"),
    ("model", "/no/such/model/folder", "unknown model"),
])
def test_bad_names_fail_before_any_compute(monkeypatch, encoder_dirs, sentiment_file, tmp_path, field, value, message):
    def forbidden(*args, **kwargs):
        raise AssertionError("nothing may load before the names are checked")

    monkeypatch.setattr(flow, "load_model", forbidden)
    monkeypatch.setattr(flow, "load_labelled", forbidden)
    monkeypatch.setattr(flow, "choose_task", forbidden)
    names = {"model": encoder_dirs["bert"], "dataset": sentiment_file, field: value}
    with pytest.raises(MixbitsDataError, match=message):
        run_classify(config(names["model"], names["dataset"], tmp_path))
    assert not (tmp_path / "classify.json").exists()


@pytest.mark.parametrize("kw, message", [
    ({"head": "linear"}, "--head 'linear'"), ({"int4_fraction": 1.0}, "--int4-fraction"),
    ({"group_size": 100}, "--group-size"), ({"head_l2": ()}, "--head-l2"), ({"rank_examples": 1}, "--rank-examples"),
])
def test_bad_config_values_name_the_flag(kw, message):
    with pytest.raises(ValueError, match=message):
        ClassifyConfig(**kw)


@pytest.mark.embedded
def test_embedded_minilm_head_beats_chance_on_pang_lee(tmp_path):
    from mixbits.eval.classification import accuracy_of, classifier_logits

    prepared = prepare(ClassifyConfig(output_dir=tmp_path, device="cpu", progress=False), CPU)
    assert prepared.task == "encoder" and len(prepared.data.train) == 140 and len(prepared.test_labels) == 60
    assert prepared.head is not None and prepared.head.train_accuracy > 0.8
    logits = classifier_logits(prepared.classifier, prepared.test, device=CPU)
    assert accuracy_of(logits, prepared.test_labels) > 0.6  # chance is 0.5 on the balanced test split
