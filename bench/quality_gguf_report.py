"""The "GGUF files at equal size" section of quality.md: each `mixbits-gguf` row beside the
`llamacpp-imatrix` preset whose whole file bytes it was solved for (quality_gguf.py).

Unlike the other tables, which place rows by the bytes of the block linears, this one compares
**whole GGUF files**, as llama.cpp loads them: header, metadata with the tokenizer, token embedding
(and an untied head) in the type each file holds them in (F16 in both here), norms, and every block
linear in the type each tool chose. Both files are run by llama.cpp on the same token ids. "ahead"
compares perplexity and KL on every text: the tool lower on all of them, else which is lower where.
A mixbits file above the preset's bytes is flagged: it must never happen (the solver keeps the
plan at or below the target and the written bytes are checked against the prediction).
"""

from __future__ import annotations

ARM, PEER = "mixbits-gguf", "llamacpp-imatrix"
METRICS = (("ppl", "ppl", ".2f", 1.0), ("kl", "KL", ".4f", 1.0), ("top1", "top-1 %", ".1f", 100.0))


def _pair_cell(theirs: float | None, ours: float | None, fmt: str, scale: float, higher_better: bool) -> str:
    if theirs is None or ours is None:
        return "–"
    a, b = format(scale * theirs, fmt), format(scale * ours, fmt)
    if a == b:
        return f"{a} / {b}"
    mine_better = ours > theirs if higher_better else ours < theirs
    return f"{a} / **{b}**" if mine_better else f"**{a}** / {b}"


def ahead(peer: dict, mine: dict, domains: list[str]) -> str:
    """Who has the lower perplexity and KL: on every text, or where."""
    wins, losses = [], []
    for d in domains:
        for key, name in (("ppl", "ppl"), ("kl", "KL")):
            ours, theirs = mine["domains"][d][key], peer["domains"][d][key]
            (wins if ours < theirs else losses).append(f"{d} {name}")
    if mine["file_bytes"] > peer["file_bytes"]:
        return f"**mixbits file larger by {mine['file_bytes'] - peer['file_bytes']} bytes**"
    if not losses:
        return "mixbits (ppl and KL on every text)"
    if not wins:
        return "**llama.cpp** (ppl and KL on every text)"
    return f"split: mixbits on {', '.join(wins)}; **llama.cpp** on {', '.join(losses)}"


def _pairs(data: dict) -> list[tuple[str, dict | None, dict]]:
    rows = data["rows"]
    mine = sorted((r for r in rows.values() if r["arm"] == ARM),
                  key=lambda r: (rows.get(f"{PEER}/{r['label']}") or {}).get("file_bytes") or 0)
    return [(r["label"], rows.get(f"{PEER}/{r['label']}"), r) for r in mine]


def _types(kinds: dict | None) -> str:
    return ", ".join(f"{n} {t.lower()}" for t, n in sorted((kinds or {}).items(), key=lambda kv: -kv[1])) or "–"


def section(data: dict) -> str:
    """The section's text, or "" when no `mixbits-gguf` row was asked for."""
    pairs = _pairs(data)
    if not pairs:
        return ""
    domains = list(data["meta"].get("original", {}))
    quantizer = pairs[0][2]["settings"].get("quantizer", "?")
    head = " | ".join(f"{d}: {name}" for d in domains for _, name, _, _ in METRICS)
    lines = [f"| preset | llama.cpp file bytes | mixbits file bytes | {head} | ahead |",
             "|---|---:|---:|" + "---:|" * (len(domains) * len(METRICS)) + "---|"]
    compared, mixbits_all = 0, 0
    for label, peer, mine in pairs:
        peer_ok = peer is not None and peer["status"] == "ok"
        peer_bytes = f"{peer['file_bytes']:,}" if peer_ok else "–"
        if mine["status"] != "ok" or not peer_ok:
            why = mine["status"] if mine["status"] != "ok" else f"{PEER}/{label}: {(peer or {}).get('status', 'absent')}"
            empty = " | ".join("–" for _ in range(len(domains) * len(METRICS)))
            lines.append(f"| {label} | {peer_bytes} | – | {empty} | not compared: {why.replace('|', '/')} |")
            continue
        cells = []
        for d in domains:
            for key, _, fmt, scale in METRICS:
                cells.append(_pair_cell(peer["domains"][d][key], mine["domains"][d][key], fmt, scale, key == "top1"))
        verdict = ahead(peer, mine, domains)
        compared += 1
        mixbits_all += verdict.startswith("mixbits (")
        lines.append(f"| {label} | {peer_bytes} | {mine['file_bytes']:,} | {' | '.join(cells)} | {verdict} |")
    intro = ("Whole GGUF files as llama.cpp loads them (not only the block linears): the `llamacpp-imatrix` preset, "
             "and mixbits' plan over the GGUF types solved at that preset's file bytes (`mixbits-gguf`), both run by "
             "llama.cpp on the same token ids. Token embedding (tied or not, the output head) in F16 in both files; "
             f"every block linear in the type each tool chose. mixbits' quantizer: {quantizer}. "
             "Cells: llama.cpp / mixbits, the better in bold.")
    summary = (f"mixbits is lower in perplexity and KL on every text on {mixbits_all} of {compared} presets compared "
               f"(of {len(pairs)} asked).")
    types = ["| preset | llama.cpp: block-linear tensor types | mixbits: block-linear tensor types |", "|---|---|---|"]
    types += [f"| {label} | {_types((peer or {}).get('types'))} | {_types(mine.get('types'))} |"
              for label, peer, mine in pairs]
    return "\n".join([intro, "", "\n".join(lines), "", summary, "", "\n".join(types)])
