"""The stages bench/speed.py times, each through the library's own entry point, and the runner.

Every stage is a function (subject, results of earlier stages, peak meter) -> result, so a later
stage reuses what an earlier one built (allocation reads the Fisher table, evaluation and export
the RTN model). When the stage that makes an input was skipped, `Runner.prepare` computes that
input untimed first.

The unit of every ratio is one forward + backward pass over the calibration tokens
(`jobs.analyze.time_fwd_bwd`: loss gradients of every block linear's weight, window by
window). It is measured `repeats` times before the first stage (median kept: the first pass also
pages the weights in), once more whenever the kind of stage changes (sensitivity -> quantize ->
...), and once after the last. A stage's ratio divides by the mean of the unit measured just
before and just after its group, so a machine that gets busier or quieter during the run (other
jobs) shifts numerator and denominator together. Stages shorter than the unit are repeated too
(median kept); Block-AP and E2E-QP run once.
"""

from __future__ import annotations

import copy
import logging
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from _measure import Measurement, PeakMemory, measure
from _speed_subjects import Subject
from mixbits.allocate.budget import Budget
from mixbits.allocate.feasibility import check_budget
from mixbits.allocate.optimal import Constraints, allocate_optimal, unit_groups
from mixbits.eval.perplexity import evaluate_models
from mixbits.export.formats import FORMATS, export
from mixbits.model.arch import tied_groups
from mixbits.config import QUANTIZERS
from mixbits.model.quantize import quantize_model
from mixbits.model.arch import fixed_bytes_of
from mixbits.jobs.analyze import time_fwd_bwd
from mixbits.sensitivity.hessian import top_eigenvalues
from mixbits.sensitivity.methods import METHODS, compute_tables
from mixbits.config import TrainConfig
from mixbits.train.e2e_qp import E2EParams, train_step_sizes
from mixbits.train.run import train_model

log = logging.getLogger("speed")

REFERENCE = "fwd_bwd"
EIGEN = "hessian_top_eig"
ONCE = ("block_ap", "e2e_qp")  # long and stateful: never repeated
# the results later stages read (by allocate; evaluate, export, E2E-QP; E2E-QP); every other one is
# dropped at once, so what one stage built does not sit in the memory of the stages after it
KEPT = ("sensitivity.fisher", "quantize.rtn", "block_ap")
SCALING_DEFAULT = (REFERENCE, "sensitivity.fisher", "quantize.rtn", "quantize.gptq")


@dataclass(frozen=True)
class Options:
    """What the stages need besides the subject."""

    target_bpw: float = 3.25
    measure_config: str = "w3g128"  # the one config measured sensitivity methods run per layer
    eig_units: int = 4  # linears whose top Hessian eigenvalue is computed (the rest: trace only)
    eig_windows: int = 2
    train: TrainConfig = TrainConfig(epochs=1.0, e2e_epochs=1.0)
    val_windows: int = 2
    workdir: Path = Path("runs/speed/work")


def stage_names(methods: Sequence[str]) -> list[str]:
    """Every stage in run order (load is timed by the caller, since it makes the subject)."""
    sens = [f"sensitivity.{m}" for m in methods]
    return ["forward", REFERENCE, *sens, "allocate", *(f"quantize.{q}" for q in QUANTIZERS), "block_ap",
            "block_ap.per_block", "e2e_qp", "evaluate", *(f"export.{f}" for f in FORMATS)]


def method_names() -> list[str]:
    return [*METHODS, EIGEN]


# --- the stages -----------------------------------------------------------------------------

@torch.no_grad()
def forward(s: Subject, done: dict, peaks: PeakMemory, o: Options):
    for window in s.calib:
        s.model(input_ids=window.unsqueeze(0).to(s.device))


def fwd_bwd(s: Subject, done: dict, peaks: PeakMemory, o: Options):
    return time_fwd_bwd(s.model, s.calib, s.linears, device=s.device, sample=len(s.calib))


def sensitivity(method: str) -> Callable:
    def run(s: Subject, done: dict, peaks: PeakMemory, o: Options):
        if method == EIGEN:
            chosen = dict(list(s.linears.items())[: o.eig_units])
            return top_eigenvalues(s.model, s.calib[: o.eig_windows], chosen, device=s.device, progress=False)
        measured = [c for c in s.configs if c.label == o.measure_config]
        if METHODS[method].kind == "measured" and not measured:
            raise ValueError(f"--measure-config {o.measure_config} is not a candidate; use one of "
                             f"{[c.label for c in s.configs]}")
        return compute_tables([method], s.model, s.calib, s.linears, s.configs, granularity="layer",
                              device=s.device, progress=False, measure_configs=measured or None)[method]
    return run


def allocate(s: Subject, done: dict, peaks: PeakMemory, o: Options):
    table = done["sensitivity.fisher"]
    shapes = {n: (i.out_features, i.in_features) for n, i in s.linears.items()}
    groups = unit_groups(tuple(s.linears), tied_groups(s.model, s.linears), True)
    bits = check_budget(shapes, s.configs, groups, Constraints(), Budget(bpw=o.target_bpw),
                        fixed_bytes_of(s.model, shapes))
    return allocate_optimal(table, groups, bits, Constraints())


def quantize(quantizer: str) -> Callable:
    def run(s: Subject, done: dict, peaks: PeakMemory, o: Options):
        windows = None if quantizer == "rtn" else s.calib  # as the pipeline does: rtn needs no data
        return quantize_model(s.model, s.plan, quantizer=quantizer, windows=windows, device=s.device, progress=False)
    return run


def block_ap(s: Subject, done: dict, peaks: PeakMemory, o: Options):
    """train_model without E2E-QP; on_block_done marks each block's end time and peak RSS."""
    marks: list[tuple[float, float]] = []
    start = time.perf_counter()

    def mark(index: int) -> None:
        marks.append((time.perf_counter(), peaks.split()))

    val = s.held[: o.val_windows]
    model_q, report = train_model(s.model, s.plan, s.calib, val, o.train, device=s.device, progress=False,
                                  on_block_done=mark)
    times = np.diff([start] + [t for t, _ in marks]).tolist()
    return model_q, report, times, [p for _, p in marks]


def per_block(block: tuple, whole: Measurement) -> Measurement:
    """Block-AP per block: wall time between the ends of consecutive blocks (targets, training,
    the next block's inputs); block 0 also carries the RTN start and the capture, so it is left
    out of the mean when there are others."""
    _, report, times, block_peaks = block
    body = slice(1, None) if len(times) > 1 else slice(None)
    return Measurement(statistics.mean(times[body]), times[body], max(block_peaks[body]), whole.rss_start_mb,
                       whole.cuda_peak_mb, note="mean over blocks 1.. (block 0 holds the setup)",
                       extra={"block0_s": times[0], "training_steps_s": [b.seconds for b in report.blocks]})


def e2e_qp(s: Subject, done: dict, peaks: PeakMemory, o: Options):
    """E2E-QP (step sizes, codes frozen) on the Block-AP result (`Runner.prepare`: or a copy of RTN's)."""
    model_q, report = done["block_ap"][:2]
    cfg, specs = o.train, s.plan.quantized()
    hp = E2EParams(cfg.e2e_epochs, cfg.e2e_batch_size, {n: cfg.e2e_lr_of(sp.bits) for n, sp in specs.items()},
                   cfg.min_lr_factor, cfg.weight_decay, cfg.e2e_grad_clip, cfg.max_nonfinite)
    return train_step_sizes(model_q, specs, report.qparams, s.calib, s.held[: o.val_windows], hp, device=s.device,
                            generator=torch.Generator().manual_seed(0), progress=False)


def evaluate(s: Subject, done: dict, peaks: PeakMemory, o: Options):
    """Perplexity, KL and top-1 of the original and the RTN model on the held-out windows."""
    model_q, _ = done["quantize.rtn"]
    return evaluate_models({"original": s.model, "rtn": model_q}, s.held, device=s.device, reference="original",
                           progress=False)


def export_stage(fmt: str) -> Callable:
    counter = iter(range(10**6))

    def run(s: Subject, done: dict, peaks: PeakMemory, o: Options):
        model_q, report = done["quantize.rtn"]
        path = o.workdir / f"{s.name}-{fmt}-{next(counter)}"
        return export(model_q, s.plan, path, fmt, tokenizer=s.tokenizer, qparams=report.qparams)
    return run


def stage_fn(name: str) -> Callable:
    fixed = {"forward": forward, REFERENCE: fwd_bwd, "allocate": allocate, "block_ap": block_ap,
             "e2e_qp": e2e_qp, "evaluate": evaluate}
    if name in fixed:
        return fixed[name]
    kind, _, arg = name.partition(".")
    makers = {"sensitivity": sensitivity, "quantize": quantize, "export": export_stage}
    if kind not in makers:
        raise ValueError(f"unknown stage {name!r}; stages are {stage_names(method_names())}")
    return makers[kind](arg)


# --- the runner -----------------------------------------------------------------------------

def _disk_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def group_of(name: str) -> str:
    """Stages of one group share their bracketing unit measurements: sensitivity, quantize, export..."""
    return name.split(".")[0]


class Runner:
    """Times stages on one subject against the fwd+bwd unit measured around them; rows keep every
    Measurement, `units` one value per reference call, `bracket[name]` the index of the last unit
    measured before the stage (-1: before any)."""

    def __init__(self, s: Subject, o: Options, *, repeats: int, skip: Sequence[str] = ()) -> None:
        self.s, self.o, self.repeats, self.skip = s, o, repeats, tuple(skip)
        self.peaks = PeakMemory(s.device)
        self.rows: dict[str, Measurement] = {}
        self.done: dict[str, object] = {}
        self.reference_runs: list[float] = []
        self.units: list[float] = []
        self.bracket: dict[str, int] = {}
        self.first_reference: Measurement | None = None

    def skipped(self, name: str) -> bool:
        return any(name == k or name.startswith(k + ".") for k in self.skip)

    @property
    def unit(self) -> float:
        """The typical unit: the median of every reference pass of the run."""
        return statistics.median(self.reference_runs)

    def unit_of(self, name: str) -> float:
        """The mean of the units measured just before and just after stage `name`."""
        if name == REFERENCE:
            return self.unit
        i = self.bracket[name]
        around = self.units[max(i, 0): i + 2]
        return statistics.mean(around)

    def reference(self, times: int) -> None:
        """`times` fwd+bwd passes; their median becomes the next entry of `units`. The row keeps the
        memory of the very first pass, made before any stage had grown the heap."""
        fn = stage_fn(REFERENCE)
        runs = []
        for _ in range(times):
            _, m = measure(lambda: fn(self.s, self.done, self.peaks, self.o), device=self.s.device, peaks=self.peaks)
            runs.append(m.seconds)
            self.first_reference = self.first_reference or m
        self.reference_runs += runs
        self.units.append(statistics.median(runs))
        ref = self.first_reference
        self.rows[REFERENCE] = Measurement(self.unit, list(self.reference_runs), ref.peak_rss_mb, ref.rss_start_mb,
                                           ref.cuda_peak_mb, note="median of every pass; each stage divides by "
                                                                  "the passes around it")

    def record(self, name: str, m: Measurement) -> None:
        """A measurement made outside `stage` (the load), bracketed by the next unit."""
        self.rows[name] = m
        self.bracket[name] = len(self.units) - 1

    def prepare(self, name: str) -> None:
        """Compute, untimed, the input of stage `name` whose own stage was skipped."""
        def make(stage: str):
            if stage not in self.done:
                log.info("%s: %s, the input of %s, computed untimed", self.s.name, stage, name)
                self.done[stage] = stage_fn(stage)(self.s, self.done, self.peaks, self.o)
            return self.done[stage]

        group = group_of(name)
        if group == "allocate":
            make("sensitivity.fisher")
        if group in ("evaluate", "export"):
            make("quantize.rtn")
        if group == "e2e_qp" and "block_ap" not in self.done:
            self.done["block_ap"] = copy.deepcopy(make("quantize.rtn"))

    def stage(self, name: str) -> None:
        if self.skipped(name) or name in (REFERENCE, "block_ap.per_block"):
            return
        fn = stage_fn(name)
        self.prepare(name)
        log.info("%s: %s ...", self.s.name, name)
        repeats = 1 if name in ONCE else self.repeats
        result, m = measure(lambda: fn(self.s, self.done, self.peaks, self.o), device=self.s.device,
                            repeats=repeats, short_s=self.units[-1], peaks=self.peaks)
        self.record(name, m)
        if name in KEPT:
            self.done[name] = result
        log.info("%s: %s %.2f s (%.2f x the last fwd+bwd), peak RSS %.0f MiB", self.s.name, name, m.seconds,
                 m.seconds / self.units[-1], m.peak_rss_mb)
        if name == "block_ap":
            self.record("block_ap.per_block", per_block(result, m))
            m.extra["blocks"] = len(result[2])
        if name.startswith("export."):
            m.extra["disk_mb"] = _disk_mb(Path(result))
            shutil.rmtree(self.o.workdir, ignore_errors=True)
        m.note = self.note(name)
        del result
        if name == "e2e_qp":
            self.done.pop("block_ap", None)

    def note(self, name: str) -> str:
        method = name.removeprefix("sensitivity.")
        if method == EIGEN:
            return f"top eigenvalue of {self.o.eig_units} linears on {self.o.eig_windows} windows"
        if method in METHODS and METHODS[method].kind == "measured":
            return f"{len(self.s.linears)} layers x 1 config ({self.o.measure_config})"
        if name in ("block_ap", "e2e_qp"):
            epochs = self.o.train.epochs if name == "block_ap" else self.o.train.e2e_epochs
            return f"{epochs:g} epoch(s), {len(self.s.calib)} windows, batch {self.o.train.batch_size}"
        if name == "evaluate":
            return f"original + RTN model, {len(self.s.held)} held-out windows"
        return ""

    def run(self, names: Sequence[str], *, reference_before: int) -> dict:
        """Time `names` in order, with unit passes before, between groups and after; {name: row}."""
        self.reference(reference_before)
        previous = None
        for name in [n for n in names if not self.skipped(n)]:
            if previous is not None and group_of(name) != previous:
                self.reference(1)
            self.stage(name)
            previous = group_of(name)
        self.reference(1)
        return self.table()

    def table(self) -> dict:
        first = [n for n in ("load", REFERENCE) if n in self.rows]
        order = first + [n for n in self.rows if n not in first]
        return {n: {**self.rows[n].to_dict(self.unit_of(n)), "unit_s": self.unit_of(n)} for n in order}
