"""Tiny random models and texts built in the tests: no hub, no download."""

from __future__ import annotations

import random

import pytest

import mixbits  # noqa: F401  before any torch math: sets MKL_CBWR (mixbits.reproducible)
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = (
    "the a of and to in is was for on that with as by at from his her it an were are which this "
    "be has had or not their first new two after one also other all its years city state time "
    "river music film school team war album season game world party university church house"
).split()


def make_text(n_docs: int = 60, seed: int = 0) -> str:
    """Documents of pseudo-English separated by blank lines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(8)]
        docs.append(" ".join(sentences))
    return "\n\n".join(docs)


def make_tokenizer(text: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def tiny_llama(vocab: int = 256, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return BertForSequenceClassification(cfg).eval()


def tiny_distilbert(seed: int = 0) -> DistilBertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=128)
    return DistilBertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="session", autouse=True)
def computed_cache(tmp_path_factory):
    """A fresh folder for computed caches (damage tables) per test session, so tests that run the
    pipeline compute instead of reading tables an earlier session (or older code) left in the
    user's cache; downloaded packages (MIXBITS_HOME) stay shared. Yields the folder."""
    folder = tmp_path_factory.mktemp("computed-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXBITS_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    figures compared bit for bit, or against a threshold tuned on one thread, do not depend on the
    machine's core count; the previous count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_text() -> str:
    return make_text()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_text):
    """A tiny random Llama with its own BPE tokenizer, saved as a plain HF folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer(tiny_text)
    model = tiny_llama(vocab=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory, tiny_text):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(tiny_text)
    return path


@pytest.fixture
def materialized(monkeypatch):
    """(live, counts): the LazyCheckpoint pieces materialized now, and after each materialize how many
    were live; the test then asserts `max(counts) == 1 and not live` for one piece at a time."""
    from mixbits.model.lazy import LazyCheckpoint

    live, counts = set(), []
    materialize, release = LazyCheckpoint.materialize, LazyCheckpoint.release

    def counting_materialize(self, prefix, hold=None):
        live.add(prefix)
        counts.append(len(live))
        return materialize(self, prefix, hold)

    def counting_release(self, prefix):
        live.discard(prefix)
        return release(self, prefix)

    monkeypatch.setattr(LazyCheckpoint, "materialize", counting_materialize)
    monkeypatch.setattr(LazyCheckpoint, "release", counting_release)
    return live, counts
