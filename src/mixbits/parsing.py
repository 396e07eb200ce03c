"""The one parser of comma lists ("2,3,4", "w2g128, w3g128", "64,128,pc") and budget ranges.

Items are stripped and blanks dropped, so "2, 3,,4" reads as (2, 3, 4). Each item goes through
`convert`; an item it refuses raises `UserError` naming the field, the bad item and an example,
which the CLI prints as one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from mixbits.errors import UserError

T = TypeVar("T")

PER_CHANNEL = ("pc", "none", "-1")  # ways to write "one group per output channel" (group size None)


def split_list(text: str) -> tuple[str, ...]:
    """The stripped, non-blank items of a comma list."""
    return tuple(item for item in (x.strip() for x in text.split(",")) if item)


def parse_list(text: str, convert: Callable[[str], T] = str, *, field: str = "list", what: str = "accepted here",
               example: str = "a,b,c") -> tuple[T, ...]:
    """`split_list`, each item through `convert` (str, int, float, `group_size`, ...); `what` says in
    words what an item must be ("an integer"), for the error."""
    out = []
    for item in split_list(text):
        try:
            out.append(convert(item))
        except ValueError:
            raise UserError(f"{field} {text!r}: {item!r} is not {what}; write e.g. {example}") from None
    return tuple(out)


def group_size(item: str) -> int | None:
    """A group size: a positive integer, or pc / none / -1 for per-channel (None)."""
    return None if item.lower() in PER_CHANNEL else int(item)


def parse_range(text: str, *, field: str = "budget range") -> tuple[float, ...]:
    """``2.5:4.5:0.25`` (inclusive, rounded to 6 decimals) or a comma list ``2.5,3,3.25``."""
    if ":" not in text:
        return parse_list(text, float, field=field, what="a number", example="2.5:4.5:0.25 or 2.5,3,3.25")
    try:
        lo, hi, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"{field} {text!r} must look like 2.5:4.5:0.25 (from:to:step) or 2.5,3,3.25") from None
    if not step > 0 or hi < lo:
        raise UserError(f"{field} {text!r}: from:to:step needs step > 0 and to >= from, e.g. 2.5:4.5:0.25")
    n = int(round((hi - lo) / step)) + 1
    return tuple(round(lo + i * step, 6) for i in range(n))


def parse_ints(text: str, *, field: str = "--bits", example: str = "2,3,4") -> tuple[int, ...]:
    return parse_list(text, int, field=field, what="an integer", example=example)


def parse_floats(text: str, *, field: str, example: str = "0.01,0.1,1") -> tuple[float, ...]:
    return parse_list(text, float, field=field, what="a number", example=example)


def parse_group_sizes(text: str, *, field: str = "--group-sizes") -> tuple[int | None, ...]:
    return parse_list(text, group_size, field=field, what="a group size", example="64,128,pc (pc = per-channel)")


def parse_names(text: str, every: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A comma list of names; "all" means every name in `every` (when given)."""
    return tuple(every) if every and text.strip() == "all" else split_list(text)
