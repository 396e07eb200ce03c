"""The sections every run report has: header, summary of the variants, budget and solver, the
most sensitive linears, the plan's histogram, stage timings and the full configuration.

Each function takes the run's files (and the plots drawn for it) and returns HTML, or "" when
the run lacks the section's data. They format what the files hold; the only arithmetic is for
display (differences to the original, shares of a total, bytes in MB).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from mixbits.quant.spec import QuantSpec
from mixbits.report.html_parts import (
    DASH, details, esc, figure, fixed, key_values, mb, num, pct, pre, sci, section, table, yes_no,
)
from mixbits.report.plot_set import PlotSet
from mixbits.report.run_files import RunFiles, layer_scores
from mixbits.report.run_plots import budget_lines

TOP_LAYERS = 15


def plot_html(plots: PlotSet, key: str) -> str:
    """The embedded plot `key`, a note when it failed to draw, "" when there is none."""
    if key in plots.plots:
        p = plots.plots[key]
        return figure(p.path, p.alt, f"{p.title} (plots/{p.path.name})")
    if key in plots.failed:
        return f'<p class="warn">plot {esc(key)} could not be drawn: {esc(plots.failed[key])}</p>'
    return ""


def header(run: RunFiles) -> str:
    r, env = run.results, run.results.get("environment", {})
    cfg = r.get("config", {})
    facts = [("target", esc(r.get("budget", {}).get("target", DASH))), ("quantizer", esc(cfg.get("quantizer", DASH)))]
    for key in ("date", "started", "finished"):
        if env.get(key) or r.get(key):
            facts.append((key, esc(env.get(key) or r.get(key))))
    data = r.get("data", {})
    if data:
        test = data.get("test", {})
        facts.append(("held-out text", esc(f"{data.get('dataset', '?')}: {test.get('windows', '?')} windows × "
                                          f"{test.get('seqlen', '?')} tokens ({test.get('split', 'test')} split)")))
    versions = ", ".join(f"{k} {env[k]}" for k in ("mixbits", "torch", "transformers", "python") if env.get(k))
    facts.append(("versions", esc(versions or DASH)))
    facts.append(("device", esc(f"{env.get('device', '?')}, {env.get('threads', '?')} threads")))
    facts.append(("run folder", esc(run.path)))
    items = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)
    return f"<header><h1>mixbits report: {esc(run.model_name)}</h1><dl class=facts>{items}</dl></header>"


def _delta(m: Mapping, original: Mapping | None) -> str:
    if original is None or m is original or m.get("ppl") is None or not original.get("ppl"):
        return DASH
    diff = m["ppl"] - original["ppl"]
    return f"{diff:+.2f} ({pct(diff / original['ppl'], 1, signed=True)})"


def summary(run: RunFiles, plots: PlotSet) -> str:
    models = run.results.get("models") or {}
    if not models:
        return ""
    original = models.get("original")
    rows = []
    for name, m in models.items():
        label = f"<b>{esc(name)}</b>" if name == "mixed" else esc(name)
        rows.append([
            label, fixed(m.get("ppl"), 2), _delta(m, original),
            DASH if name == "original" else fixed(m.get("kl"), 4),
            DASH if name == "original" else pct(m.get("top1")),
            fixed(m.get("bpw"), 3), mb(m.get("linear_bytes")), mb(m.get("bytes_on_disk")),
            yes_no(m.get("fits_budget")), sci(m.get("predicted_damage")),
        ])
    headers = ["model", "perplexity", "Δ ppl vs original", "KL (nats/token)", "top-1 agreement", "bpw",
               "linear MB", "MB on disk", "fits budget", "predicted damage"]
    note = run.results.get("evaluation", {}).get("convention")
    return section("summary", "Summary", table(headers, rows) + plot_html(plots, "quality_vs_size"), note)


def budget(run: RunFiles) -> str:
    b = run.results.get("budget")
    if not b:
        return ""
    bpw, size = budget_lines(run.results)
    solver = b.get("solver") or {}
    pairs = [("target", esc(b.get("target", DASH))),
             ("budget", f"{fixed(b.get('bits'), 0)} stored bits = {fixed(bpw, 3)} bpw = {fixed(size, 1)} MB of tensors"),
             ("plan from", esc(b.get("plan_source", DASH)))]
    if solver:
        pairs += [("solver", esc(solver.get("method", DASH))), ("optimal", yes_no(solver.get("optimal"))),
                  ("bits used", fixed(solver.get("cost_bits"), 0)),
                  ("predicted damage", sci(solver.get("predicted_damage")))]
    method = (run.layers or {}).get("sensitivity_method") or (run.sensitivity or {}).get("method")
    pairs.append(("sensitivity", esc(method or "none (the plan was given)")))
    rule = (run.sensitivity or {}).get("meta", {}).get("damage_rule")
    if rule:
        pairs.append(("damage rule", esc(rule)))
    cal = run.results.get("data", {}).get("calibration")
    if cal:
        pairs.append(("calibration", esc(f"{cal.get('windows', '?')} windows × {cal.get('seqlen', '?')} tokens, "
                                         f"seed {cal.get('seed', '?')}")))
    return section("budget", "Budget and solver", key_values(pairs))


def primary_score(keys: list[str], method: str | None) -> str | None:
    """The score that ranks linears: the first named after the sensitivity method, else the first."""
    return next((k for k in keys if method and k.startswith(method)), keys[0] if keys else None)


def sensitive_layers(run: RunFiles, plots: PlotSet) -> str:
    rows, scores = layer_scores(run)
    figures = plot_html(plots, "sensitivity") + plot_html(plots, "allocation")
    if not rows or not scores:
        return section("sensitivity", "Sensitivity and plan", figures) if figures else ""
    key = primary_score(list(scores), (run.layers or {}).get("sensitivity_method"))
    values = scores[key]
    order = sorted(range(len(rows)), key=lambda i: (math.isnan(values[i]), -values[i]))  # NaN last
    plan = run.plan_layers
    body = []
    for rank, i in enumerate(order[:TOP_LAYERS], 1):
        row = rows[i]
        shape = "×".join(map(str, row.get("shape") or [])) or DASH
        body.append([str(rank), esc(row["name"]), num(row.get("block")), esc(shape)]
                    + [num(scores[k][i]) for k in scores]
                    + [esc(plan.get(row["name"], row.get("spec", "fp16"))), sci(row.get("predicted_damage"))])
    headers = ["rank", "linear", "block", "shape (out×in)", *scores, "plan", "predicted damage"]
    top = table(headers, body, numeric_from=2, caption=f"the {TOP_LAYERS} most sensitive linears by {key}")
    return section("sensitivity", "Sensitivity and plan", figures + "<h3>Most sensitive linears</h3>" + top)


def _spec_order(label: str) -> tuple[int, int]:
    try:
        s = QuantSpec.parse(label)
    except ValueError:
        return (99, 0)
    return (s.bits, s.group_size or 0)


def plan_histogram(run: RunFiles) -> str:
    plan = run.plan_layers
    counts = (run.results.get("models", {}).get("mixed") or {}).get("plan") or {}
    if not counts and plan:
        for label in plan.values():
            counts[label] = counts.get(label, 0) + 1
    if not counts:
        return ""
    params = {r["name"]: r.get("params") or 0 for r in (run.layers or {}).get("layers", [])}
    total_layers, total_params = sum(counts.values()), sum(params.values())
    weights: dict[str, int] = {}
    for name, label in plan.items():
        weights[label] = weights.get(label, 0) + params.get(name, 0)
    body = []
    for label in sorted(counts, key=_spec_order):
        share = counts[label] / total_layers
        bar = f'<span class="bar" style="width:{100 * share:.1f}%"></span>'
        w = pct(weights[label] / total_params) if total_params and label in weights else DASH
        body.append([esc(label), str(counts[label]), pct(share), w, bar])
    head = ["config", "linears", "share of linears", "share of weights", ""]
    return section("plan", "Plan histogram", table(head, body, cls="hist"),
                   "configs of the mixed plan; linears the plan does not name stay in 16 bit (fp16)")


def timings(run: RunFiles) -> str:
    t = run.results.get("timings_s") or {}
    if not t:
        return ""
    total = sum(v for v in t.values() if isinstance(v, (int, float)))
    rows = [[esc(k), num(v), pct(v / total) if total else DASH] for k, v in t.items()]
    rows.append(["<b>total</b>", f"<b>{num(total)}</b>", ""])
    return section("timings", "Stage timings", table(["stage", "seconds", "share"], rows))


def configuration(run: RunFiles) -> str:
    cfg = run.results.get("config")
    if cfg is None:
        return ""
    return section("config", "Configuration", details("the full RunConfig of this run (results.json → config)",
                                                      pre(json.dumps(cfg, indent=2))))
