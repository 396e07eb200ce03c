"""Texts by name or path: validation before download, disjoint splits, file formats."""

import json
import sys

import pytest

from mixbits.data import cache
from mixbits.data.errors import MixbitsDataError
from mixbits.data.splits import SPLITS, split_by_document
from mixbits.data.text import load_text, resolve_text, text_names
from tests.conftest import make_text


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be downloaded")

    monkeypatch.setattr(cache, "fetch_package", refuse)
    monkeypatch.setattr(cache.subprocess, "run", refuse)


def all_splits(name):
    return {s: load_text(name, s) for s in SPLITS}


def test_unknown_name_lists_the_accepted_ones_before_any_download(no_download):
    with pytest.raises(MixbitsDataError, match=r"unknown dataset 'wikipedia'.*'wiki'.*'canterbury'.*'wikitext2'.*'c4'.*\.jsonl"):
        load_text("wikipedia", "test")
    with pytest.raises(MixbitsDataError, match="does not exist"):
        resolve_text("/no/such/file.txt")
    assert set(text_names()) == {"wiki", "canterbury", "wikitext2", "c4"}
    assert resolve_text("WIKI").name == "wiki" and resolve_text("c4").kind == "hub"


def test_other_file_types_are_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(MixbitsDataError, match=r"\.txt.*\.jsonl"):
        resolve_text(str(path))


def test_bad_split_name(tiny_text_file):
    with pytest.raises(ValueError, match="'train' is not one of"):
        load_text(str(tiny_text_file), "train")


def test_txt_splits_are_disjoint_documents(tiny_text_file, tiny_text):
    parts = all_splits(str(tiny_text_file))
    docs = tiny_text.split("\n\n")
    assert all(parts[s] for s in SPLITS)
    assert sorted(sum(parts.values(), [])) == sorted(docs)  # every document once, none split
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not set(parts[a]) & set(parts[b])
    chars = {s: sum(map(len, parts[s])) for s in SPLITS}
    assert chars["calibration"] > 0.6 * sum(chars.values())
    assert all_splits(str(tiny_text_file)) == parts  # deterministic


def test_jsonl_uses_the_text_field(tmp_path):
    docs = make_text(n_docs=20, seed=1).split("\n\n")
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    parts = all_splits(str(path))
    assert sorted(sum(parts.values(), [])) == sorted(docs) and all(parts.values())


def test_jsonl_bad_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(MixbitsDataError, match="line 2"):
        load_text(str(path), "test")


def test_too_few_documents(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("one document\n\nanother document\n")
    with pytest.raises(ValueError, match="2 document.*at least 3"):
        load_text(str(path), "test")


def test_split_targets_characters_and_never_leaves_a_split_empty():
    docs = [(f"doc{i}", "x" * 100) for i in range(100)]
    parts = split_by_document(docs)
    assert [len(parts[s]) for s in ("test", "validation", "calibration")] == [10, 10, 80]
    tiny = split_by_document([("a", "x" * 1000), ("b", "y"), ("c", "z")])
    assert sorted(i for s in SPLITS for i in tiny[s]) == [0, 1, 2] and all(tiny.values())


def test_hub_text_without_datasets_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MixbitsDataError, match=r"pip install datasets.*'wiki'"):
        load_text("wikitext2", "test")


@pytest.mark.embedded
def test_wiki_splits_are_disjoint_articles():
    from mixbits.data.text import wiki_splits

    splits = wiki_splits()
    titles = {s: splits[s]["titles"] for s in SPLITS}
    assert all(titles.values())
    assert sum(len(t) for t in titles.values()) == len(set(sum(titles.values(), []))) > 100
    chars = {s: sum(map(len, splits[s]["docs"])) for s in SPLITS}
    assert 2_000_000 < sum(chars.values()) < 4_000_000
    assert 0.7 < chars["calibration"] / sum(chars.values()) < 0.9
    test = load_text("wiki", "test")
    assert test == splits["test"]["docs"] and not any("{{" in d or "<ref" in d or "[[" in d for d in test)
    assert "Anarchism" in sum(titles.values(), [])


@pytest.mark.embedded
def test_canterbury_is_split_by_document():
    parts = all_splits("canterbury")
    assert [len(parts[s]) for s in SPLITS] == [1, 1, 2]
    assert "Alice was beginning to get very tired" in parts["test"][0]
    assert "Of Man's first disobedience" in parts["test"][1]
    assert all("\r" not in d for d in sum(parts.values(), []))
