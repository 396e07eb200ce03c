"""Markdown tables and the plot of bench/speed.py's results; reads the result dict, computes nothing
but formatting (the slopes are computed where they are measured)."""

from __future__ import annotations

from pathlib import Path


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def _threads(m: dict) -> str:
    omp = f", OMP_NUM_THREADS={m['omp_num_threads']}" if m.get("omp_num_threads") else ""
    wait = f", OMP_WAIT_POLICY={m['omp_wait_policy']}" if m.get("omp_wait_policy") else ""
    return f"{m['torch_threads']} torch thread(s){omp}{wait}"


def header(result: dict) -> str:
    m, s = result["machine"], result["main"]["subject"]
    cal = s["calibration"]
    load = result.get("load_average", {})
    lines = [
        f"`{s['name']}` ({s['params'] / 1e6:.1f} M parameters, {s['linears']} block linears), "
        f"{cal['windows']} x {cal['seqlen']} calibration tokens, {s['held_out']['windows']} held-out windows, "
        f"plan `{s['plan']}`, device {m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}",
        f"machine: {m['cpu']}, {m['cores']} cores, {_threads(m)}; load average "
        f"{load.get('start', ['?'])[0]:.2f} at start, {load.get('end', ['?'])[0]:.2f} at end",
        f"unit: one fwd+bwd over the calibration tokens, measured before, between the groups of stages and after "
        f"them ({', '.join(f'{r:.3g}' for r in result['main']['units'])} s); each ratio divides by the passes "
        f"around its stage",
        f"torch {m['torch']}, transformers {m['transformers']}, mixbits {m['mixbits']}, Python {m['python']}; "
        f"{m['date']}; peak RSS per stage by {m['rss_peak_method']}",
    ]
    return "\n".join(f"{line}  " for line in lines)


def stage_table(result: dict) -> str:
    rows = result["main"]["stages"]
    cuda = any(r.get("cuda_peak_mb") is not None for r in rows.values())
    cols = ["stage", "seconds", "× fwd+bwd", "unit s", "peak RSS MiB", "+ MiB over start"] + (["CUDA peak MiB"] if cuda else [])
    out = ["| " + " | ".join(cols + ["runs", "note"]) + " |",
           "|---|" + "---:|" * (len(cols) - 1) + "---:|---|"]
    for name, r in rows.items():
        cells = [name, f"{r['seconds']:.3g}", f"{r['ratio']:.3g}", f"{r['unit_s']:.3g}", _mb(r["peak_rss_mb"]),
                 _mb(r["peak_rss_mb"] - r["rss_start_mb"])]
        if cuda:
            cells.append(_mb(r.get("cuda_peak_mb")))
        note = r["note"]
        if "disk_mb" in r["extra"]:
            note = f"{r['extra']['disk_mb']:.1f} MiB written"
        out.append("| " + " | ".join(cells + [str(len(r["runs"])), note]) + " |")
    return "\n".join(out)


def scaling_table(scaling: dict, label: str) -> str:
    """Stages x sizes: seconds and (× that size's fwd+bwd); the log-log slope of seconds."""
    sizes = scaling["labels"]
    out = ["| stage | " + " | ".join(sizes) + f" | slope (log s / log {label}) |",
           "|---|" + "---:|" * (len(sizes) + 1)]
    for name, r in scaling["stages"].items():
        cells = [f"{s:.3g} s ({q:.2f}×)" if s is not None else "–" for s, q in zip(r["seconds"], r["ratio"])]
        slope = "–" if r["slope"] is None else f"{r['slope']:.2f}"
        out.append(f"| {name} | " + " | ".join(cells) + f" | {slope} |")
    return "\n".join(out)


def markdown(result: dict) -> str:
    parts = ["### Cost of every stage", "", header(result), "", stage_table(result)]
    tokens, width = result.get("scaling_tokens"), result.get("scaling_width")
    if tokens:
        parts += ["", "### Growth with calibration tokens", "",
                  f"`{result['main']['subject']['name']}`; seconds (× fwd+bwd over the same tokens)", "",
                  scaling_table(tokens, "tokens")]
    if width:
        parts += ["", "### Growth with model width", "", width["description"], "", scaling_table(width, "width")]
    return "\n".join(parts) + "\n"


def plot(result: dict, path: Path) -> Path:
    """Ratio per stage (bars, log scale) and seconds against tokens and width (log-log lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("scaling_tokens", "scaling_width") if result.get(k)]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(6 + 4.5 * len(panels), 6), squeeze=False)
    rows = result["main"]["stages"]
    names = list(rows)[::-1]
    ax = axes[0][0]
    ratios = [rows[n]["ratio"] for n in names]
    ax.barh(names, ratios, color="tab:blue")
    for i, r in enumerate(ratios):
        ax.annotate(f"{r:.2g}", (r, i), xytext=(2, 0), textcoords="offset points", va="center", fontsize=6)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds / one fwd+bwd over the calibration tokens")
    ax.set_title(f"{result['main']['subject']['name']}: cost of every stage", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    for ax, key in zip(axes[0][1:], panels):
        scaling = result[key]
        for name, r in scaling["stages"].items():
            pts = [(x, y) for x, y in zip(scaling["x"], r["seconds"]) if y]
            slope = "" if r["slope"] is None else f" (slope {r['slope']:.2f})"
            ax.plot(*zip(*pts), marker="o", label=name + slope)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(scaling["x"], [f"{x:g}" for x in scaling["x"]])
        ax.minorticks_off()
        ax.set_xlabel(scaling["x_label"])
        ax.set_ylabel("seconds")
        ax.set_title(scaling["title"], fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['machine']['cpu']}, {result['machine']['device']}, {result['machine']['date'][:10]}",
                 fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
