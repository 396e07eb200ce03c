"""Labelled sentences: fastText lines, stratified splits, names checked before any download."""

import sys

import pytest

from mixbits.data.errors import MixbitsDataError
from mixbits.data.labelled import load_labelled, parse_fasttext, read_lines, resolve_labelled
from mixbits.data.splits import stratified_split


def test_parse_fasttext_sorts_label_names_into_indices():
    names, ex = parse_fasttext(["__label__pos good film", "", "__label__neg  bad film ", "__label__pos fine"], what="t")
    assert names == ("neg", "pos") and ex.texts == ("good film", "bad film", "fine") and ex.labels == (1, 0, 1)
    with pytest.raises(MixbitsDataError, match="line 2 is not '__label__<name> <text>'"):
        parse_fasttext(["__label__a x", "no label here"], what="t")
    with pytest.raises(MixbitsDataError, match="needs 2 or more"):
        parse_fasttext(["__label__a x", "__label__a y"], what="t")


def test_stratified_split_keeps_the_balance_and_is_seeded():
    labels = [0] * 100 + [1] * 50
    train, test = stratified_split(labels, 0.3, seed=0)
    assert sorted(train + test) == list(range(150)) and not set(train) & set(test)
    assert sum(labels[i] == 0 for i in test) == 30 and sum(labels[i] == 1 for i in test) == 15
    assert (train, test) == stratified_split(labels, 0.3, seed=0) != stratified_split(labels, 0.3, seed=1)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        stratified_split(labels, 1.0, seed=0)
    with pytest.raises(ValueError, match="class 1 has 1 example"):
        stratified_split([0, 0, 0, 1], 0.5, seed=0)


def test_file_dataset_is_split_and_latin1_is_read(tmp_path):
    path = tmp_path / "reviews.cor"
    lines = [f"__label__{'pos' if i % 2 else 'neg'} caf\xe9 number {i}" for i in range(20)]
    path.write_bytes("\n".join(lines).encode("latin-1"))
    assert read_lines(path)[1] == "__label__pos caf\xe9 number 1"
    data = load_labelled(str(path), test_fraction=0.2, seed=3)
    assert len(data.train) == 16 and len(data.test) == 4 and sorted(data.test.labels) == [0, 0, 1, 1]
    assert "seed 3" in data.split and data.label_names == ("neg", "pos")


def test_unknown_names_fail_without_download(monkeypatch):
    import mixbits.data.labelled as labelled

    monkeypatch.setattr(labelled, "fetch_member", lambda *a, **k: pytest.fail("no download"))
    with pytest.raises(MixbitsDataError, match=r"unknown classification dataset 'imdb'.*pang-lee-polarity.*sst2"):
        resolve_labelled("imdb")
    assert resolve_labelled("SST2").kind == "hub" and resolve_labelled("pang-lee-polarity").kind == "embedded"


def test_sst2_without_datasets_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MixbitsDataError, match=r"'sst2' needs the Hugging Face hub.*pip install datasets.*pang-lee-polarity"):
        load_labelled("sst2")


@pytest.mark.embedded
def test_pang_lee_polarity_is_200_balanced_sentences():
    data = load_labelled("pang-lee-polarity")
    assert data.label_names == ("neg", "pos") and len(data.train) == 140 and len(data.test) == 60
    assert sorted(data.test.labels).count(0) == 30 and sorted(data.train.labels).count(1) == 70
    assert "simplistic , silly and tedious ." in data.train.texts + data.test.texts
    assert not set(data.train.texts) & set(data.test.texts)


def test_sst2_reads_train_and_validation_through_datasets(monkeypatch):
    class Split(dict):
        features = {"label": type("ClassLabel", (), {"names": ["negative", "positive"]})()}

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append(args)
        return {"train": Split(sentence=["great", "awful", "fine"], label=[1, 0, 1]),
                "validation": Split(sentence=["dull"], label=[0])}

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", load_dataset, raising=False)
    data = load_labelled("sst2")
    assert calls == [("nyu-mll/glue", "sst2")] and data.label_names == ("negative", "positive")
    assert data.train.labels == (1, 0, 1) and data.test.texts == ("dull",) and "validation" in data.split
