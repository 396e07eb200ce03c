"""Zero-shot scoring through lm-eval on a tiny random Llama, against log-likelihoods computed here."""

from __future__ import annotations

import json

import datasets.config
import huggingface_hub.constants
import lm_eval.tasks
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mixbits.data.bigbench import convert_task_json, tasks_root, write_task
from mixbits.data.errors import MixbitsDataError
from mixbits.eval import zeroshot
from mixbits.eval.zeroshot import evaluate_zeroshot
from tests.conftest import make_text, make_tokenizer

TASK = "bb_physical_intuition"  # an embedded name; the test writes its own 6 documents under it
QUESTIONS = [
    ("The city is", ["big", "in the north of the river", "a"]),
    ("The album was", ["first", "new", "not the one of the year"]),
    ("His team", ["was", "is at war", "had two"]),
    ("The river", ["music", "of the state and the city"]),
    ("The film", ["was the first film", "is", "an album", "the"]),
    ("The school was", ["also", "one", "in the first years of the war"]),
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(make_text())


def peaked_llama(vocab: int, seed: int) -> LlamaForCausalLM:
    """A large init range makes the random model's choices differ by more than float noise."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.5, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models(tokenizer):
    return {"original": peaked_llama(len(tokenizer), 0), "mixed": peaked_llama(len(tokenizer), 1)}


def continuation_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Σ log p(continuation tokens | context), trailing context whitespace moved to the continuation
    (so " word" stays one token), scored in one unpadded forward pass."""
    stem = context.rstrip()
    whole = tokenizer(stem + context[len(stem):] + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(stem, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(logp[t - 1, whole[t]].item() for t in range(start, len(whole)))


def reference(model, tokenizer, docs) -> tuple[float, float]:
    """(acc, acc_norm) from per-choice log-likelihoods: argmax, and argmax of ll / len(choice)."""
    hits, norm_hits = 0, 0
    for doc in docs:
        lls = [continuation_loglik(model, tokenizer, doc["query"], choice) for choice in doc["choices"]]
        hits += max(range(len(lls)), key=lambda i: lls[i]) == doc["gold"]
        normed = [ll / len(choice) for ll, choice in zip(lls, doc["choices"])]
        norm_hits += max(range(len(lls)), key=lambda i: normed[i]) == doc["gold"]
    return hits / len(docs), norm_hits / len(docs)


@pytest.fixture
def tiny_task(tmp_path, monkeypatch, models, tokenizer):
    """6 documents whose gold answer is the original model's pick on every other one (so acc is
    neither 0 nor 1), written where the embedded task is looked up; returns its documents in file order."""
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    examples = []
    for i, (question, choices) in enumerate(QUESTIONS):
        query = f"\nQ: {question}\nA: "
        lls = [continuation_loglik(models["original"], tokenizer, query, c) for c in choices]
        best = max(range(len(choices)), key=lambda j: lls[j])
        gold = best if i % 2 == 0 else (best + 1) % len(choices)
        examples.append({"input": question, "target_scores": {c: int(j == gold) for j, c in enumerate(choices)}})
    conversion = convert_task_json({"append_choices_to_input": False, "examples": examples})
    converted = write_task(TASK, conversion, tasks_root())
    return [json.loads(line) for line in converted.data_file.read_text().splitlines()]


def test_accuracy_matches_loglikelihoods_computed_directly(tiny_task, models, tokenizer):
    out = evaluate_zeroshot(models, tokenizer, [TASK], device="cpu", batch_size=4, progress=False)
    assert out["lm_eval"] == lm_eval.__version__ and out["num_fewshot"] == 0 and out["limit"] is None
    entry = out["tasks"][TASK]
    assert entry["source"] == "bigbench 1.0.0 (embedded)" and entry["docs"] == len(tiny_task)
    assert entry["chance"] == pytest.approx(sum(1 / len(d["choices"]) for d in tiny_task) / len(tiny_task))
    assert set(entry["models"]) == {"original", "mixed"}
    for label, model in models.items():
        acc, acc_norm = reference(model, tokenizer, tiny_task)
        got = entry["models"][label]
        assert got["acc"] == pytest.approx(acc) and got["acc_norm"] == pytest.approx(acc_norm), label
        n = len(tiny_task)
        assert got["acc_stderr"] == pytest.approx((acc * (1 - acc) / (n - 1)) ** 0.5), label
    assert 0 < entry["models"]["original"]["acc"] < 1  # the gold pattern makes the check discriminating


def test_limit_scores_the_same_first_documents_for_every_model(tiny_task, models, tokenizer):
    out = evaluate_zeroshot(models, tokenizer, [TASK], device="cpu", limit=3, batch_size=2, progress=False)
    entry = out["tasks"][TASK]
    assert out["limit"] == 3 and entry["docs"] == 3
    assert entry["chance"] == pytest.approx(sum(1 / len(d["choices"]) for d in tiny_task[:3]) / 3)
    for label, model in models.items():
        acc, acc_norm = reference(model, tokenizer, tiny_task[:3])
        assert entry["models"][label]["acc"] == pytest.approx(acc), label
        assert entry["models"][label]["acc_norm"] == pytest.approx(acc_norm), label


def no_scoring(*args, **kwargs):
    raise AssertionError("no model may be evaluated")


def test_unknown_embedded_task_fails_before_any_evaluation(models, tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(zeroshot, "_score", no_scoring)
    with pytest.raises(MixbitsDataError, match="bb_winowhy"):
        evaluate_zeroshot(models, tokenizer, ["bb_not_a_task"], device="cpu")


@pytest.mark.parametrize("kwargs, words", [
    ({"tasks": "bb_winowhy"}, "list of task names"),
    ({"tasks": ["bb_winowhy", "bb_winowhy"]}, "listed twice"),
    ({"limit": 0}, "limit 0"),
    ({"limit": 0.5}, "limit 0.5"),
    ({"batch_size": 0}, "batch_size 0"),
    ({"models": {}}, "no models"),
])
def test_bad_options_fail_before_any_work(kwargs, words, models, tokenizer, monkeypatch):
    monkeypatch.setattr(zeroshot, "ensure_embedded_tasks", no_scoring)
    monkeypatch.setattr(zeroshot, "_score", no_scoring)
    args = {"models": models, "tasks": ["bb_winowhy"], **kwargs}
    with pytest.raises(ValueError, match=words):
        evaluate_zeroshot(args.pop("models"), tokenizer, args.pop("tasks"), device="cpu", **args)


def test_hub_task_that_cannot_be_loaded_is_one_clear_error(models, tokenizer, monkeypatch, tmp_path):
    """A registry task whose data set is on the hub, with the hub offline: the error names the task
    and the offline alternative, and comes before any model is scored."""
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: mixbits-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_choice: c\ndoc_to_target: 0\n")
    real = lm_eval.tasks.TaskManager

    def registry_without_defaults(include_path=None, include_defaults=True, **kwargs):
        return real(include_path=[str(registry)] + ([include_path] if include_path else []), include_defaults=False)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", registry_without_defaults)
    monkeypatch.setattr(zeroshot, "_score", no_scoring)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read from the environment at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MixbitsDataError, match=r"'hub_task'.*hub.*bb_winowhy.*HF_HUB_OFFLINE=0"):
        evaluate_zeroshot(models, tokenizer, ["hub_task"], device="cpu")
    with pytest.raises(MixbitsDataError, match="nor in lm-eval's registry"):
        evaluate_zeroshot(models, tokenizer, ["no_such_registry_task"], device="cpu")
