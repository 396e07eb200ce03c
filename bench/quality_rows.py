"""Rows of the quality benchmark, where they are kept, and how pending rows are measured.

A `Row` is one quantized model of one arm (a tool with its settings at one size): `build()`
makes it and returns a `Built` (the model, the bytes of its quantized block linears, anything
worth recording). `measure` builds the pending rows a few at a time and scores each pass on
every domain's windows beside the original with `evaluate_models` (so the original's
distribution is computed once per window per pass), then writes every row of the pass into
`quality.json` atomically. A row whose status is "ok" is never measured again: a killed run
continues where it stopped. A row that cannot run here raises `NotRun`; it is recorded as
"not run: <reason>" (and retried on the next run, which costs nothing when the reason holds).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixbits.eval.perplexity import evaluate_models
from mixbits.io import atomic_write_json

log = logging.getLogger("quality")

MIXBITS_BEST = ("optimal-rtn", "optimal-clip", "optimal-gptq", "optimal-gptq-rtn-damage", "blockap", "blockap-clip", "blockap-gptq",
                "optimal-matched", "optimal-matched-g32", "mixbits-gguf")
"""Arms that are mixbits' answer; every other row is compared against the best of these."""


class NotRun(Exception):
    """This row cannot run on this machine; the message says exactly why."""


@dataclass
class Built:
    model: object  # an nn.Module or anything `evaluate_models` can call (LlamaCppLM)
    linear_bytes: int  # stored bytes of the block linears, the layers mixbits quantizes
    extra: dict = field(default_factory=dict)  # recorded with the row (types, plan counts, files)

    def close(self) -> None:
        if hasattr(self.model, "close"):
            self.model.close()


@dataclass
class Row:
    arm: str
    label: str
    settings: dict
    build: Callable[[], Built]

    @property
    def key(self) -> str:
        return f"{self.arm}/{self.label}"


class Store:
    """quality.json: meta (machine, versions, windows) and rows by key, rewritten atomically."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"meta": meta, "rows": {}}
        if path.is_file():
            import json

            old = json.loads(path.read_text())
            self._check_same_windows(old["meta"], meta)
            self.data["rows"] = old.get("rows", {})
            commands = old["meta"].get("commands") or [old["meta"]["command"]]
            commands += [meta["command"]] if meta["command"] not in commands else []
            self.data["meta"] = {**old["meta"], **meta, "original": old["meta"].get("original", {}), "commands": commands}

    @staticmethod
    def _check_same_windows(old: dict, new: dict) -> None:
        if old.get("windows") != new.get("windows"):
            raise ValueError(f"{old.get('windows')} in the existing results differ from this run's windows "
                             f"{new.get('windows')}; use another --out or the same --seqlen/--eval-windows/--model")

    def done(self, key: str) -> bool:
        return self.data["rows"].get(key, {}).get("status") == "ok"

    def put(self, key: str, row: dict) -> None:
        self.data["rows"][key] = row

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _record(row: Row, status: str, seconds: float, built: Built | None, n_weights: int) -> dict:
    out = {"arm": row.arm, "label": row.label, "settings": row.settings, "status": status,
           "seconds": round(seconds, 1), "linear_bytes": None, "bpw": None, "domains": {}}
    if built is not None:
        out |= {"linear_bytes": built.linear_bytes, "bpw": 8 * built.linear_bytes / n_weights, **built.extra}
    return out


def _build(row: Row, n_weights: int) -> tuple[dict, Built | None]:
    began = time.perf_counter()
    try:
        built = row.build()
    except NotRun as err:
        log.warning("%s not run: %s", row.key, err)
        return _record(row, f"not run: {err}", time.perf_counter() - began, None, n_weights), None
    except Exception as err:  # a peer tool failing must not stop the other rows; the trace is logged
        log.error("%s failed:\n%s", row.key, traceback.format_exc())
        return _record(row, f"failed: {type(err).__name__}: {err}", time.perf_counter() - began, None, n_weights), None
    return _record(row, "ok", time.perf_counter() - began, built, n_weights), built


def _score(store: Store, original, windows: dict[str, torch.Tensor], built: dict[str, Built],
           records: dict[str, dict], device) -> None:
    models = {"original": original} | {k: b.model for k, b in built.items()}
    for domain, w in windows.items():
        results = evaluate_models(models, w, device=device, reference="original", progress=False)
        store.data["meta"].setdefault("original", {})[domain] = results["original"].to_dict()
        for key in built:
            r = results[key]
            records[key]["domains"][domain] = {"ppl": r.ppl, "kl": r.kl, "top1": r.top1, "tokens": r.tokens}


def _score_pass(store, original, windows, built: dict[str, Built], records: dict[str, dict], device) -> None:
    """Score the pass together; if that fails, each model alone, so one bad model fails only its row."""
    if not built:
        return
    try:
        _score(store, original, windows, built, records, device)
        return
    except Exception:  # retried one by one below; the trace says which model broke the pass
        log.error("scoring the pass failed; scoring each model alone:\n%s", traceback.format_exc())
    for key, b in built.items():
        try:
            _score(store, original, windows, {key: b}, records, device)
        except Exception as err:  # recorded in the row, the other rows go on
            records[key]["status"] = f"failed while scoring: {type(err).__name__}: {err}"
            records[key]["domains"] = {}


def measure(rows: list[Row], store: Store, original, windows: dict[str, torch.Tensor], n_weights: int,
            device, per_pass: int = 3) -> None:
    """Build and score every row not yet "ok", `per_pass` models per evaluation pass."""
    pending = [r for r in rows if not store.done(r.key)]
    log.info("%d of %d rows to measure", len(pending), len(rows))
    while pending:
        records, built = {}, {}  # the previous pass's models are freed here, before new ones are built
        while pending and len(built) < per_pass:
            row = pending.pop(0)
            log.info("building %s", row.key)
            records[row.key], made = _build(row, n_weights)
            if made is not None:
                built[row.key] = made
            del made
        try:
            _score_pass(store, original, windows, built, records, device)
        finally:
            for b in built.values():
                b.close()
        for key, record in records.items():
            store.put(key, record)
        store.save()
        for key, record in records.items():
            ppl = {d: round(v["ppl"], 2) for d, v in record["domains"].items()}
            log.info("%s: %s %s", key, record["status"], ppl)
