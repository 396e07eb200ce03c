"""`mixbits classify`: layer-wise quantization of a sentence classifier, scored by accuracy.

    check names (cheap) -> labelled data (train / test) -> model: the checkpoint's own head, or a
    sentence encoder + a linear head trained on the training sentences (`classify.head`)
    -> original accuracy on the test sentences
    -> per linear and per block: the test accuracy when it alone is 4-bit (`classifier_ablation`)
    -> per linear: on training sentences, the KL of the class distribution to the original when
       it alone is 4-bit (`ranking`), which orders the layers for the strategies
    -> strategies (`strategies`): accuracy, flips against the original with McNemar's p, bpw, size
    -> classify.json and classify.png in the output folder

Every model is fake-quantized round-to-nearest (`fake_quantize_model`); tensors outside the plan
stay as loaded (float32), so the only difference from the original is the planned layers, as in
the per-layer ablation. Sizes count what the native format stores: planned layers by the cost
model, every other tensor in 16 bit. Stages are chained here; the formulas live in their modules.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mixbits.classify.config import ClassifyConfig
from mixbits.classify.head import HeadFit, train_head
from mixbits.classify.model import EncoderClassifier, choose_task, embeddings_of, label_mapping
from mixbits.classify.ranking import one_at_a_time
from mixbits.classify.strategies import build_strategies, sensitivity_order
from mixbits.config import resolve_device
from mixbits.data.labelled import LabelledData, load_labelled, resolve_labelled
from mixbits.eval.classification import (
    accuracy_of, classifier_logits, disagreements, encode, mcnemar_p, standard_error,
)
from mixbits.io import atomic_write_json
from mixbits.model.apply import fake_quantize_model
from mixbits.model.arch import find_linears
from mixbits.model.load import load_model, validate_model_name
from mixbits.model.arch import fixed_bytes_of
from mixbits.plan import Plan
from mixbits.report.classify_plots import plot_classify
from mixbits.provenance import environment
from mixbits.sensitivity.ablation import classifier_ablation
from mixbits.sensitivity.units import block_units, units_of

log = logging.getLogger(__name__)

CLASSIFY_FORMAT = "mixbits.classify/1"


@dataclass
class Prepared:
    """A classifier ready to score, with its tokenized sentences and labels (model class indices)."""

    classifier: nn.Module
    data: LabelledData
    task: str
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    rank_rows: list[int]  # rows of the training sentences that rank the layers
    head: HeadFit | None


def check_inputs(cfg: ClassifyConfig) -> torch.device:
    """Every cheap check, before any download or compute: dataset, model name, device."""
    resolve_labelled(cfg.dataset)
    validate_model_name(cfg.model)
    return resolve_device(cfg.device)


def rank_rows(n_train: int, k: int, seed: int) -> list[int]:
    """All training rows when there are at most k, else k of them drawn with `random.Random(seed)`."""
    return list(range(n_train)) if n_train <= k else sorted(random.Random(seed).sample(range(n_train), k))


def prepare_loaded(cfg: ClassifyConfig, model: nn.Module, tokenizer, data: LabelledData, task: str,
                   device: torch.device) -> Prepared:
    """Tokenize, train the head when the model has none, map dataset labels onto model classes."""
    train = encode(tokenizer, data.train.texts, max_length=cfg.max_length)
    test = encode(tokenizer, data.test.texts, max_length=cfg.max_length)
    fit = None
    if task == "encoder":
        features = embeddings_of(model, train, device=device, batch_size=cfg.batch_size)
        fit = train_head(features, data.train.labels, len(data.label_names), l2_grid=cfg.head_l2,
                         folds=cfg.head_folds, seed=cfg.seed)
        log.info("head: lambda %g (cross-validated %s), training accuracy %.4f", fit.l2, fit.cv_accuracy, fit.train_accuracy)
        classifier, mapping = EncoderClassifier.from_fit(model, fit), tuple(range(len(data.label_names)))
    else:
        classifier = model
        mapping = label_mapping(getattr(model.config, "id2label", None), model.config.num_labels, data.label_names)
    to_model = torch.tensor(mapping)
    train_labels = to_model[torch.tensor(data.train.labels)]
    test_labels = to_model[torch.tensor(data.test.labels)]
    rows = rank_rows(len(data.train), cfg.rank_examples, cfg.seed)
    return Prepared(classifier.eval(), data, task, train, test, train_labels, test_labels, rows, fit)


def prepare(cfg: ClassifyConfig, device: torch.device) -> Prepared:
    data = load_labelled(cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed)
    task = choose_task(cfg.model, cfg.head)
    model, tokenizer = load_model(cfg.model, device=device, task=task)
    return prepare_loaded(cfg, model, tokenizer, data, task, device)


def _score_plan(p: Prepared, plan: Plan, base_pred: torch.Tensor, shapes, fixed: int, cfg, device) -> dict:
    """Test accuracy of the classifier under `plan`, its flips against the original, bpw and size."""
    model = fake_quantize_model(p.classifier, plan, storage_dtype=None) if plan.quantized() else p.classifier
    logits = classifier_logits(model, p.test, device=device, batch_size=cfg.batch_size)
    lost, gained = disagreements(base_pred, logits.argmax(-1), p.test_labels)
    total = plan.storage_bytes(shapes) + fixed
    bits = Counter(s.bits for s in plan.specs.values())
    return {"accuracy": accuracy_of(logits, p.test_labels), "bpw": plan.bits_per_weight(shapes), "bytes": total,
            "mb": total / 1e6, "layers_by_bits": {str(b): bits[b] for b in sorted(bits)}, "lost": lost,
            "gained": gained, "mcnemar_p": mcnemar_p(lost, gained)}


def _ablations(cfg: ClassifyConfig, p: Prepared, linears, device) -> dict:
    """Per layer and per block: test accuracy with it alone at 4 bits; per layer: the ranking KL."""
    w4 = cfg.spec(4)
    layers, blocks = units_of(linears, "layer"), block_units(linears)
    kw = dict(device=device, progress=cfg.progress, batch_size=cfg.batch_size)
    layer_drop, layer_scores = classifier_ablation(p.classifier, p.test, p.test_labels, layers, (w4,), **kw)
    block_drop, block_scores = classifier_ablation(p.classifier, p.test, p.test_labels, blocks, (w4,), **kw)
    rank_inputs = {k: v[p.rank_rows] for k, v in p.train.items()}
    moved = one_at_a_time(p.classifier, rank_inputs, p.train_labels[p.rank_rows], layers, w4, **kw)
    order = sensitivity_order(list(layers), moved["kl"])
    rank = {name: i + 1 for i, name in enumerate(order)}
    layer_rows = [{"name": n, "block": linears[n].block, "shape": [linears[n].out_features, linears[n].in_features],
                   "accuracy": float(layer_scores["accuracy"][u]), "accuracy_drop": float(layer_drop[u, 0]),
                   "kl": float(moved["kl"][u]), "loss_increase": float(moved["loss_increase"][u]), "rank": rank[n]}
                  for u, n in enumerate(layers)]
    block_rows = [{"name": n, "linears": len(members), "accuracy": float(block_scores["accuracy"][u]),
                   "accuracy_drop": float(block_drop[u, 0])} for u, (n, members) in enumerate(blocks.items())]
    return {"layers": layer_rows, "blocks": block_rows, "order": order}


def _strategies(cfg: ClassifyConfig, p: Prepared, order, shapes, base_pred, device) -> list[dict]:
    fixed = fixed_bytes_of(p.classifier, shapes)
    rows = [{"name": "original", "rule": "no layer quantized (16 bit as stored)",
             **_score_plan(p, Plan({}), base_pred, shapes, fixed, cfg, device), "layers": {}}]
    for s in build_strategies(order, group_size=cfg.group_size, int4_fraction=cfg.int4_fraction):
        plan = Plan(s.specs, {"strategy": s.name})
        scored = _score_plan(p, plan, base_pred, shapes, fixed, cfg, device)
        rows.append({"name": s.name, "rule": s.rule, **scored, "layers": {n: spec.label for n, spec in s.specs.items()}})
        log.info("%s: accuracy %.4f at %.3f bpw", s.name, scored["accuracy"], scored["bpw"])
    return rows


def _data_info(cfg: ClassifyConfig, p: Prepared) -> dict:
    def part(examples):
        counts = Counter(examples.labels)
        return {"examples": len(examples), "per_class": {p.data.label_names[c]: counts[c] for c in sorted(counts)}}

    return {"dataset": p.data.name, "label_names": list(p.data.label_names), "split": p.data.split,
            "train": part(p.data.train), "test": part(p.data.test),
            "rank": {"examples": len(p.rank_rows), "from": "train", "seed": cfg.seed,
                     "score": "mean KL(original || one layer at 4 bits) of the class distribution"}}


def _head_info(fit: HeadFit | None) -> dict | None:
    if fit is None:
        return None
    return {"kind": "linear on the mean-pooled, L2-normalised last hidden state (standardisation folded in)",
            "l2": fit.l2, "cv_accuracy": {str(k): v for k, v in fit.cv_accuracy.items()},
            "train_accuracy": fit.train_accuracy}


def measure(cfg: ClassifyConfig, p: Prepared, device: torch.device, timings: dict[str, float]) -> dict:
    """The whole measurement on a prepared classifier: the body of classify.json without files."""
    linears = find_linears(p.classifier)
    shapes = {n: (i.out_features, i.in_features) for n, i in linears.items()}
    start = time.perf_counter()
    base_logits = classifier_logits(p.classifier, p.test, device=device, batch_size=cfg.batch_size)
    train_logits = classifier_logits(p.classifier, p.train, device=device, batch_size=cfg.batch_size)
    base_acc, n_test = accuracy_of(base_logits, p.test_labels), len(p.test_labels)
    ablations = _ablations(cfg, p, linears, device)
    timings["ablations"] = time.perf_counter() - start
    start = time.perf_counter()
    strategies = _strategies(cfg, p, ablations.pop("order"), shapes, base_logits.argmax(-1), device)
    timings["strategies"] = time.perf_counter() - start
    return {
        "format": CLASSIFY_FORMAT, "config": cfg.to_dict(), "environment": environment(device),
        "model": {"name": cfg.model, "task": p.task, "class": type(p.classifier).__name__,
                  "parameters": sum(t.numel() for t in p.classifier.parameters()), "linears": len(linears),
                  "blocks": len(ablations["blocks"]), "linear_weights": sum(o * i for o, i in shapes.values())},
        "data": _data_info(cfg, p), "head": _head_info(p.head),
        "evaluation": {"metric": "accuracy on the test sentences", "test_examples": n_test,
                       "one_example": 1.0 / n_test, "original_standard_error": standard_error(base_acc, n_test),
                       "quantizer": "round-to-nearest, min-max, asymmetric", "int4": cfg.spec(4).label,
                       "flips": "lost = right before, wrong after; gained = the reverse; p = exact McNemar"},
        "original": {"accuracy": base_acc, "train_accuracy": accuracy_of(train_logits, p.train_labels)},
        **ablations, "strategies": strategies, "timings_s": timings,
    }


def run_classify(cfg: ClassifyConfig) -> dict:
    """The whole job of `mixbits classify`; writes classify.json and classify.png, returns the results."""
    device = check_inputs(cfg)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    prepared = prepare(cfg, device)
    timings["prepare"] = time.perf_counter() - start
    results = measure(cfg, prepared, device, timings)
    out = Path(cfg.output_dir)
    results["files"] = {"results": str(out / "classify.json"), "plot": str(out / "classify.png")}
    plot_classify(results, out / "classify.png")
    atomic_write_json(out / "classify.json", results)
    return results
