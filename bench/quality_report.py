"""Tables and plot of the quality benchmark, from quality.json alone (computes nothing new).

One markdown table per held-out domain, rows sorted by the bytes of the quantized block linears.
Every row that is not one of mixbits' optimal arms (`quality_rows.MIXBITS_BEST`) gets a verdict:
the lowest perplexity of any mixbits optimal row whose layers take at most as many bytes (0.1 %
more counts as equal: plans solved for one budget land that close to it) and at least 90 % of
them, so that it is a comparison at equal size, and whether that is lower ("mixbits ahead") or
not ("peer ahead"); a row with no such mixbits row says so. The plot shows perplexity and KL
against MB of the quantized layers, one marker set per arm, log y, one row of panels per domain.
"build s" is the seconds the row took to build in the run that measured it (a file reused from an
earlier run counts only its loading); bench/end_to_end.py measures what each tool's job costs.
"""

from __future__ import annotations

from pathlib import Path

import quality_gguf_report
from quality_rows import MIXBITS_BEST

SUMMARY_ARMS = ("uniform-rtn", "llamacpp", "llamacpp-imatrix", "gptqmodel", "torchao")
HEADLINE_ARMS = SUMMARY_ARMS + ("heuristics",)
ARM_ORDER = ("optimal-rtn", "optimal-clip", "optimal-gptq", "optimal-gptq-rtn-damage", "blockap", "blockap-clip",
             "blockap-gptq", "optimal-matched",
             "optimal-matched-g32", "mixbits-gguf", "uniform-rtn", "heuristics", "llamacpp", "llamacpp-imatrix", "gptqmodel", "torchao",
             "reference")
STYLE = {  # arm -> (marker, line): mixbits' optimal arms as lines, peers as markers
    "optimal-rtn": ("o", "-"), "optimal-clip": ("o", "-"), "optimal-gptq": ("o", "-"),
    "optimal-gptq-rtn-damage": ("o", ":"), "blockap": ("*", "-"),
    "blockap-clip": ("*", "-"), "blockap-gptq": ("*", "-"),
    "optimal-matched": (".", ""), "optimal-matched-g32": ("1", ""), "mixbits-gguf": ("h", "-"), "uniform-rtn": ("s", ":"), "heuristics": ("x", ""),
    "llamacpp": ("v", "--"),
    "llamacpp-imatrix": ("^", "--"), "gptqmodel": ("D", "--"), "torchao": ("P", ""), "reference": ("|", ""),
}


WINDOW = 0.9
TIE = 1.001  # plans solved for the same budget land within 0.1 % of it: count them as the same size
PLOT_MAX_BPW = 6.5  # larger rows (8-bit, fp16 tiers, the F16 reference) are in the tables only
NONE = f"no mixbits optimal row within {100 * (1 - WINDOW):.0f} % below this size"


def _ok(rows: dict) -> list[dict]:
    return [r for r in rows.values() if r["status"] == "ok"]


def rtn_weights(row: dict) -> bool:
    """A mixbits row whose weights are rounded to nearest (no calibration data touches them; the
    allocation still comes from the Fisher table measured on calibration windows)."""
    return row["arm"] == "optimal-rtn" or (row["arm"] == "optimal-matched" and row["label"].endswith(" rtn"))


def best_mixbits(row: dict, rows: list[dict], domain: str, rtn_only: bool = False) -> dict | None:
    """The mixbits optimal row of lowest perplexity among those of at most this row's bytes (0.1 %
    more counts as the same size) and at least WINDOW of them: a comparison at equal size.
    `rtn_only`: among the rows with round-to-nearest weights only."""
    mine = [r for r in rows if r["arm"] in MIXBITS_BEST and domain in r["domains"] and (not rtn_only or rtn_weights(r))
            and WINDOW * row["linear_bytes"] <= r["linear_bytes"] <= TIE * row["linear_bytes"]]
    return min(mine, key=lambda r: r["domains"][domain]["ppl"]) if mine else None


def verdict(row: dict, rows: list[dict], domain: str) -> str:
    if row["arm"] in MIXBITS_BEST or row["arm"] == "reference" or row["status"] != "ok":
        return "–"
    best = best_mixbits(row, rows, domain)
    if best is None:
        return NONE
    ppl = best["domains"][domain]["ppl"]
    where = f"{ppl:.2f} ({best['arm']} {best['label']}, {best['linear_bytes'] / 1e6:.2f} MB)"
    return f"mixbits ahead: {where}" if ppl < row["domains"][domain]["ppl"] else f"**peer ahead**: mixbits {where}"


def budget_table(data: dict) -> str:
    """mixbits' optimal arms at their budgets: perplexity per domain."""
    rows = [r for r in _ok(data["rows"]) if r["arm"] in MIXBITS_BEST and "budget_bpw" in r["settings"]
            and not r["arm"].startswith("optimal-matched")]
    arms = [a for a in ARM_ORDER if any(r["arm"] == a for r in rows)]
    budgets = sorted({r["settings"]["budget_bpw"] for r in rows})
    domains = list(data["meta"]["original"])
    lines = [f"| budget (bpw) | {' | '.join(arms)} |", "|---:|" + "---:|" * len(arms)]
    for b in budgets:
        cells = []
        for arm in arms:
            hit = [r for r in rows if r["arm"] == arm and r["settings"]["budget_bpw"] == b]
            cells.append(" / ".join(f"{hit[0]['domains'][d]['ppl']:.2f}" for d in domains) if hit else "–")
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pair(row: dict, rows: list[dict], domain: str) -> str:
    mine, theirs = best_mixbits(row, rows, domain), row["domains"][domain]["ppl"]
    rtn = best_mixbits(row, rows, domain, rtn_only=True)
    rtn_cell = f"{rtn['domains'][domain]['ppl']:.2f}" if rtn else "–"
    if mine is None:
        return f"{theirs:.2f} | – | {rtn_cell}"
    ours = mine["domains"][domain]["ppl"]
    a, b = f"{theirs:.2f}", f"{ours:.2f} ({mine['arm'].removeprefix('optimal-')} {mine['label']})"
    return (f"**{a}** | {b}" if theirs <= ours else f"{a} | **{b}**") + f" | {rtn_cell}"


def peer_table(data: dict) -> str:
    """Each other tool's row beside the best mixbits optimal row of the same size and the best one
    with round-to-nearest weights, on every domain."""
    rows = _ok(data["rows"])
    peers = sorted((r for r in rows if r["arm"] in SUMMARY_ARMS), key=lambda r: (SUMMARY_ARMS.index(r["arm"]), r["bpw"]))
    domains = list(data["meta"]["original"])
    head = " | ".join(f"{d}: tool | {d}: mixbits | {d}: mixbits RTN" for d in domains)
    lines = [f"| tool | row | bpw | {head} |", "|---|---|---:|" + "---:|---|---:|" * len(domains)]
    for r in peers:
        lines.append(f"| {r['arm']} | {r['label']} | {r['bpw']:.3f} | "
                     + " | ".join(_pair(r, rows, d) for d in domains) + " |")
    return "\n".join(lines)


def headline(data: dict) -> str:
    """Per tool and domain: of its rows that have a mixbits row of the same size, how many mixbits
    beats (best mixbits row; mixbits with round-to-nearest weights) and how many beat mixbits."""
    rows = _ok(data["rows"])
    domains = list(data["meta"]["original"])
    lines = ["| tool | domain | rows compared | mixbits ahead | peer ahead | mixbits RTN ahead |", "|---|---|---:|---:|---:|---:|"]
    for arm in [a for a in HEADLINE_ARMS if any(r["arm"] == a for r in rows)]:
        for d in domains:
            theirs = [r for r in rows if r["arm"] == arm and d in r["domains"]]
            pairs = [(r, best_mixbits(r, rows, d), best_mixbits(r, rows, d, rtn_only=True)) for r in theirs]
            pairs = [p for p in pairs if p[1] is not None]
            ahead = sum(m["domains"][d]["ppl"] < r["domains"][d]["ppl"] for r, m, _ in pairs)
            rtn = sum(q is not None and q["domains"][d]["ppl"] < r["domains"][d]["ppl"] for r, _, q in pairs)
            lines.append(f"| {arm} | {d} | {len(pairs)} | {ahead} | {len(pairs) - ahead} | {rtn} |")
    return "\n".join(lines)


def _cell(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def domain_table(data: dict, domain: str) -> str:
    rows = list(data["rows"].values())
    ok = sorted((r for r in rows if r["status"] == "ok" and domain in r["domains"]), key=lambda r: r["linear_bytes"])
    lines = ["| arm | row | MB | bpw | perplexity | KL | top-1 | build s | best mixbits optimal at 90–100 % of this size |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in ok:
        d = r["domains"][domain]
        lines.append(f"| {r['arm']} | {r['label']} | {r['linear_bytes'] / 1e6:.2f} | {r['bpw']:.3f} | {d['ppl']:.2f} "
                     f"| {_cell(d['kl'], '.4f')} | {_cell(d['top1'] and 100 * d['top1'], '.1f')} % "
                     f"| {r['seconds']:.0f} | {verdict(r, ok, domain)} |")
    return "\n".join(lines)


def tally(data: dict, domain: str) -> dict:
    ok = [r for r in _ok(data["rows"]) if domain in r["domains"]]
    verdicts = [verdict(r, ok, domain) for r in ok]
    return {"mixbits ahead": sum(v.startswith("mixbits") for v in verdicts),
            "peer ahead": sum(v.startswith("**peer") for v in verdicts),
            "no mixbits optimal row of the same size": sum(v == NONE for v in verdicts)}


def not_run_table(data: dict) -> str:
    rows = [r for r in data["rows"].values() if r["status"] != "ok"]
    if not rows:
        return "Every row ran."
    return "\n".join(["| arm | row | status |", "|---|---|---|"] +
                     [f"| {r['arm']} | {r['label']} | {r['status'].replace('|', '/')} |" for r in rows])


def header(data: dict) -> str:
    m = data["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    windows = ", ".join(f"`{d}` {w['windows']} x {w['seqlen']}" for d, w in m["windows"].items())
    return (f"`{m['model']}`; held-out test windows {windows} (mixbits' token ids, the same for every row); "
            f"calibration {m['calibration']}. {m['date']}, {m['machine']}; {versions}.\n\n"
            + "\n".join(f"`{c}`" + "  " * (i < len(m.get("commands", [])) - 1)
                        for i, c in enumerate(m.get("commands") or [m["command"]])))


def markdown(data: dict) -> str:
    originals = ", ".join(f"`{d}` {r['ppl']:.2f}" for d, r in data["meta"].get("original", {}).items())
    parts = ["# Quality at equal size", "", header(data), "", f"Original perplexity: {originals}.", "",
             "## mixbits at each budget (perplexity, " + " / ".join(data["meta"].get("original", {})) + ")", "",
             budget_table(data), "", "## Where mixbits is ahead at equal size", "", headline(data), "",
             "## Each tool beside mixbits at the same size (perplexity; the lower of tool and best mixbits in bold)",
             "", "`mixbits`: the best mixbits optimal row at 90-100 % of the tool's bytes (quantizer in brackets); "
             "`mixbits RTN`: the best of those whose weights are rounded to nearest.", "", peer_table(data), ""]
    gguf = quality_gguf_report.section(data)
    if gguf:
        parts += ["## GGUF files at equal size", "", gguf, ""]
    for domain, ref in data["meta"].get("original", {}).items():
        counts = ", ".join(f"{k}: {v}" for k, v in tally(data, domain).items())
        parts += [f"## Every row on `{domain}` (original perplexity {ref['ppl']:.2f})", "", f"Rows compared: {counts}.",
                  "", "<details><summary>table</summary>", "", domain_table(data, domain), "", "</details>", ""]
    parts += ["## Rows that did not run", "", not_run_table(data), ""]
    if data["meta"].get("notes"):
        parts += ["## Notes", ""] + [f"- {k}: {v}" for k, v in data["meta"]["notes"].items()] + [""]
    return "\n".join(parts)


def plot(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(data["meta"].get("original", {}))
    fig, axes = plt.subplots(len(domains), 2, figsize=(13, 4.6 * len(domains)), squeeze=False)
    rows = [r for r in _ok(data["rows"]) if r["bpw"] <= PLOT_MAX_BPW]
    for i, domain in enumerate(domains):
        original = data["meta"]["original"][domain]["ppl"]
        for j, (metric, top) in enumerate((("ppl", 20 * original), ("kl", 4.0))):
            ax = axes[i][j]
            for arm in [a for a in ARM_ORDER if any(r["arm"] == a for r in rows)]:
                pts = sorted((r["linear_bytes"] / 1e6, r["domains"][domain][metric]) for r in rows
                             if r["arm"] == arm and domain in r["domains"] and r["domains"][domain][metric])
                marker, line = STYLE.get(arm, ("o", ""))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=line or "none", label=arm)
            if metric == "ppl":
                ax.axhline(original, color="grey", linewidth=0.8, label="original")
            ax.set_yscale("log")
            ax.set_ylim(top=top)
            ax.set_xlabel(f"MB of the quantized block linears (rows up to {PLOT_MAX_BPW:g} bpw)")
            ax.set_ylabel("perplexity" if metric == "ppl" else "KL to the original (nats/token)")
            ax.set_title(f"{domain}: {'perplexity' if metric == 'ppl' else 'KL'} (points above the top: see the table)")
            ax.grid(True, which="both", alpha=0.3)
        axes[i][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
