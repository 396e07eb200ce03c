"""One self-contained HTML page for `mixbits compare`: `write_comparison_report(summary_path)`
-> `comparison_report.html` beside comparison_summary.json.

It reads comparison_summary.json (`mixbits.comparison/1`) and every `*_analysis.json`
(`mixbits.analysis/1`) in the same folder; it computes no measurement (only the perplexity
increase and shares for display). The plot is `experiment_plots.plot_comparison` (perplexity
vs MB on disk per model, the increase and the compression of each mixed model), drawn into
`plots/comparison.png` and embedded as a data: URI like the run report's.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

from mixbits.io import atomic_write_text
from mixbits.report.experiment_plots import plot_comparison
from mixbits.report.html import page
from mixbits.report.html_parts import DASH, esc, figure, fixed, mb, num, pct, pre, details, section, table

log = logging.getLogger(__name__)

COMPARISON_FORMAT = "mixbits.comparison/1"
ANALYSIS_FORMAT = "mixbits.analysis/1"
REPORT_NAME = "comparison_report.html"
TOP_UNITS = 5
NAV = (("models", "Models"), ("baselines", "Uniform baselines"), ("analyses", "Sensitivity"), ("config", "Configuration"))


def _read(path: Path, fmt: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; `mixbits compare --output-dir DIR` writes DIR/comparison_summary.json")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ValueError(f"{path} has format {data.get('format') if isinstance(data, dict) else None!r}; expected {fmt!r}")
    return data


def load_analyses(folder: Path) -> dict[str, dict]:
    """model name -> its analysis dict, for every `*_analysis.json` of `folder` in the right format."""
    out = {}
    for path in sorted(folder.glob("*_analysis.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            log.warning("%s skipped: not valid JSON (%s)", path, err)
            continue
        if isinstance(data, dict) and data.get("format") == ANALYSIS_FORMAT:
            out[str(data.get("model", path.stem))] = data
    return out


def _models_table(models: dict) -> str:
    rows = []
    for name, m in models.items():
        o, x = m.get("original", {}), m.get("mixed", {})
        rise = x["ppl"] / o["ppl"] - 1 if x.get("ppl") is not None and o.get("ppl") else None
        fits = {k: u for k, u in (m.get("uniform") or {}).items() if u.get("fits_budget")}
        best = min(fits.items(), key=lambda kv: kv[1].get("ppl", math.inf), default=None)
        rows.append([esc(name), fixed((m.get("parameters") or 0) / 1e6, 1), fixed(o.get("ppl"), 2),
                     mb(o.get("bytes_on_disk")), f"<b>{fixed(x.get('ppl'), 2)}</b>", pct(rise, 1, signed=True),
                     fixed(x.get("kl"), 4), fixed(x.get("bpw"), 3), mb(x.get("bytes_on_disk")),
                     fixed(x.get("compression"), 2) + "×" if x.get("compression") else DASH,
                     DASH if best is None else esc(f"{best[0]}: {best[1].get('ppl', 0):.2f}")])
    headers = ["model", "params (M)", "original ppl", "original MB", "mixed ppl", "ppl increase", "mixed KL",
               "mixed bpw", "mixed MB", "compression", "best uniform within budget (ppl)"]
    return table(headers, rows, text=(len(headers) - 1,))


def _baselines_table(models: dict) -> str:
    rows = [[esc(name), esc(label), fixed(u.get("ppl"), 2), fixed(u.get("kl"), 4), fixed(u.get("bpw"), 3),
             mb(u.get("bytes_on_disk")), "yes" if u.get("fits_budget") else "no (over)"]
            for name, m in models.items() for label, u in (m.get("uniform") or {}).items()]
    return table(["model", "uniform config", "ppl", "KL", "bpw", "MB on disk", "fits budget"], rows, numeric_from=2)


def _analysis(name: str, a: dict) -> str:
    sens = a.get("sensitivity") or {}
    units, scores = sens.get("units") or [], sens.get("scores") or {}
    key = next((k for k in scores if sens.get("method") and k.startswith(sens["method"])), next(iter(scores), None))
    plan = a.get("plan") or {}
    body = ""
    if key is not None and units:
        values = scores[key]
        order = sorted(range(len(units)), key=lambda i: -values[i])[:TOP_UNITS]
        body += table(["unit", key, "plan"], [[esc(units[i]), num(values[i]), esc(plan.get(units[i], "fp16"))]
                                              for i in order], caption=f"most sensitive units by {key}")
    counts = Counter(plan.values())
    if counts:
        body += f'<p class="note">plan: {esc(", ".join(f"{n}×{label}" for label, n in sorted(counts.items())))}</p>'
    return f"<h3>{esc(name)}</h3>{body}"


def write_comparison_report(summary_path: str | Path) -> Path:
    """Write comparison_report.html (and plots/comparison.png) beside `summary_path`; returns its path."""
    summary_path = Path(summary_path)
    summary = _read(summary_path, COMPARISON_FORMAT)
    folder, models = summary_path.parent, summary.get("models") or {}
    plot = ""
    if models:
        path = plot_comparison(summary, folder / "plots" / "comparison.png")
        plot = figure(path, f"perplexity against MB on disk for {', '.join(models)}; perplexity increase and "
                            "compression of each mixed model", "plots/comparison.png")
    sections = [section("models", "Models", _models_table(models) + plot,
                        "each model on its own held-out windows, at the same budget and options")]
    if models:
        sections.append(section("baselines", "Uniform baselines", _baselines_table(models)))
    analyses = load_analyses(folder)
    if analyses:
        sections.append(section("analyses", "Sensitivity per model", "".join(_analysis(n, a) for n, a in analyses.items())))
    sections.append(section("config", "Configuration", details("the shared run config (comparison_summary.json → config)",
                                                               pre(json.dumps(summary.get("config", {}), indent=2)))))
    header = f"<header><h1>mixbits comparison: {len(models)} models</h1></header>"
    path = folder / REPORT_NAME
    atomic_write_text(path, page(f"mixbits comparison: {', '.join(models)}", header, sections, NAV))
    log.info("wrote %s", path)
    return path
