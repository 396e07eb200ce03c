"""Labelled sentences for classifiers, by name or path, as a train and a test part.

    load_labelled(name_or_path, test_fraction=0.3, seed=0) -> LabelledData

Accepted names (checked by `resolve_labelled` before anything is downloaded):

* `pang-lee-polarity` (embedded): 200 movie-review sentences, 100 positive and 100 negative, from
  Pang & Lee's sentence polarity data, as gensim ships them for its tests
  (`gensim/test/test_data/pang_lee_polarity.cor` in the wheel `gensim==4.4.0`, latin-1, one
  `__label__pos|neg <sentence>` per line, lower-cased and tokenized). Split by `stratified_split`.
* `sst2`: GLUE SST-2 through `datasets` and the hub (`pip install 'mixbits[hub]'`): train = its
  train split (67,349 sentences), test = its validation split (872; GLUE hides the test labels),
  so numbers compare with published SST-2 accuracies. The split is SST-2's own; no seed.
* a path to a file in the same fastText format, one `__label__<name> <text>` per line (UTF-8,
  or latin-1 when the file is not valid UTF-8); split like `pang-lee-polarity`.

Class indices are the label names in sorted order, so `neg`/`negative` = 0 and `pos`/`positive`
= 1, SST-2's own convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from mixbits.data.cache import fetch_member, mixbits_home
from mixbits.data.errors import MixbitsDataError
from mixbits.data.splits import stratified_split
from mixbits.data.text import EmbeddedText
from mixbits.errors import UserError

LABEL_PREFIX = "__label__"
HUB_LABELLED = ("sst2",)
EMBEDDED_LABELLED = MappingProxyType({
    "pang-lee-polarity": EmbeddedText(
        "pang-lee-polarity", "gensim==4.4.0", False, ("gensim/test/test_data/pang_lee_polarity.cor",),
        "200 movie-review sentences (Pang & Lee), 100 pos / 100 neg, latin-1, fastText labels",
    ),
})


@dataclass(frozen=True)
class Examples:
    """Texts and their class indices, in the same order."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise UserError(f"{len(self.texts)} texts but {len(self.labels)} labels; give one label per text")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> "Examples":
        return Examples(tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices))


@dataclass(frozen=True)
class LabelledData:
    """A labelled set split into train and test; `split` says how, for the results file."""

    name: str
    label_names: tuple[str, ...]
    train: Examples
    test: Examples
    split: str


@dataclass(frozen=True)
class LabelledSource:
    """What a dataset name resolved to: kind is "embedded", "hub" or "file"."""

    kind: str
    name: str  # the canonical name, or the absolute path of a file


def labelled_names() -> tuple[str, ...]:
    return tuple(EMBEDDED_LABELLED) + HUB_LABELLED


def resolve_labelled(name_or_path: str) -> LabelledSource:
    """Cheap validation, no download: a known name or an existing file."""
    key = name_or_path.strip().lower()
    if key in EMBEDDED_LABELLED:
        return LabelledSource("embedded", key)
    if key in HUB_LABELLED:
        return LabelledSource("hub", key)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return LabelledSource("file", str(path.resolve()))
    raise MixbitsDataError(
        f"unknown classification dataset {name_or_path!r}; use one of {list(labelled_names())} or a path to a "
        f"file with one '{LABEL_PREFIX}<name> <text>' per line"
    )


def parse_fasttext(lines: list[str], *, what: str) -> tuple[tuple[str, ...], Examples]:
    """(label names, examples) of fastText-format lines; blank lines are skipped."""
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        head, _, text = line.strip().partition(" ")
        if not head.startswith(LABEL_PREFIX) or len(head) == len(LABEL_PREFIX) or not text.strip():
            raise MixbitsDataError(
                f"{what} line {number} is not '{LABEL_PREFIX}<name> <text>': {line.strip()[:60]!r}; "
                f"write one labelled sentence per line"
            )
        pairs.append((head[len(LABEL_PREFIX):], text.strip()))
    names = tuple(sorted({label for label, _ in pairs}))
    if len(names) < 2:
        raise MixbitsDataError(f"{what} has {len(pairs)} sentences with labels {list(names)}; a classifier needs 2 or more")
    index = {name: i for i, name in enumerate(names)}
    return names, Examples(tuple(t for _, t in pairs), tuple(index[label] for label, _ in pairs))


def read_lines(path: str | Path) -> list[str]:
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return raw.decode("latin-1").splitlines()


def _split(name: str, names: tuple[str, ...], examples: Examples, test_fraction: float, seed: int) -> LabelledData:
    train, test = stratified_split(examples.labels, test_fraction, seed)
    how = f"stratified, test fraction {test_fraction}, seed {seed}"
    return LabelledData(name, names, examples.subset(train), examples.subset(test), how)


def load_labelled(name_or_path: str, *, test_fraction: float = 0.3, seed: int = 0) -> LabelledData:
    """The train and test examples of a named labelled set or file (see the module docstring)."""
    source = resolve_labelled(name_or_path)
    if source.kind == "hub":
        return load_sst2()
    if source.kind == "file":
        names, examples = parse_fasttext(read_lines(source.name), what=f"dataset file {source.name}")
        return _split(source.name, names, examples, test_fraction, seed)
    spec = EMBEDDED_LABELLED[source.name]
    path = fetch_member(spec.package, spec.members[0], mixbits_home() / "texts" / source.name / "src", sdist=spec.sdist)
    lines = path.read_bytes().decode("latin-1").splitlines()
    names, examples = parse_fasttext(lines, what=f"{source.name} ({path})")
    return _split(source.name, names, examples, test_fraction, seed)


def _hub_error(why: str) -> MixbitsDataError:
    return MixbitsDataError(
        f"dataset 'sst2' needs the Hugging Face hub: {why}. Fix: `pip install datasets` (or "
        f"`pip install 'mixbits[hub]'`) and make the hub reachable (HF_HUB_OFFLINE=0, network), or use the "
        f"embedded 'pang-lee-polarity', or a local file of '{LABEL_PREFIX}<name> <text>' lines"
    )


def load_sst2() -> LabelledData:
    """GLUE SST-2: train = its train split, test = its validation split (labelled, 872 sentences)."""
    try:
        import datasets
    except ImportError as err:
        raise _hub_error("the `datasets` package is not installed") from err
    try:
        rows = datasets.load_dataset("nyu-mll/glue", "sst2")
    except (OSError, ValueError) as err:  # ConnectionError and the hub's not-found errors are OSErrors
        first = str(err).splitlines()[0] if str(err) else ""
        raise _hub_error(f"loading it failed ({type(err).__name__}: {first})") from err
    names = tuple(rows["train"].features["label"].names)
    parts = {s: Examples(tuple(rows[s]["sentence"]), tuple(int(x) for x in rows[s]["label"])) for s in ("train", "validation")}
    return LabelledData("sst2", names, parts["train"], parts["validation"], "GLUE SST-2: train / validation (as test)")
