"""Texts for calibration and evaluation, by name or path, each in three disjoint splits.

    load_text(name_or_path, split) -> list of documents     (split: calibration | validation | test)

Accepted names (checked by `resolve_text` before anything is downloaded):

* `wiki` (default, embedded): 106 English Wikipedia articles (April 2016) from the dump that the
  PyPI wheel `gensim==4.4.0` ships as test data; cleaned to plain prose (see `data/wiki.py`),
  about 2.7 M characters, split by article with `split_by_document` (≈ 80/10/10 % of characters,
  no article in two splits). The cleaned splits are cached as JSON under
  `<mixbits home>/texts/wiki/`.
* `canterbury` (embedded): four public-domain texts of the Canterbury corpus from the sdist of
  `brotli==1.2.1`, one document each, a second domain (literature) next to Wikipedia. Split by
  hand, since four documents are too few for a hashed split: calibration = lcet10.txt (a 1992
  Library of Congress workshop report, 427 K characters), validation = asyoulik.txt (Shakespeare,
  As You Like It, 125 K), test = alice29.txt (Carroll, Alice in Wonderland, 152 K) + plrabn12.txt
  (Milton, Paradise Lost, 482 K). Line endings are normalised to "\\n"; the text is otherwise kept
  as in the corpus (hard-wrapped lines, verse).
* `wikitext2`, `c4`: the literature's texts through `datasets` and the hub (see `data/hub.py`).
* a `.txt` path: documents separated by blank lines, split by document like `wiki` (the key of
  a document is its text); a `.jsonl` path: one JSON object per line with a `text` field.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from mixbits.data.cache import fetch_member, mixbits_home
from mixbits.data.errors import MixbitsDataError
from mixbits.data.hub import HUB_TEXTS, load_hub_text
from mixbits.data.splits import SPLITS, check_split, split_by_document, split_texts
from mixbits.data.wiki import wiki_articles
from mixbits.errors import UserError
from mixbits.io import atomic_write_json
from mixbits.safeload import loads_json

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".txt", ".jsonl")
WIKI_CACHE_VERSION = 1  # bump when cleaning or splitting changes, so old caches are rebuilt


@dataclass(frozen=True)
class EmbeddedText:
    """A text shipped inside a PyPI package: where it is and how it is split."""

    name: str
    package: str  # pip requirement spec
    sdist: bool  # the files are only in the source distribution
    members: tuple[str, ...]  # paths inside the archive
    notes: str


EMBEDDED_TEXTS = MappingProxyType({
    "wiki": EmbeddedText(
        "wiki", "gensim==4.4.0", False,
        ("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",),
        "106 English Wikipedia articles (2016), cleaned; split by article ~80/10/10 % of characters",
    ),
    "canterbury": EmbeddedText(
        "canterbury", "brotli==1.2.1", True,
        tuple(f"tests/testdata/{f}" for f in ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")),
        "Canterbury corpus literature; calibration lcet10, validation asyoulik, test alice29 + plrabn12",
    ),
})
CANTERBURY_SPLITS = MappingProxyType({
    "calibration": ("lcet10.txt",),
    "validation": ("asyoulik.txt",),
    "test": ("alice29.txt", "plrabn12.txt"),
})


@dataclass(frozen=True)
class TextSource:
    """What a text name resolved to: kind is "embedded", "hub", "txt" or "jsonl"."""

    kind: str
    name: str  # the canonical name, or the absolute path of a file


def text_names() -> tuple[str, ...]:
    return tuple(EMBEDDED_TEXTS) + HUB_TEXTS


def resolve_text(name_or_path: str) -> TextSource:
    """Cheap validation, no download: a known name, or an existing .txt / .jsonl file."""
    key = name_or_path.strip().lower()
    if key in EMBEDDED_TEXTS:
        return TextSource("embedded", key)
    if key in HUB_TEXTS:
        return TextSource("hub", key)
    path = Path(name_or_path).expanduser()
    suffix = path.suffix.lower()
    if suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise MixbitsDataError(f"text file {str(path)!r} does not exist; check the path")
        _read_utf8(path)  # an undecodable file is refused here, before any model loads
        return TextSource(suffix[1:], str(path.resolve()))
    if path.is_file():
        raise MixbitsDataError(
            f"text file {str(path)!r} must end in .txt (blank-line separated documents) "
            f"or .jsonl (a 'text' field per line)"
        )
    raise MixbitsDataError(
        f"unknown dataset {name_or_path!r}; use one of {list(text_names())} or a path to a .txt or .jsonl file"
    )


def load_text(name_or_path: str, split: str) -> list[str]:
    """The documents of one split (calibration | validation | test) of a named text or file."""
    check_split(split)
    source = resolve_text(name_or_path)
    if source.kind == "hub":
        return load_hub_text(source.name, split)
    if source.kind == "txt":
        return split_texts(read_txt(source.name), split, what=f"text file {source.name}")
    if source.kind == "jsonl":
        return split_texts(read_jsonl(source.name), split, what=f"text file {source.name}")
    if source.name == "wiki":
        return list(wiki_splits()[split]["docs"])
    return canterbury_split(split)


def read_txt(path: str | Path) -> list[tuple[str, str]]:
    """(key, text) of each blank-line separated document of a UTF-8 text file."""
    text = _read_utf8(Path(path)).replace("\r\n", "\n")
    docs = [d.strip() for d in re.split(r"\n[ \t]*\n", text)]
    return [(d, d) for d in docs if d]


def _read_utf8(path: Path) -> str:
    """The text of a user's file; one that is not UTF-8 is refused naming the file and the byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MixbitsDataError(f"text file {str(path)!r} is not UTF-8 (byte {err.start}: {err.reason}); "
                               "convert it, e.g. iconv -f latin1 -t utf-8") from None


def read_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """(key, text) of each line's `text` field; blank lines are skipped."""
    docs = []
    for number, line in enumerate(_read_utf8(Path(path)).split("\n"), 1):
        if not line.strip():
            continue
        try:
            text = loads_json(line, f"{path} line {number}")["text"]
        except (UserError, KeyError, TypeError) as err:
            raise MixbitsDataError(
                f"{path} line {number} is not a JSON object with a 'text' field ({type(err).__name__}); "
                f'write one object per line, e.g. {{"text": "..."}}'
            ) from None
        if not isinstance(text, str):
            raise MixbitsDataError(f"{path} line {number}: 'text' is {type(text).__name__}, not a string")
        if text.strip():
            docs.append((text, text))
    return docs


def _text_dir(name: str) -> Path:
    return mixbits_home() / "texts" / name


def _fetch_embedded(name: str) -> list[Path]:
    spec = EMBEDDED_TEXTS[name]
    return [fetch_member(spec.package, m, _text_dir(name) / "src", sdist=spec.sdist) for m in spec.members]


def wiki_splits() -> dict[str, dict[str, list[str]]]:
    """{split: {"titles": [...], "docs": [...]}} of the embedded Wikipedia text, built once."""
    cache = _text_dir("wiki") / f"splits-v{WIKI_CACHE_VERSION}.json"
    if cache.is_file():
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            if data.get("version") == WIKI_CACHE_VERSION and set(data["splits"]) == set(SPLITS):
                return data["splits"]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            pass
        log.warning("ignoring unreadable wiki cache %s; rebuilding it", cache)
    (dump,) = _fetch_embedded("wiki")
    log.info("cleaning %s (once, ~10 s)", dump.name)
    articles = wiki_articles(dump)
    parts = split_by_document(articles, what="wiki dump")
    splits = {s: {"titles": [articles[i][0] for i in parts[s]], "docs": [articles[i][1] for i in parts[s]]} for s in SPLITS}
    sizes = {s: {"articles": len(v["docs"]), "characters": sum(map(len, v["docs"]))} for s, v in splits.items()}
    atomic_write_json(cache, {"version": WIKI_CACHE_VERSION, "source": {"package": EMBEDDED_TEXTS["wiki"].package,
                      "member": EMBEDDED_TEXTS["wiki"].members[0]}, "sizes": sizes, "splits": splits})
    log.info("wiki splits: %s", sizes)
    return splits


def canterbury_split(split: str) -> list[str]:
    """The Canterbury documents of one split (fixed assignment, see the module docstring)."""
    files = {p.name: p for p in _fetch_embedded("canterbury")}
    docs = []
    for name in CANTERBURY_SPLITS[check_split(split)]:
        text = files[name].read_text(encoding="latin-1").replace("\r\n", "\n")
        docs.append("\n".join(line.rstrip() for line in text.split("\n")).strip("\n"))
    return docs
