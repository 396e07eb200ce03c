"""One self-contained HTML page per run: `write_report(run_dir)` -> `<run_dir>/report.html`.

The page reads the run's JSON files (`run_files.load_run`) and computes no new measurement.
Every plot is drawn into `<run_dir>/plots/*.png` (files for people) and embedded in the page as
a base64 `data:` URI, the style is inline, and a Content-Security-Policy forbids loading
anything else, so the file can be mailed or archived alone and opens offline. All text from
the files is HTML-escaped.

A tiny inline script counts, on window load, the images that decoded (complete, naturalWidth
> 0) and writes `data-images-loaded` / `data-images-total` on <body>: `report.browser` reads
them from headless Chromium to prove every plot renders.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mixbits.io import atomic_write_text
from mixbits.report import html_optional as optional
from mixbits.report import html_sections as core
from mixbits.report.html_parts import esc
from mixbits.report.plot_set import make_plots
from mixbits.report.run_files import load_run

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;margin:0 auto;
 max-width:1200px;padding:0 24px 48px;background:#fff}
header{border-bottom:2px solid #d0d7de;margin-bottom:8px}
h1{font-size:26px;margin:24px 0 8px}h2{font-size:20px;margin:32px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:16px;margin:20px 0 6px}
dl.facts{display:flex;flex-wrap:wrap;gap:4px 28px;margin:8px 0 16px}dl.facts div{display:flex;gap:6px}
dt{color:#57606a}dd{margin:0;font-weight:600}
nav{font-size:14px;margin:8px 0}nav a{margin-right:14px;color:#0969da;text-decoration:none}
div.wide{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:8px 0 12px;font-size:13.5px}
th,td{border-bottom:1px solid #e1e4e8;padding:4px 10px;text-align:left;vertical-align:top}
thead th{background:#f6f8fa;border-bottom:2px solid #d0d7de}
td:first-child{white-space:nowrap}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.kv th{color:#57606a;font-weight:normal;white-space:nowrap}
caption{caption-side:top;text-align:left;color:#57606a;font-size:13px;padding:2px 0}
figure{margin:12px 0 20px}figure img{max-width:100%;height:auto;border:1px solid #e1e4e8}
figcaption{color:#57606a;font-size:13px}
.note{color:#57606a;font-size:13px;margin:2px 0 8px}.warn{color:#b35900}
table.hist td:last-child{width:320px;text-align:left}span.bar{display:inline-block;height:12px;background:#4c8eda}
details{margin:6px 0}pre{background:#f6f8fa;padding:12px;overflow:auto;font-size:12.5px}
footer{margin-top:40px;color:#57606a;font-size:12px}
"""

# Counts the images that decoded; read back by report.browser from the dumped DOM.
SCRIPT = """window.addEventListener("load",function(){var a=document.images,n=0;
for(var i=0;i<a.length;i++){if(a[i].complete&&a[i].naturalWidth>0){n++;}}
document.body.dataset.imagesLoaded=String(n);document.body.dataset.imagesTotal=String(a.length);});"""

NAV = (("summary", "Summary"), ("budget", "Budget"), ("sensitivity", "Sensitivity"), ("plan", "Plan"),
       ("training", "Training"), ("zeroshot", "Zero-shot"), ("iterative", "Iterative"), ("timings", "Timings"),
       ("config", "Configuration"))


def page(title: str, header: str, sections: list[str], nav: tuple[tuple[str, str], ...] = NAV) -> str:
    """The whole HTML document: `header`, links to the sections present, the sections."""
    links = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in nav if any(f'id="{a}"' in s for s in sections))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head>"
            f"<body>{header}<nav>{links}</nav>{''.join(sections)}"
            f"<footer>written by mixbits report from the run's JSON files; no measurement is computed here"
            f"</footer></body></html>")


def write_report(run_dir: str | Path, *, plots_dir: str | Path | None = None) -> Path:
    """Write `<run_dir>/report.html` (and `<run_dir>/plots/*.png`); returns the page's path."""
    run = load_run(run_dir)
    plots = make_plots(run, plots_dir)
    sections = [
        core.summary(run, plots), core.budget(run), core.sensitive_layers(run, plots), core.plan_histogram(run),
        optional.training(run, plots), optional.zeroshot(run, plots), optional.iterative(run, plots),
        core.timings(run), core.configuration(run),
    ]
    sections = [s for s in sections if s]
    html = page(f"mixbits report: {run.model_name}", core.header(run), sections)
    path = run.path / REPORT_NAME
    atomic_write_text(path, html)
    log.info("wrote %s (%d plots, %d sections)", path, len(plots.plots), len(sections))
    return path
