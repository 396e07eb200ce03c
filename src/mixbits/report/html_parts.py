"""Small HTML building blocks for the reports: escaping, number formatting, tables, sections
and embedded images. Every piece of text that comes from a file passes through `esc`, so a
model called `<script>` shows as text and never runs."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

DASH = "–"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def num(value: object, digits: int = 3) -> str:
    """A number with `digits` significant digits (integers whole, thousands separated), DASH for None/NaN."""
    if value is None:
        return DASH
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return esc(value)
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    if not math.isfinite(value):
        return DASH if math.isnan(value) else ("∞" if value > 0 else "−∞")
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -3 or magnitude >= 6:
        return f"{value:.{digits - 1}e}"
    return f"{value:,.{max(0, digits - 1 - magnitude)}f}"


def sci(value: object, digits: int = 3) -> str:
    """Scientific notation (damage, losses spanning decades), DASH for None/NaN; 0 stays 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return DASH if value is None else esc(value)
    if not math.isfinite(value):
        return DASH
    return "0" if value == 0 else f"{value:.{digits - 1}e}"


def fixed(value: object, decimals: int) -> str:
    """`value` with a fixed number of decimals (ppl 2, bpw 3, KL 4), DASH for None/NaN."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return DASH if value is None else esc(value)
    return DASH if not math.isfinite(value) else f"{value:,.{decimals}f}"


def pct(value: object, decimals: int = 1, signed: bool = False) -> str:
    """A fraction as a percentage: 0.67 -> 67.0 %."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return DASH
    return f"{100 * value:{'+' if signed else ''}.{decimals}f} %"


def mb(n_bytes: object) -> str:
    """Bytes in MB (10⁶), one decimal; more below 10 MB so tiny models do not read 0.0."""
    if not isinstance(n_bytes, (int, float)) or isinstance(n_bytes, bool):
        return DASH
    value = n_bytes / 1e6
    return fixed(value, 1 if abs(value) >= 10 else 2 if abs(value) >= 1 else 3)


def yes_no(value: object) -> str:
    return DASH if value is None else ("yes" if value else "no")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, numeric_from: int = 1,
          text: Sequence[int] = (), caption: str | None = None, cls: str = "") -> str:
    """A table; headers are escaped here, cells must already be HTML (escape text with `esc`).
    Columns from `numeric_from` on are right-aligned, except the indices in `text`."""
    def attr(i: int) -> str:
        return " class=num" if i >= numeric_from and i not in text else ""

    head = "".join(f"<th{attr(i)}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{attr(i)}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
                   for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<div class="wide"><table class="{esc(cls)}">{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def key_values(pairs: Iterable[tuple[str, str]]) -> str:
    """A two-column definition table; values must already be HTML."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def section(anchor: str, title: str, body: str, note: str | None = None) -> str:
    lead = f'<p class="note">{esc(note)}</p>' if note else ""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{lead}{body}</section>'


def png_img(path: str | Path, alt: str) -> str:
    """The PNG at `path` embedded as a data: URI, so the page needs no other file."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def figure(path: str | Path, alt: str, caption: str | None = None) -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure>{png_img(path, alt)}{cap}</figure>"


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"
