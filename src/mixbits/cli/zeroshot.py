"""`mixbits zeroshot`: zero-shot multiple-choice accuracy of a run's original and quantized models."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mixbits import commands
from mixbits.cli.common import DEVICE, VERBOSE, app, console, setup_logging, user_errors
from mixbits.cli.options import option
from mixbits.parsing import split_list
from mixbits.errors import UserError

# The embedded tasks the original smollm2-135m scores above chance on by > 2 stderr (README "Zero-shot tasks").
DEFAULT_TASKS = ("bb_social_iqa_cloze,bb_goal_step_wikihow_goal_inference_cloze,"
                 "bb_goal_step_wikihow_step_inference_cloze,bb_general_knowledge_cloze")


def _check_flags(run_dir, model, output, original, limit, batch_size, device) -> Path:
    """Every flag checked before anything is loaded; returns where the results go."""
    from mixbits.config import resolve_device

    if (run_dir is None) == (model is None):
        raise UserError("pass either --run-dir RUN (its original and quantized models) or --model NAME (one model)")
    if model is not None and output is None:
        raise UserError("--model needs --output FILE.json (where to write the results)")
    if model is not None and not original:
        raise UserError("--no-original applies to --run-dir only; with --model the one model is scored")
    if limit < 0:
        raise UserError(f"--limit {limit}: must be 0 (every document) or a positive number of documents per task")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be a positive integer")
    resolve_device(device)
    return output or run_dir / "zeroshot.json"


def _table(result: dict) -> Table:
    labels = list(next(iter(result["tasks"].values()))["models"])
    table = Table(title=f"zero-shot accuracy (lm-eval {result['lm_eval']}, limit {result['limit']})")
    metrics = [f"{label} acc" for label in labels] + [f"{label} acc_norm" for label in labels]
    for column in ["task", "docs", "chance", *metrics]:
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, entry in result["tasks"].items():
        scores = [entry["models"][label] for label in labels]
        chance = "–" if entry["chance"] is None else f"{entry['chance']:.3f}"
        table.add_row(task, str(entry["docs"]), chance,
                      *[f"{s['acc']:.3f} ± {s['acc_stderr']:.3f}" for s in scores],
                      *[f"{s['acc_norm']:.3f} ± {s['acc_norm_stderr']:.3f}" for s in scores])
    return table


@app.command("zeroshot")
def zeroshot_cmd(
    run_dir: Optional[Path] = typer.Option(None, help="output folder of `mixbits run`: scores its original model "
                                                      "and its quantized model/ on the same documents"),
    model: Optional[str] = typer.Option(None, help="score this one model instead: embedded name, hub id or HF folder"),
    tasks: str = typer.Option(DEFAULT_TASKS, help="comma-separated: embedded bb_* tasks (offline) or lm-eval "
                                                  "registry names such as piqa, arc_easy (need the hub)"),
    limit: int = typer.Option(200, help="score the first N documents of each task; 0 = every document"),
    batch_size: int = typer.Option(8, help="sequences per forward pass"),
    device: str = DEVICE,
    original: bool = typer.Option(True, help="with --run-dir: also score the original model"),
    output: Optional[Path] = typer.Option(None, help="results JSON; default RUN_DIR/zeroshot.json "
                                                     "(required with --model)"),
    seed: int = typer.Option(0, help="seed of lm-eval's random generators"),
    max_memory: Optional[str] = option("max_memory"),
    offload_dir: Optional[Path] = typer.Option(None, help="where accelerate keeps the blocks beyond --max-memory "
                                                          "(default: a temporary folder)"),
    verbose: bool = VERBOSE,
) -> None:
    """Zero-shot multiple-choice accuracy through lm-evaluation-harness (acc, acc_norm, chance)."""
    setup_logging(verbose)
    with user_errors():
        target = _check_flags(run_dir, model, output, original, limit, batch_size, device)
        result = commands.zeroshot(split_list(tasks), run_dir=run_dir, model=model, output=target,
                                   limit=limit or None, batch_size=batch_size, device=device, original=original,
                                   seed=seed, max_memory=max_memory, offload_dir=offload_dir, progress=verbose)
    console.print(_table(result))
    console.print(f"wrote {target}")
    if run_dir is not None and target == run_dir / "zeroshot.json" and (run_dir / "report.html").is_file():
        from mixbits.pipeline import write_run_report

        console.print(f"updated {write_run_report(run_dir)} (now with the zero-shot section)")
