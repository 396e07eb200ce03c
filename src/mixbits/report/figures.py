"""What every run plot shares: a Figure drawn by Agg (no global backend, no display), written
atomically as PNG, and one colour per bit-width so the heat map and the sensitivity strip agree."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from mixbits.io import atomic_write_bytes
from mixbits.quant.spec import VALID_BITS

DPI = 110
# 2 bits (most damage) red through 8 bits green; kept (16 bit) a light blue apart from the scale.
BIT_COLOURS = {2: "#d73027", 3: "#fc8d59", 4: "#fee08b", 5: "#d9ef8b", 6: "#91cf60", 8: "#1a9850", 16: "#c6dbef"}


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render `fig` and write it to `path` atomically; returns the path."""
    path = Path(path)
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def bits_colormap() -> tuple[ListedColormap, BoundaryNorm, list[int]]:
    """A discrete colormap over the valid bit-widths: value `bits` -> its own colour.

    Cells are coloured by their index among VALID_BITS (`bits_index`), so 8 and 16 sit side by
    side on the colour bar instead of 16 taking half of it."""
    levels = list(VALID_BITS)
    cmap = ListedColormap([BIT_COLOURS[b] for b in levels]).with_extremes(bad="white")
    norm = BoundaryNorm(np.arange(len(levels) + 1) - 0.5, len(levels))
    return cmap, norm, levels


def bits_index(bits: np.ndarray) -> np.ndarray:
    """Each bit-width's index among VALID_BITS (NaN stays NaN, unknown widths become NaN)."""
    lookup = {b: i for i, b in enumerate(VALID_BITS)}
    flat = [lookup.get(int(b), np.nan) if np.isfinite(b) else np.nan for b in np.ravel(bits)]
    return np.ma.masked_invalid(np.asarray(flat, float).reshape(np.shape(bits)))


def text_colour(bits: float) -> str:
    return "white" if bits == 2 or bits == 8 else "black"


def plain_log_axis(axis) -> None:
    """Log-scale tick labels as plain numbers (24, 26, 30) instead of 2.4×10¹ on a narrow range."""
    label = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(label)
    axis.set_minor_formatter(label)


def integer_ticks(axis) -> None:
    axis.set_major_locator(MaxNLocator(integer=True))
