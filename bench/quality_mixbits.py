"""mixbits' own rows of the quality benchmark: its plans, quantized and (optionally) trained.

* `uniform-rtn`: every layer at one bits/group pair, round-to-nearest, for every candidate pair.
* `optimal-<q>`: the exact least-predicted-damage plan at each budget (`allocate_optimal` on the
  Fisher table, scaled by the quantizer's gain over RTN unless q is rtn, as `mixbits run` does),
  quantized with q (rtn; clip; gptq with clip-searched group scales, mixbits' default).
* `optimal-gptq-rtn-damage`: the optimal-rtn plan quantized with GPTQ (`--damage rtn`: no gain
  measurement, the cheap way to run GPTQ in mixbits).
* `heuristics`: the seeds' strategies at each budget; fixed-tier rules that ignore the budget
  give one plan each, and a plan already measured by another row is not measured twice.
* `blockap` / `blockap-<q>`: the optimal plan at a few budgets, initialised by round-to-nearest /
  by quantizer q, trained with Block-AP and then E2E-QP.
* `optimal-matched`: the optimal plan at exactly the measured bpw of each other tool's row, uniform
  config and fixed-tier heuristic (built after those are measured), so that each has a mixbits
  plan of the same size beside it.
* `optimal-matched-g32`: the same beside the calibrated peers, with group size 32 added to
  the candidates (`mixbits run --group-sizes 32,64,128`): llama.cpp's 32-weight blocks cost
  4.5 bits per weight at 4 bits (Q4_0: fp16 scale, no zero); mixbits' w4g32 4.63 (fp16 scale
  and a 4-bit zero), its default smallest group (w4g64) 4.31.

Plans come from `mixbits.jobs.sweep`'s plan rows (one damage table, every strategy and budget), so the
benchmark allocates exactly as `mixbits sweep` does. Bytes are the cost model's stored bytes of the
block linears (`Plan.storage_bytes`), `linear_bytes` in results.json.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from quality_rows import Built, Row
from mixbits.allocate.registry import BUDGETED, STRATEGIES
from mixbits.model.quantize import quantize_model
from mixbits.pipeline import sensitivity
from mixbits.plan import Plan
from mixbits.quant.gptq import GPTQConfig
from mixbits.jobs.sweep import SweepConfig, _plans
from mixbits.timing import StageTimer
from mixbits.train.windows import training_windows
from mixbits.config import TrainConfig
from mixbits.train.run import train_model

log = logging.getLogger("quality")

HEURISTICS = tuple(s for s in STRATEGIES if s not in ("optimal", "uniform"))
QUANTIZER_SETTINGS = {"rtn": "min-max round-to-nearest", "clip": "per-group clip search weighted by the input "
                      "second moment", "gptq": "GPTQ (sequential blocks, clip-searched group scales)"}


def _cfg(bench, quantizer: str, group_sizes: tuple | None = None):
    cfg = replace(bench.cfg, quantizer=quantizer)
    return cfg if group_sizes is None else replace(cfg, allocation=replace(cfg.allocation, group_sizes=group_sizes))


def _table(bench, quantizer: str, group_sizes: tuple | None = None):
    """The damage table `mixbits run --quantizer q [--group-sizes ...]` allocates on (cached on disk)."""
    return sensitivity(_cfg(bench, quantizer, group_sizes), bench.p, bench.calib, StageTimer(), bench.data_info)


def plan_rows(bench, quantizer: str, budgets: tuple[float, ...], strategies: tuple[str, ...], uniform: bool) -> list[dict]:
    """mixbits.jobs.sweep's rows: strategy, target_bpw, specs, bpw, key (identical plans share it), rule."""
    sweep = SweepConfig(run=_cfg(bench, quantizer), budgets_bpw=budgets or (8.0,), strategies=strategies,
                        uniform=uniform)
    return _plans(sweep, bench.p, _table(bench, quantizer))


def _quantized(bench, plan: Plan, quantizer: str):
    gptq = GPTQConfig(clip=True) if quantizer == "gptq" else bench.cfg.gptq
    model, _ = quantize_model(bench.p.model, plan, quantizer=quantizer, device=bench.p.device, progress=False,
                              windows=None if quantizer == "rtn" else bench.calib, gptq=gptq)
    return model


def _plan_extra(bench, key: str, plan: Plan) -> dict:
    path = bench.out / "plans" / (key.replace("/", "__").replace(" ", "_") + ".json")
    plan.save(path)
    counts = {}
    for spec in plan.specs.values():
        counts[spec.label] = counts.get(spec.label, 0) + 1
    return {"plan": dict(sorted(counts.items())), "plan_file": str(path.relative_to(bench.out))}


def plan_row(bench, arm: str, label: str, specs, quantizer: str, settings: dict, train: TrainConfig | None = None,
             checkpoints: str | None = None) -> Row:
    row = Row(arm, label, {"quantizer": QUANTIZER_SETTINGS[quantizer], **settings}, lambda: None)

    def build() -> Built:
        plan = Plan(specs)
        if train is None:
            model = _quantized(bench, plan, quantizer)
        else:
            windows = training_windows(bench.p.tokenizer, train)
            model, _ = train_model(bench.p.model, plan, windows["calibration"], windows["validation"], train,
                                   device=bench.p.device, progress=False, resume=True,
                                   checkpoint_dir=bench.out / "checkpoints" / (checkpoints or label).replace(" ", "_"),
                                   gptq=GPTQConfig(clip=True))
        return Built(model, plan.storage_bytes(bench.p.shapes), _plan_extra(bench, row.key, plan))

    row.build = build
    return row


def uniform_rows(bench, seen: dict) -> list[Row]:
    rows = []
    for r in plan_rows(bench, "rtn", bench.args.budgets, (), True):
        rows.append(plan_row(bench, "uniform-rtn", r["rule"].split()[-1], r["specs"], "rtn", {"plan": r["rule"]}))
        seen[r["key"]] = rows[-1].key
    return rows


def optimal_rows(bench, quantizer: str, budgets: tuple[float, ...], rtn_damage: bool = False) -> list[Row]:
    """`optimal-<q>`: allocated on the damage q leaves (`--damage follow`); with `rtn_damage`
    (`optimal-<q>-rtn-damage`, `--damage rtn`): on round-to-nearest's damage, which skips measuring
    q's gain per layer and config, then quantized with q."""
    damage = "fisher" if quantizer == "rtn" or rtn_damage else f"fisher x gain_{quantizer}"
    arm = f"optimal-{quantizer}" + ("-rtn-damage" if rtn_damage else "")
    return [plan_row(bench, arm, f"{r['target_bpw']:g} bpw", r["specs"], quantizer,
                     {"budget_bpw": r["target_bpw"], "damage": damage})
            for r in plan_rows(bench, "rtn" if rtn_damage else quantizer, budgets, ("optimal",), False)]


def heuristic_rows(bench, seen: dict) -> list[Row]:
    """Each distinct plan of the seeds' strategies once; `seen`: plan key -> the row that measures it."""
    rows = []
    for r in plan_rows(bench, "rtn", bench.args.budgets, HEURISTICS, False):
        label = f"{r['strategy']} @ {r['target_bpw']:g}" if r["strategy"] in BUDGETED else r["strategy"]
        if r["key"] in seen:
            if seen[r["key"]] != f"heuristics/{label}":
                bench.notes[f"heuristics/{label}"] = f"same plan as {seen[r['key']]}, measured once"
            continue
        seen[r["key"]] = f"heuristics/{label}"
        rows.append(plan_row(bench, "heuristics", label, r["specs"], "rtn",
                             {"rule": r["rule"], "target_bpw": r["target_bpw"], "miss_bpw": r["miss"]}))
    return rows


def train_config(bench, init: str) -> TrainConfig:
    args = bench.args
    return TrainConfig(dataset=bench.cfg.data.dataset, train_size=args.train_windows, val_size=args.train_val_windows,
                       seqlen=args.train_seqlen, epochs=args.train_epochs, init=init, e2e=True,
                       **({} if args.train_quant_lr is None else {"quant_lr": args.train_quant_lr}))


def blockap_arm(init: str) -> str:
    """`blockap` trains from round-to-nearest; `blockap-<init>` from that quantizer's weights."""
    return "blockap" if init == "rtn" else f"blockap-{init}"


def blockap_rows(bench) -> list[Row]:
    """The optimal plan at each --train-budgets budget (allocated as `mixbits run --quantizer init`
    allocates: Fisher damage, scaled by the quantizer's gain unless rtn), initialised by that
    quantizer, trained with Block-AP and then E2E-QP, for every --train-inits quantizer."""
    rows = []
    for init in bench.args.train_inits:
        cfg = train_config(bench, init)
        settings = {"init": init, "block_ap": f"{cfg.epochs:g} epochs, {cfg.train_size} x {cfg.seqlen} training and "
                    f"{cfg.val_size} validation windows (calibration / validation splits), EfficientQAT's lr",
                    "e2e_qp": f"{cfg.e2e_epochs:g} epoch, step sizes only",
                    "damage": "fisher" if init == "rtn" else f"fisher x gain_{init}"}
        rows += [plan_row(bench, blockap_arm(init), f"{r['target_bpw']:g} bpw", r["specs"], init,
                          {"budget_bpw": r["target_bpw"], **settings}, train=cfg,
                          checkpoints=f"{blockap_arm(init)}-{r['target_bpw']:g}")
                 for r in plan_rows(bench, init, bench.args.train_budgets, ("optimal",), False)]
    return rows


CALIBRATED_PEERS = ("llamacpp-imatrix", "gptqmodel")


def matched_rows(bench, peers: list[dict], group_sizes: tuple | None = None, calibrated_only: bool = False) -> list[Row]:
    """The optimal plan at each measured peer row's bpw (rounded down to 1e-4 bpw), once per size
    and quantizer: peers that calibrate on data (an importance matrix, GPTQ) are matched by mixbits
    with its calibrated quantizer, data-free peers with its data-free one (`--match-quantizers`).
    With `group_sizes` (arm `optimal-matched-g32`, given (32, 64, 128)): candidates of those group
    sizes instead of the default ones, for the calibrated peers only (`calibrated_only`)."""
    data_free, calibrated = bench.args.match_quantizers
    arm = "optimal-matched" if group_sizes is None else "optimal-matched-g32"
    tables, rows, done = {}, [], set()
    for peer in sorted(peers, key=lambda r: r["bpw"]):
        if calibrated_only and peer["arm"] not in CALIBRATED_PEERS:
            continue
        quantizer = calibrated if peer["arm"] in CALIBRATED_PEERS else data_free
        bpw = int(peer["bpw"] * 1e4) / 1e4
        if (bpw, quantizer) in done:
            continue
        done.add((bpw, quantizer))
        if quantizer not in tables:
            tables[quantizer] = _table(bench, quantizer, group_sizes)
        sweep = SweepConfig(run=_cfg(bench, quantizer, group_sizes), budgets_bpw=(bpw,), strategies=("optimal",),
                            uniform=False)
        found = _plans(sweep, bench.p, tables[quantizer])  # empty (and a warning logged) where no plan reaches bpw
        settings = {"budget_bpw": bpw, "matches": f"{peer['arm']}/{peer['label']}",
                    "damage": "fisher" if quantizer == "rtn" else f"fisher x gain_{quantizer}"}
        if group_sizes is not None:
            settings["group_sizes"] = list(group_sizes)
        rows += [plan_row(bench, arm, f"{bpw:.3f} bpw {quantizer}", r["specs"], quantizer, settings) for r in found]
    return rows
