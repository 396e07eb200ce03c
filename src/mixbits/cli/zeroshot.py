"""`mixbits zeroshot`: zero-shot multiple-choice accuracy of a run's original and quantized models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mixbits.cli.common import DEVICE, VERBOSE, app, console, setup_logging, user_errors
from mixbits.parsing import split_list
from mixbits.errors import UserError
from mixbits.outdir import refresh

# The embedded tasks the original smollm2-135m scores above chance on by > 2 stderr (README "Zero-shot tasks").
DEFAULT_TASKS = ("bb_social_iqa_cloze,bb_goal_step_wikihow_goal_inference_cloze,"
                 "bb_goal_step_wikihow_step_inference_cloze,bb_general_knowledge_cloze")


def _run_model_name(run_dir: Path) -> str:
    results = run_dir / "results.json"
    if not (run_dir / "model" / "mixbits.json").is_file():
        raise UserError(f"--run-dir {str(run_dir)!r} has no quantized model (model/mixbits.json); "
                                f"pass the output folder of `mixbits run`")
    try:
        return str(json.loads(results.read_text())["config"]["model"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--run-dir {str(run_dir)!r}: cannot read config.model from {results} ({err}); "
                                f"pass the output folder of a finished `mixbits run`") from None


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


def _tokenizer(folder: Path, fallback_source: str):
    from transformers import AutoTokenizer

    source = folder if (folder / "tokenizer_config.json").is_file() else fallback_source
    from mixbits.model.load import with_pad_token

    return with_pad_token(AutoTokenizer.from_pretrained(source))


def _load_models(run_dir: Path | None, model: str | None, original: bool):
    """({label: model}, tokenizer): a run's original (unless --no-original) and mixed models, or one model."""
    from mixbits.export.native import load_native
    from mixbits.model.load import load_model, resolve_model_source

    if model is not None:
        loaded, tokenizer = load_model(model)
        return {model: loaded}, tokenizer
    name = _run_model_name(run_dir)
    models, tokenizer = {}, None
    if original:
        models["original"], tokenizer = load_model(name)
    models["mixed"] = load_native(run_dir / "model")
    return models, tokenizer or _tokenizer(run_dir / "model", resolve_model_source(name))


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
    verbose: bool = VERBOSE,
) -> None:
    """Zero-shot multiple-choice accuracy through lm-evaluation-harness (acc, acc_norm, chance)."""
    setup_logging(verbose)
    from mixbits.eval.zeroshot import check_options, evaluate_zeroshot, split_task_names
    from mixbits.io import atomic_write_json

    with user_errors():
        target = _check_flags(run_dir, model, output, original, limit, batch_size, device)
        names = split_list(tasks)
        check_options(names, limit=limit or None, batch_size=batch_size)
        split_task_names(names)
        models, tokenizer = _load_models(run_dir, model, original)
        result = evaluate_zeroshot(models, tokenizer, names, device=device, limit=limit or None,
                                   batch_size=batch_size, seed=seed, progress=verbose)
        atomic_write_json(target, result)
        if run_dir is not None:
            refresh(run_dir)  # zeroshot.json goes with the run when it is replaced (--overwrite)
    console.print(_table(result))
    console.print(f"wrote {target}")
    if run_dir is not None and target == run_dir / "zeroshot.json" and (run_dir / "report.html").is_file():
        from mixbits.pipeline import write_run_report

        console.print(f"updated {write_run_report(run_dir)} (now with the zero-shot section)")
