"""A separable synthetic sentiment task and tiny encoders, built in the tests (no hub, no download)."""

from __future__ import annotations

import random

import pytest

from tests.conftest import make_tokenizer, tiny_bert, tiny_distilbert

POSITIVE = "good great fine happy love best nice superb".split()
NEGATIVE = "bad awful poor sad hate worst ugly dull".split()
NEUTRAL = "the a of and to in is was film movie story plot actor scene".split()


def sentiment_lines(n: int = 80, seed: int = 0) -> list[str]:
    """fastText lines `__label__pos|neg <sentence>`: six neutral words and two words of the class."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        positive = i % 2 == 1
        words = [rng.choice(NEUTRAL) for _ in range(6)] + [rng.choice(POSITIVE if positive else NEGATIVE) for _ in range(2)]
        rng.shuffle(words)
        lines.append(f"__label__{'pos' if positive else 'neg'} " + " ".join(words))
    return lines


def sentiment_tokenizer(distil: bool = False):
    """A BPE tokenizer of the task's words; DistilBERT takes no token_type_ids."""
    tokenizer = make_tokenizer("\n\n".join(line.split(" ", 1)[1] for line in sentiment_lines()))
    if distil:
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


@pytest.fixture(scope="session")
def sentiment_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sentiment") / "sentiment.txt"
    path.write_text("\n".join(sentiment_lines()) + "\n")
    return path


@pytest.fixture(scope="session")
def encoder_dirs(tmp_path_factory):
    """Saved HF folders: a bare BertModel (no head) and a DistilBertForSequenceClassification."""
    root = tmp_path_factory.mktemp("classify-models")
    bert, distil = root / "bert-encoder", root / "distilbert-classifier"
    tiny_bert().bert.save_pretrained(bert)
    sentiment_tokenizer().save_pretrained(bert)
    tiny_distilbert().save_pretrained(distil)
    sentiment_tokenizer(distil=True).save_pretrained(distil)
    return {"bert": bert, "distilbert": distil}
