"""The report sections a run has only with some options: zero-shot tasks (`--tasks`), the
iterative path (`--iterative`) and Block-AP / E2E-QP training (`--qat`). Each returns "" when
the run lacks its data, so a plain run's report shows none of their headings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from mixbits.report.html_parts import DASH, details, esc, fixed, key_values, num, pct, sci, section, table, yes_no
from mixbits.report.html_sections import plot_html
from mixbits.report.plot_set import PlotSet, trained_blocks
from mixbits.report.run_files import RunFiles


def _acc(scores: Mapping | None, key: str) -> str:
    if not scores or scores.get(key) is None:
        return DASH
    err = scores.get(f"{key}_stderr")
    return pct(scores[key]) + ("" if err is None else f" ± {pct(err)}")


def zeroshot(run: RunFiles, plots: PlotSet) -> str:
    z = run.zeroshot
    if not z or not z.get("tasks"):
        return ""
    tasks = z["tasks"]
    models = list(dict.fromkeys(m for t in tasks.values() for m in t.get("models", {})))
    rows = []
    for name, t in tasks.items():
        scores = t.get("models", {})
        row = [esc(name), num(t.get("docs")), pct(t.get("chance"))]
        row += [_acc(scores.get(m), "acc") for m in models] + [_acc(scores.get(m), "acc_norm") for m in models]
        a, b = scores.get("original", {}).get("acc"), scores.get("mixed", {}).get("acc")
        row.append(pct(b - a, 1, signed=True) if a is not None and b is not None else DASH)
        rows.append(row)
    headers = ["task", "documents", "chance", *(f"acc {m}" for m in models), *(f"acc_norm {m}" for m in models),
               "Δ acc (mixed − original)"]
    limit = "all" if z.get("limit") is None else z["limit"]
    note = (f"lm-eval {z.get('lm_eval', '?')}, {z.get('num_fewshot', 0)}-shot, {limit} documents per task, "
            f"seed {z.get('seed', '?')}; ± one standard error")
    sources = {name: t["source"] for name, t in tasks.items() if t.get("source")}
    extra = details("task sources", key_values((k, esc(v)) for k, v in sources.items())) if sources else ""
    return section("zeroshot", "Zero-shot tasks", table(headers, rows) + extra + plot_html(plots, "zeroshot"), note)


def _units_cell(units: list[str]) -> str:
    if len(units) <= 2:
        return esc(", ".join(units))
    return details(f"{len(units)} linears", esc(", ".join(units)))


def iterative(run: RunFiles, plots: PlotSet) -> str:
    it = run.results.get("iterative")
    if not it:
        return ""
    val, final = it.get("validation") or {}, it.get("final") or {}
    pairs = [("target config", esc(it.get("spec", DASH))), ("order", esc(it.get("order", DASH))),
             ("units per step", num(it.get("layers_per_iteration"))),
             ("limit", pct(it.get("max_ppl_increase"), 2, signed=True) + " validation perplexity"),
             ("max steps", num(it.get("max_iterations"))),
             ("validation", esc(f"{val.get('windows', '?')} windows × {val.get('seqlen', '?')} tokens")),
             ("original validation ppl", fixed(it.get("original_ppl"), 3)), ("stopped", esc(it.get("stopped", DASH))),
             ("final", f"{num(final.get('quantized_units'))} linears quantized, {fixed(final.get('bpw'), 3)} bpw, "
                       f"ppl {fixed(final.get('ppl'), 3)}")]
    rows = [[num(s.get("step")), _units_cell(list(s.get("units") or [])), num(s.get("quantized_units")),
             fixed(s.get("bpw"), 3), fixed(s.get("ppl"), 3), pct(s.get("increase"), 2, signed=True),
             "kept" if s.get("accepted") else '<span class="warn">rolled back</span>'] for s in it.get("steps", [])]
    steps = table(["step", "linears moved", "quantized linears", "bpw", "validation ppl", "increase", ""], rows,
                  numeric_from=2)
    return section("iterative", "Iterative path", key_values(pairs) + plot_html(plots, "iterative") + steps)


def _bits(bits: Mapping[str, str] | None) -> str:
    counts = Counter((bits or {}).values())
    return esc(", ".join(f"{n}×{label}" for label, n in sorted(counts.items()))) or DASH


def _training_facts(t: Mapping) -> list[tuple[str, str]]:
    pairs = [("start (init)", esc(t.get("init", DASH))), ("schedule", esc(t.get("schedule", DASH))),
             ("seconds", fixed(t.get("seconds"), 1))]
    for key in ("resumed_blocks", "fallback_blocks", "kept_start_blocks"):
        if key in t:
            pairs.append((key.replace("_", " "), esc(", ".join(map(str, t[key])) or "none")))
    e2e = t.get("e2e")
    if e2e:
        pairs.append(("E2E-QP", f"loss {num(e2e.get('loss_start'), 6)} → {num(e2e.get('loss_end'), 6)}, "
                                f"kept epoch {num(e2e.get('best_epoch'))}, {num(e2e.get('steps'))} steps, "
                                f"fell back: {yes_no(e2e.get('fallback'))}, {fixed(e2e.get('seconds'), 1)} s"))
    return pairs


def training(run: RunFiles, plots: PlotSet) -> str:
    blocks, _ = trained_blocks(run)
    runs = run.results.get("training") or {}
    if not blocks and not runs:
        return ""
    facts = "".join(f"<h3>{esc(name)}</h3>" + key_values(_training_facts(t)) for name, t in runs.items())
    rows = [[num(b.get("index")), fixed(b.get("sensitivity"), 3), _bits(b.get("bits")), num(b.get("epochs")),
             num(b.get("epochs_run")), num(b.get("best_epoch")), sci(b.get("quant_lr")), num(b.get("patience")),
             sci(b.get("loss_start"), 4), sci(b.get("loss_end"), 4), fixed(b.get("ratio"), 3), yes_no(b.get("fallback")),
             fixed(b.get("seconds"), 1)] for b in blocks]
    headers = ["block", "sensitivity", "bits", "epochs", "epochs run", "kept epoch", "quant lr", "patience",
               "val loss start", "val loss kept", "kept ÷ start", "fell back", "seconds"]
    per_block = table(headers, rows, text=(2,), caption="Block-AP of the mixed plan, per block") if rows else ""
    return section("training", "Block-AP training", facts + plot_html(plots, "training") + per_block,
                   "validation loss: mean squared error of the block's output against the original's")
