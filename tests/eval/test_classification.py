"""Classifier accuracy against a plain one-sentence-at-a-time loop; McNemar against hand values."""

import math

import pytest
import torch

from mixbits.eval.classification import (
    accuracy, accuracy_of, classifier_logits, disagreements, encode, mcnemar_p, standard_error,
)
from tests.classify.conftest import sentiment_lines, sentiment_tokenizer
from tests.conftest import tiny_bert, tiny_distilbert


@pytest.mark.parametrize("build, distil", [(tiny_bert, False), (tiny_distilbert, True)])
def test_accuracy_matches_a_plain_loop(build, distil):
    model, tokenizer = build(), sentiment_tokenizer(distil)
    lines = sentiment_lines(21)
    texts = [line.split(" ", 1)[1] for line in lines]
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (len(texts),), generator=gen).tolist()
    correct = 0
    with torch.no_grad():
        for text, label in zip(texts, labels):  # no padding at all
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
            correct += int(int(logits.argmax()) == label)
    got = accuracy(model, tokenizer, texts, labels, batch_size=4)
    assert got == pytest.approx(correct / len(texts))


def test_logits_do_not_depend_on_the_batch_size():
    model, tokenizer = tiny_bert(), sentiment_tokenizer()
    inputs = encode(tokenizer, [line.split(" ", 1)[1] for line in sentiment_lines(10)])
    a = classifier_logits(model, inputs, device=torch.device("cpu"), batch_size=3)
    b = classifier_logits(model, inputs, device=torch.device("cpu"), batch_size=10)
    assert a.shape == (10, 2) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accuracy_of_and_disagreements():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    assert accuracy_of(logits, [0, 1, 1, 1]) == 0.75
    reference, other, labels = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 0, 1])
    assert disagreements(reference, other, labels) == (1, 2)  # lost: row 1; gained: rows 2 and 3
    with pytest.raises(ValueError, match="labels"):
        accuracy_of(logits, [0, 1])
    with pytest.raises(ValueError, match="one label per text"):
        accuracy(tiny_bert(), sentiment_tokenizer(), ["a b"], [0, 1])


def test_mcnemar_exact_values():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_p(0, 5) == mcnemar_p(5, 0)
    assert mcnemar_p(3, 3) == 1.0
    # brute force: two-sided tail of Binomial(n, 1/2) at min(lost, gained)
    n, k = 12, 2
    assert mcnemar_p(k, n - k) == pytest.approx(2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def test_standard_error():
    assert standard_error(0.7, 60) == pytest.approx(math.sqrt(0.21 / 60))
    assert standard_error(1.0, 5) == 0.0
    with pytest.raises(ValueError):
        standard_error(0.5, 0)
