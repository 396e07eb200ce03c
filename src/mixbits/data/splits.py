"""Deterministic calibration / validation / test splits that never share a document.

Documents are ordered by the sha256 of a stable key (an article title, or the document text
itself), which shuffles them reproducibly on every machine and Python version (unlike `hash()`).
Walking that order, the first documents make up the test split, the next ones validation, the
rest calibration; a document belongs to the split in which its middle character falls on the
cumulative character axis, so each split gets close to its target share of characters:

    test      ≈ 10 %      validation ≈ 10 %      calibration ≈ 80 %

With one document per split at least (three documents at least in all). Within a split the
documents keep their original order. Because the cut is by whole documents, no text is both
calibrated on and evaluated on.

Labelled examples (sentences of a classification set) are split differently, by
`stratified_split`: a seeded shuffle within each class, so train and test keep the class balance.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from mixbits.errors import UserError

SPLITS = ("calibration", "validation", "test")
# Cumulative share of characters at which test, then validation, end (calibration: the rest).
TEST_FRACTION = 0.10
VALIDATION_FRACTION = 0.10


def stable_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"split {split!r} is not one of {SPLITS}")
    return split


def _cut(midpoints: list[float], share: float, low: int, high: int) -> int:
    """How many leading documents have their middle at or below `share`, clamped to [low, high]."""
    count = sum(1 for m in midpoints if m <= share)
    return max(low, min(high, count))


def split_by_document(docs: Sequence[tuple[str, str]], *, what: str = "text") -> dict[str, list[int]]:
    """Indices into `docs` (pairs of key, text) for each split; see the module docstring."""
    if len(docs) < 3:
        raise UserError(
            f"the {what} has {len(docs)} document(s); splitting into {SPLITS} by document needs at least 3 "
            f"(separate documents by a blank line in .txt files, one per line in .jsonl)"
        )
    order = sorted(range(len(docs)), key=lambda i: (stable_key(docs[i][0]), i))
    lengths = [max(1, len(docs[i][1])) for i in order]
    total, running, midpoints = float(sum(lengths)), 0, []
    for n in lengths:
        midpoints.append((running + n / 2) / total)
        running += n
    n_docs = len(order)
    n_test = _cut(midpoints, TEST_FRACTION, 1, n_docs - 2)
    n_val_end = _cut(midpoints, TEST_FRACTION + VALIDATION_FRACTION, n_test + 1, n_docs - 1)
    return {
        "test": sorted(order[:n_test]),
        "validation": sorted(order[n_test:n_val_end]),
        "calibration": sorted(order[n_val_end:]),
    }


def split_texts(docs: Sequence[tuple[str, str]], split: str, *, what: str = "text") -> list[str]:
    """The texts of one split of keyed documents."""
    return [docs[i][1] for i in split_by_document(docs, what=what)[check_split(split)]]


def stratified_split(labels: Sequence[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) indices of a labelled set: per class, a seeded shuffle puts
    round(test_fraction · n_class) examples in test, the rest in train; both sorted.

    Stratified so that the class balance of both parts is the data's; seeded with its own
    `random.Random(seed)`, so the split is the same on every machine and Python version.
    """
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test fraction {test_fraction!r} must lie strictly between 0 and 1, e.g. 0.3")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n_test = round(test_fraction * len(members))
        if n_test < 1 or n_test >= len(members):
            raise UserError(
                f"class {label} has {len(members)} example(s); a test fraction of {test_fraction} leaves "
                f"{n_test} of them for testing; every class needs at least one example in train and in test"
            )
        test += members[:n_test]
        train += members[n_test:]
    return sorted(train), sorted(test)
