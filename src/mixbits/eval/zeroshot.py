"""Zero-shot multiple-choice accuracy of in-memory models through lm-evaluation-harness.

Each model is wrapped in lm-eval's `HFLM` (no reload, no copy) and scored with `simple_evaluate` at
0 shots. For a document with context c and choices a_1..a_k, lm-eval sums the log-likelihood of
each choice's tokens given the context and reports

    acc      = mean_docs [ argmax_i  log p(a_i | c)            == gold ]
    acc_norm = mean_docs [ argmax_i  log p(a_i | c) / len(a_i) == gold ]     (len in characters)

with the standard error of the mean. `limit` takes the first N documents of every task, so all
models see the same documents (checked: the document ids lm-eval logs must agree); all seeds of
lm-eval are set from `seed`.

Task names: `bb_*` are the embedded BIG-bench tasks (`mixbits.data.bigbench`, offline, converted on
first use); any other name is looked up in lm-eval's own registry, whose data sets come from the
Hugging Face hub. Every name is resolved and every data set loaded before the first model is
scored, so a typo or an unreachable hub fails in seconds with one clear line, never after an hour
of evaluation. Chance accuracy is the mean of 1/num_choices over the scored documents.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mixbits.config import resolve_device
from mixbits.data.bigbench import SOURCE as EMBEDDED_SOURCE
from mixbits.data.bigbench import TASK_PREFIX, embedded_task_names, ensure_embedded_tasks, tasks_root
from mixbits.data.errors import MixbitsDataError
from mixbits.errors import UserError
from mixbits.model.dispatch import is_placed

log = logging.getLogger(__name__)

REGISTRY_SOURCE = "lm-eval registry"
METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
NUM_FEWSHOT = 0


@dataclass(frozen=True)
class ResolvedTasks:
    """The leaf lm-eval tasks to score, where each comes from, and the task manager that finds them."""

    requested: tuple[str, ...]  # the names asked for, as lm-eval is given them
    names: tuple[str, ...]  # leaf task names, in the order asked (a registry group or tag expands to its tasks)
    sources: Mapping[str, str]
    chance: Mapping[str, float | None]
    manager: object  # lm_eval.tasks.TaskManager


def check_models(models: Mapping[str, nn.Module]) -> None:
    if not models:
        raise UserError("no models to evaluate; pass at least one, e.g. {'original': model}")
    bad = [name for name in models if not isinstance(name, str) or not name]
    if bad:
        raise UserError(f"model labels must be non-empty strings, got {bad!r}")


def check_options(tasks: Sequence[str], *, limit: int | None, batch_size: int) -> None:
    """Bad options end here, before any conversion, download or model evaluation."""
    if isinstance(tasks, str) or not tasks:
        raise UserError(f"tasks must be a non-empty list of task names, got {tasks!r}; "
                         f"e.g. {list(embedded_task_names()[:2])}")
    duplicated = sorted({t for t in tasks if list(tasks).count(t) > 1})
    if duplicated:
        raise UserError(f"task(s) {duplicated} are listed twice; list each task once")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit {limit!r} must be a positive whole number of documents per task, or None for all")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size {batch_size!r} must be a positive integer")


def split_task_names(tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """(embedded bb_* names, registry names); an unknown bb_* name is an error listing the embedded ones."""
    known = embedded_task_names()
    unknown = [t for t in tasks if t.startswith(TASK_PREFIX) and t not in known]
    if unknown:
        raise MixbitsDataError(f"unknown embedded task(s) {unknown}; the embedded tasks are {', '.join(known)}")
    return [t for t in tasks if t in known], [t for t in tasks if t not in known]


def _hub_error(name: str, err: Exception) -> MixbitsDataError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return MixbitsDataError(
        f"task {name!r} needs its data set from the Hugging Face hub, which could not provide it ({first}). "
        f"Offline, use the embedded tasks ({', '.join(embedded_task_names())}); for {name!r}, allow network "
        f"access to the hub (HF_HUB_OFFLINE=0, HF_DATASETS_OFFLINE=0)"
    )


def _load(manager, name: str, source: str) -> dict:
    try:
        return manager.load([name])["tasks"]
    except OSError as err:  # ConnectionError, offline mode and missing files are all OSErrors
        if source == REGISTRY_SOURCE:
            raise _hub_error(name, err) from err
        raise MixbitsDataError(f"embedded task {name!r} could not be loaded ({err}); delete {tasks_root()} "
                               f"so that it is converted again") from err


def _chance(task, limit: int | None) -> float | None:
    docs = task.eval_docs
    count = len(docs) if limit is None else min(limit, len(docs))
    if count == 0:
        return None
    inverse = [1.0 / len(task.doc_to_choice(docs[i])) for i in range(count)]
    return sum(inverse) / count


def resolve_tasks(tasks: Sequence[str], *, limit: int | None) -> ResolvedTasks:
    """Convert the embedded tasks, find the others in lm-eval's registry and load every data set."""
    from lm_eval.tasks import TaskManager

    embedded, registry = split_task_names(tasks)
    if embedded:
        ensure_embedded_tasks(embedded)
    manager = TaskManager(include_path=str(tasks_root()) if embedded else None, include_defaults=bool(registry))
    if registry:
        known = {*manager.all_tasks, *manager.all_groups, *manager.all_tags}
        unknown = [t for t in registry if t not in known]
        if unknown:
            raise MixbitsDataError(f"unknown task(s) {unknown}: neither embedded ({', '.join(embedded_task_names())}) "
                                   f"nor in lm-eval's registry (see `lm-eval ls tasks`)")
    sources, chance = {}, {}
    for name in tasks:
        source = EMBEDDED_SOURCE if name in embedded else REGISTRY_SOURCE
        for leaf, task in _load(manager, name, source).items():
            if task.OUTPUT_TYPE != "multiple_choice":
                raise UserError(f"task {leaf!r} is of type {task.OUTPUT_TYPE!r}; zero-shot scoring here takes "
                                 f"multiple_choice tasks only, e.g. {', '.join(embedded_task_names()[:3])}")
            sources[leaf] = source
            chance[leaf] = _chance(task, limit)
    return ResolvedTasks(tuple(tasks), tuple(sources), sources, chance, manager)


@contextmanager
def _quiet_hflm() -> Iterator[None]:
    """HFLM warns, each time, that it was handed a model object; that is how this module uses it."""
    logger = logging.getLogger("lm_eval.models.huggingface")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _lm(model: nn.Module, tokenizer, batch_size: int, progress: bool):
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):  # lm-eval's own progress bars, switched with `progress`
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

    with _quiet_hflm():
        return _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _score(model: nn.Module, tokenizer, resolved: ResolvedTasks, *, limit, batch_size, seed, progress) -> dict:
    """lm-eval's raw results for one model on every task."""
    import lm_eval

    raw = lm_eval.simple_evaluate(
        model=_lm(model, tokenizer, batch_size, progress), tasks=list(resolved.requested), num_fewshot=NUM_FEWSHOT,
        limit=limit, task_manager=resolved.manager, log_samples=True, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )
    if raw is None:  # only a non-zero rank of a distributed run gets None
        raise RuntimeError("lm-eval returned no results; run zero-shot evaluation in a single process")
    return raw


def _metrics(raw: dict, task: str) -> dict[str, float]:
    found = raw["results"][task]
    return {metric: float(found[f"{metric},none"]) for metric in METRICS}


def _doc_ids(raw: dict, task: str) -> list[int]:
    return sorted(int(sample["doc_id"]) for sample in raw["samples"][task])


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate_zeroshot(
    models: Mapping[str, nn.Module | Callable[[], nn.Module]],
    tokenizer,
    tasks: Sequence[str],
    *,
    device: str | torch.device = "auto",
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Zero-shot accuracy of every model on every task, on the same documents; see the module docstring.

    Returns {"lm_eval", "limit", "num_fewshot", "seed", "tasks": {task: {"source", "docs", "chance",
    "models": {label: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}}}}}. Models are moved to
    `device` one at a time and back to where they were afterwards; a model given as a function is
    loaded when its turn comes and dropped after it (one alive at a time), and a model accelerate
    placed (`model.dispatch`: parts on other devices or on disk) is scored where it is.
    """
    import lm_eval

    check_models(models)
    check_options(tasks, limit=limit, batch_size=batch_size)
    target = resolve_device(device) if isinstance(device, str) else torch.device(device)
    resolved = resolve_tasks(tasks, limit=limit)
    out = {name: {"source": resolved.sources[name], "docs": None, "chance": resolved.chance[name], "models": {}}
           for name in resolved.names}
    doc_ids: dict[str, list[int]] = {}
    for label, entry in models.items():
        log.info("zero-shot: scoring %s on %d task(s), limit %s, on %s", label, len(resolved.names), limit, target)
        model = entry if isinstance(entry, nn.Module) else entry()
        placed = is_placed(model)
        home = None if placed else _model_device(model)
        try:
            raw = _score((model if placed else model.to(target)).eval(), tokenizer, resolved, limit=limit,
                         batch_size=batch_size, seed=seed, progress=progress)
        finally:
            if home is not None:
                model.to(home)
            del model
            if target.type == "cuda":
                torch.cuda.empty_cache()
        for name in resolved.names:
            ids = _doc_ids(raw, name)
            if doc_ids.setdefault(name, ids) != ids:
                raise RuntimeError(f"task {name!r}: model {label!r} was scored on other documents than the first model")
            out[name]["docs"] = len(ids)
            out[name]["models"][label] = _metrics(raw, name)
    return {"lm_eval": lm_eval.__version__, "limit": limit, "num_fewshot": NUM_FEWSHOT, "seed": seed, "tasks": out}

