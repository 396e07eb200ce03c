"""Block-AP variants on one plan, at equal total epochs: schedules, E2E-QP, and starting points.

    python bench/train_compare.py --plan runs/demo/plan.json --sensitivity runs/demo/sensitivity.json \
        --runs fixed,linear,sqrt,conservative,joint,fixed+e2e --inits rtn --output-dir runs/train-schedules
    python bench/train_compare.py ... --runs fixed --inits rtn,clip,gptq --output-dir runs/train-inits

Every run trains the same plan on the same windows (training: calibration split; state selection:
validation split; scoring: held-out test split) with the same seed. Non-fixed schedules are
rescaled to the total epochs of `fixed` (`--total-epoch-budget`), so they differ only in where the
epochs and learning rate go. `X+e2e` replays X's checkpointed blocks (same Block-AP config, so the
checkpoint matches) and adds E2E-QP. Each start (`--inits`) is also scored untrained. Results are
written after every run (`compare.json`, atomic), and a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from mixbits.config import resolve_device
from mixbits.data.text import load_text
from mixbits.data.windows import eval_windows, text_fingerprint
from mixbits.eval.perplexity import evaluate_models
from mixbits.jobs.schedules import arm_config, trained_row, untrained_row
from mixbits.io import atomic_write_json
from mixbits.model.arch import find_linears
from mixbits.model.load import load_model, resolve_model_source
from mixbits.plan import Plan
from mixbits.sensitivity.table import DamageTable
from mixbits.train.windows import training_windows
from mixbits.config import TrainConfig
from mixbits.train.schedule import block_sensitivity

log = logging.getLogger("train_compare")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--plan", type=Path, required=True)
    a.add_argument("--sensitivity", type=Path, required=True, help="sensitivity.json with fisher_trace scores")
    a.add_argument("--runs", default="fixed,linear,sqrt,conservative,joint,fixed+e2e")
    a.add_argument("--inits", default="rtn")
    a.add_argument("--train-size", type=int, default=16)
    a.add_argument("--val-size", type=int, default=8)
    a.add_argument("--seqlen", type=int, default=256)
    a.add_argument("--epochs", type=float, default=2.0)
    a.add_argument("--eval-windows", type=int, default=24)
    a.add_argument("--device", default="auto")
    a.add_argument("--output-dir", type=Path, default=Path("runs/train-compare"))
    return a.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = resolve_device(args.device)
    original, tokenizer = load_model(resolve_model_source(args.model), device="cpu")
    plan = Plan.load(args.plan)
    table = DamageTable.load(args.sensitivity)
    linears = find_linears(original)
    sensitivity = block_sensitivity(dict(zip(table.units, table.scores["fisher_trace"])),
                                    {n: i.block for n, i in linears.items()})
    base = TrainConfig(train_size=args.train_size, val_size=args.val_size, seqlen=args.seqlen, epochs=args.epochs)
    windows = training_windows(tokenizer, base)
    test = eval_windows(tokenizer, load_text(base.dataset, "test"), args.seqlen, args.eval_windows)
    out = {"model": args.model, "plan": str(args.plan), "bpw": plan.bits_per_weight({n: (i.out_features, i.in_features)
                                                                                     for n, i in linears.items()}),
           "train": base.to_dict(), "device": str(device), "torch": torch.__version__,
           "data": {k: {"windows": len(w), "seqlen": w.shape[1], "sha256": text_fingerprint(w)}
                    for k, w in (*windows.items(), ("test", test))},
           "original": evaluate_models({"original": original}, test, device=device, reference="original",
                                       progress=False)["original"].to_dict(), "rows": []}
    for init in args.inits.split(","):
        out["rows"].append(untrained_row(original, plan, init, windows, test, device=device,
                                         batch_size=base.batch_size))
        for run in args.runs.split(","):
            checkpoint = args.output_dir / "checkpoint" / f"{init}-{run.partition('+')[0]}"  # X+e2e replays X
            out["rows"].append(trained_row(original, plan, windows, test, arm_config(base, init, run), run,
                                           device=device, sensitivity=sensitivity, resume=True,
                                           checkpoint_dir=checkpoint))
            atomic_write_json(args.output_dir / "compare.json", out)
            log.info("%s / %s: ppl %.3f", init, run, out["rows"][-1]["ppl"])
    atomic_write_json(args.output_dir / "compare.json", out)
    print(table_of(out))
    return out


def table_of(r: dict) -> str:
    lines = [f"`{r['model']}`, plan {r['plan']} ({r['bpw']:.3f} bpw); Block-AP on {r['data']['calibration']['windows']} "
             f"x {r['data']['calibration']['seqlen']} tokens, {r['train']['epochs']:g} base epochs; scored on "
             f"{r['data']['test']['windows']} x {r['data']['test']['seqlen']} held-out tokens (original ppl "
             f"{r['original']['ppl']:.2f})", "",
             "| start | training | total epochs | perplexity | KL (nats/token) | top-1 | blocks improved | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        epochs = f"{x['total_epochs']:.1f}" if "total_epochs" in x else "–"
        improved = f"{x['improved_blocks']}/{x['blocks']}" if "blocks" in x else "–"
        lines.append(f"| {x['init']} | {x['run']} | {epochs} | {x['ppl']:.2f} | {x['kl']:.4f} | "
                     f"{100 * x['top1']:.1f} % | {improved} | {x['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
