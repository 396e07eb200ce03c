"""Encoder + head: same layer names as the HF classifier, task choice, label mapping."""

import pytest
import torch

from mixbits.classify.head import HeadFit
from mixbits.classify.model import EncoderClassifier, choose_task, embeddings_of, label_mapping
from mixbits.model.arch import find_linears
from mixbits.model.apply import fake_quantize_model
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from tests.classify.conftest import sentiment_lines, sentiment_tokenizer
from tests.conftest import tiny_bert, tiny_distilbert


def head_for(hidden: int) -> HeadFit:
    gen = torch.Generator().manual_seed(0)
    return HeadFit(torch.randn(2, hidden, generator=gen), torch.zeros(2), 1.0, {}, 1.0)


@pytest.mark.parametrize("build, base, distil", [(tiny_bert, "bert", False), (tiny_distilbert, "distilbert", True)])
def test_wrapped_encoder_has_the_classifier_layer_names_and_quantizes(build, base, distil):
    full = build()
    encoder = getattr(full, base)
    model = EncoderClassifier.from_fit(encoder, head_for(64))
    assert list(find_linears(model)) == list(find_linears(full))
    tokenizer = sentiment_tokenizer(distil)
    inputs = dict(tokenizer([line.split(" ", 1)[1] for line in sentiment_lines(6)], padding=True, return_tensors="pt"))
    logits = model(**inputs).logits
    features = embeddings_of(encoder, inputs, device=torch.device("cpu"), batch_size=4)
    torch.testing.assert_close(logits, features @ model.head.weight.T + model.head.bias)
    name = next(iter(find_linears(model)))
    quantized = fake_quantize_model(model, Plan({name: QuantSpec(2, 64)}), storage_dtype=None)
    assert not torch.equal(quantized.get_submodule(name).weight, model.get_submodule(name).weight)


def test_choose_task_reads_the_config(encoder_dirs):
    assert choose_task(str(encoder_dirs["bert"]), "auto") == "encoder"
    assert choose_task(str(encoder_dirs["distilbert"]), "auto") == "sequence-classification"
    assert choose_task(str(encoder_dirs["distilbert"]), "train") == "encoder"
    assert choose_task("minilm-l6", "auto") == "encoder"  # from the table, no download
    with pytest.raises(ValueError, match="no sequence-classification head.*--head train"):
        choose_task(str(encoder_dirs["bert"]), "model")
    with pytest.raises(ValueError, match="causal LM.*mixbits run"):
        choose_task("smollm2-135m", "auto")


def test_label_mapping_by_name_or_identity():
    assert label_mapping({0: "NEGATIVE", 1: "POSITIVE"}, 2, ("negative", "positive")) == (0, 1)
    assert label_mapping({0: "pos", 1: "neg"}, 2, ("neg", "pos")) == (1, 0)
    assert label_mapping({0: "LABEL_0", 1: "LABEL_1"}, 2, ("neg", "pos")) == (0, 1)
    with pytest.raises(ValueError, match="3 classes.*--head train"):
        label_mapping({0: "a", 1: "b", 2: "c"}, 3, ("neg", "pos"))
