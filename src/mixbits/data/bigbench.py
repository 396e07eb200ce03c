"""Embedded zero-shot tasks: multiple-choice tasks of BIG-bench, converted for lm-evaluation-harness.

The BIG-bench source distribution on PyPI (`bigbench==1.0.0`, an sdist of ~360 MB) carries every
JSON task as `bigbench/benchmark_tasks/<task>[/<subtask>]/task.json`. We take a few of them out
(one pass over the archive) and write, per task, under `mixbits_home()/tasks/bigbench-1.0.0/<name>/`:

    test.jsonl      one document per example: {"query", "choices", "gold", "index"}
    bb_<name>.yaml  an lm-eval task reading that file (`dataset_path: json`), metrics acc and acc_norm
    meta.json       docs, skipped examples by reason, chance accuracy; written last, so its presence
                    means the folder is complete (every file appears by an atomic rename)

The prompt is BIG-bench's own zero-shot prompt (`bigbench/api/json_task.py`, `default_format_fn`):

    task_prefix + example_input_prefix + input [+ choice_prefix + choice_prefix.join(listed)] + example_output_prefix

with BIG-bench's defaults ("\\nQ: ", "\\nA: ", "\\n  choice: ", choices appended unless the task
says `append_choices_to_input: false`; a few tasks write that as the string "false", which BIG-bench
itself reads as true: we read it as meant). Listed choices are in BIG-bench's order, a permutation
of the sorted choices by `RandomState(42)`. Each choice is scored as a continuation of that prompt
with no delimiter (`target_delimiter: ""`), so context + continuation is exactly the text BIG-bench
scores. Examples whose `target_scores` have no single best choice are skipped and counted.

Each task also comes in lm-eval's cloze style, `bb_<name>_cloze`: the choices are not listed, the
prompt is `task_prefix + "Question: " + input + "\nAnswer:"` and each choice is scored after a space,
as lm-eval scores PIQA, ARC or SciQ. Small models are near chance on BIG-bench's listed-choice
prompt (they must map "choice: ..." lines to an answer), so the cloze variant is the one that shows
what quantization takes away from a 135M model; both are reported under their own names.

Documents are shuffled once, with a fixed seed, at conversion: lm-eval's `--limit N` takes the first
N documents, and BIG-bench files are often grouped (winowhy lists each schema's reasons together), so
a prefix of the shuffled file is a fair sample. Chance accuracy is the mean of 1/num_choices.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from mixbits.data.cache import fetch_package, mixbits_home, package_dir
from mixbits.data.errors import MixbitsDataError
from mixbits.errors import UserError
from mixbits.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

BIGBENCH_SPEC = "bigbench==1.0.0"
SOURCE = "bigbench 1.0.0 (embedded)"
TASK_PREFIX = "bb_"
CONVERTER_VERSION = 2  # bump when the documents or the YAML change: old folders are converted again
CHOICE_ORDER_SEED = 42  # BIG-bench's JsonTask default `random_seed`
DOC_ORDER_SEED = 0
# pip >= 26.3 refuses to download any PyPI sdist whose metadata names a direct URL (bigbench names
# bleurt @ file://...); this older pip, fetched as a wheel and run from it, still downloads it.
FALLBACK_PIP = "pip==26.2.1"
_MEMBER_ROOT = "bigbench/benchmark_tasks/"
STYLES = ("bigbench", "cloze")  # BIG-bench's own prompt with listed choices; lm-eval's question/answer cloze
CLOZE_SUFFIX = "_cloze"


@dataclass(frozen=True)
class EmbeddedTask:
    """One embedded task: `folder` is its path under bigbench/benchmark_tasks/ (a subtask has two parts)."""

    name: str
    folder: str
    description: str
    resembles: str
    style: str = "bigbench"

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise UserError(f"prompt style {self.style!r} is not one of {STYLES}")

    @property
    def task_name(self) -> str:
        return TASK_PREFIX + self.name + (CLOZE_SUFFIX if self.style == "cloze" else "")


_BASE_TASKS: tuple[EmbeddedTask, ...] = (
    EmbeddedTask("physical_intuition", "physical_intuition",
                 "the physical mechanism or behaviour of a described system (4 choices)", "PIQA"),
    EmbeddedTask("social_iqa", "social_iqa",
                 "motivations, reactions and consequences in everyday social situations (3 choices)", "Social IQa"),
    EmbeddedTask("winowhy", "winowhy",
                 "is the stated reason for a Winograd pronoun resolution correct? (2 choices)", "WSC / Winogrande"),
    EmbeddedTask("strategyqa", "strategyqa",
                 "yes/no questions whose reasoning steps are implicit (2 choices)", "StrategyQA / BoolQ"),
    # goal_step_wikihow has three subtasks of different form; each is its own embedded task.
    EmbeddedTask("goal_step_wikihow_goal_inference", "goal_step_wikihow/goal_inference",
                 "the wikiHow goal a given step serves (4 choices)", "HellaSwag (wikiHow part)"),
    EmbeddedTask("goal_step_wikihow_step_inference", "goal_step_wikihow/step_inference",
                 "the most reasonable step towards a wikiHow goal (4 choices)", "HellaSwag (wikiHow part)"),
    EmbeddedTask("goal_step_wikihow_step_ordering", "goal_step_wikihow/step_ordering",
                 "which of two steps of a wikiHow goal comes first (2 choices)", "event ordering"),
    EmbeddedTask("timedial", "timedial",
                 "the duration phrase that fits a dialogue's masked span (3 choices)", "MC-TACO"),
    EmbeddedTask("understanding_fables", "understanding_fables",
                 "the moral of a fable (5 choices)", "story comprehension"),
    EmbeddedTask("riddle_sense", "riddle_sense",
                 "the answer to a riddle (5 choices)", "RiddleSense / CommonsenseQA"),
    EmbeddedTask("general_knowledge", "general_knowledge",
                 "simple general-knowledge questions (up to 8 choices)", "ARC-Easy"),
)


EMBEDDED_TASKS: tuple[EmbeddedTask, ...] = tuple(
    replace(task, style=style) for style in STYLES for task in _BASE_TASKS)


def embedded_task_names() -> tuple[str, ...]:
    """The lm-eval names of the embedded tasks (`bb_<name>`)."""
    return tuple(task.task_name for task in EMBEDDED_TASKS)


def embedded_task(task_name: str) -> EmbeddedTask | None:
    return next((task for task in EMBEDDED_TASKS if task.task_name == task_name), None)


@dataclass(frozen=True)
class PromptFormat:
    """BIG-bench's zero-shot prompt of one task, with its defaults."""

    task_prefix: str = ""
    input_prefix: str = "\nQ: "
    output_prefix: str = "\nA: "
    choice_prefix: str = "\n  choice: "
    append_choices: bool = True

    @classmethod
    def of(cls, task_json: Mapping) -> PromptFormat:
        flag = task_json.get("append_choices_to_input", True)
        if isinstance(flag, str):  # some tasks write "false"; BIG-bench reads any non-empty string as true
            flag = flag.strip().lower() not in ("false", "0", "no", "")
        return cls(
            task_prefix=str(task_json.get("task_prefix", "")),
            input_prefix=str(task_json.get("example_input_prefix", cls.input_prefix)),
            output_prefix=str(task_json.get("example_output_prefix", cls.output_prefix)),
            choice_prefix=str(task_json.get("choice_prefix", cls.choice_prefix)),
            append_choices=bool(flag),
        )

    def prompt(self, text: str, choices: Sequence[str], style: str = "bigbench") -> str:
        if style == "cloze":  # lm-eval's PIQA/ARC form; the choice follows after a space (target_delimiter)
            return self.task_prefix + "Question: " + text.strip() + "\nAnswer:"
        if self.append_choices:
            listed = np.random.RandomState(seed=CHOICE_ORDER_SEED).permutation(sorted(choices))
            text = text + self.choice_prefix + self.choice_prefix.join(str(c) for c in listed)
        return self.task_prefix + self.input_prefix + text + self.output_prefix


@dataclass(frozen=True)
class Conversion:
    """The documents of one task.json and what was left out, by reason."""

    docs: tuple[dict, ...]
    skipped: Mapping[str, int]

    @property
    def chance(self) -> float:
        return chance_accuracy(self.docs)


def chance_accuracy(docs: Iterable[Mapping]) -> float:
    """Mean over documents of 1 / number of choices: the expected accuracy of a uniform guess."""
    inverse = [1.0 / len(doc["choices"]) for doc in docs]
    if not inverse:
        raise MixbitsDataError("chance accuracy of an empty task: it has no documents")
    return sum(inverse) / len(inverse)


def _single_best(scores: Mapping[str, float]) -> int | None:
    values = [float(v) for v in scores.values()]
    if len(values) < 2 or values.count(max(values)) != 1:
        return None
    return values.index(max(values))


def convert_task_json(task_json: Mapping, *, name: str = "task", style: str = "bigbench") -> Conversion:
    """Multiple-choice documents of a BIG-bench task.json, shuffled with `DOC_ORDER_SEED`."""
    examples = task_json.get("examples")
    if not isinstance(examples, list) or not examples:
        raise MixbitsDataError(f"task {name!r} has no 'examples' list; it is not a BIG-bench JSON task "
                               f"(a task with subtasks keeps its examples in <task>/<subtask>/task.json)")
    fmt = PromptFormat.of(task_json)
    docs, skipped = [], {"no_target_scores": 0, "no_single_best": 0}
    for index, example in enumerate(examples):
        scores = example.get("target_scores")
        if not isinstance(scores, Mapping) or "input" not in example:
            skipped["no_target_scores"] += 1
            continue
        gold = _single_best(scores)
        if gold is None:
            skipped["no_single_best"] += 1
            continue
        choices = [str(c) for c in scores]
        docs.append({"query": fmt.prompt(str(example["input"]), choices, style), "choices": choices,
                     "gold": gold, "index": index})
    if not docs:
        raise MixbitsDataError(f"task {name!r} has no multiple-choice example with a single best answer "
                               f"(skipped: {skipped}); choose a multiple-choice task")
    random.Random(DOC_ORDER_SEED).shuffle(docs)
    return Conversion(docs=tuple(docs), skipped=skipped)


def task_yaml(task_name: str, data_file: Path, style: str = "bigbench") -> dict:
    """The lm-eval task config that reads `data_file` (absolute path) as its test split."""
    metric = {"aggregation": "mean", "higher_is_better": True}
    return {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        # bigbench: the query already ends with BIG-bench's output prefix; cloze: "Answer:" + " " + choice
        "target_delimiter": " " if style == "cloze" else "",
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", **metric}, {"metric": "acc_norm", **metric}],
        "metadata": {"version": float(CONVERTER_VERSION), "source": SOURCE},
    }


@dataclass(frozen=True)
class ConvertedTask:
    """A converted task on disk."""

    task_name: str
    folder: Path
    docs: int
    skipped: Mapping[str, int]
    chance: float

    @property
    def data_file(self) -> Path:
        return self.folder / "test.jsonl"

    @property
    def yaml_file(self) -> Path:
        return self.folder / f"{self.task_name}.yaml"


def tasks_root() -> Path:
    """Where the converted tasks live; pass it to lm-eval's `TaskManager(include_path=...)`."""
    return mixbits_home() / "tasks" / "bigbench-1.0.0"


def write_task(task_name: str, conversion: Conversion, root: Path, style: str = "bigbench") -> ConvertedTask:
    """Write the documents, the YAML and (last) meta.json of one task, each atomically."""
    converted = ConvertedTask(task_name, Path(root) / task_name.removeprefix(TASK_PREFIX), len(conversion.docs),
                              dict(conversion.skipped), conversion.chance)
    lines = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in conversion.docs)
    atomic_write_text(converted.data_file, lines)
    atomic_write_text(converted.yaml_file, yaml.safe_dump(task_yaml(task_name, converted.data_file, style), sort_keys=False))
    atomic_write_json(converted.folder / "meta.json", {
        "converter_version": CONVERTER_VERSION, "source": SOURCE, "task": task_name, "docs": converted.docs,
        "skipped": converted.skipped, "chance": converted.chance, "data_file": str(converted.data_file.resolve()),
    })
    for path in (converted.data_file, converted.yaml_file, converted.folder / "meta.json"):
        os.chmod(path, 0o644)  # atomic writes start private (mkstemp); cache files are ordinary files
    log.info("converted %s: %d documents, skipped %s, chance %.3f", task_name, converted.docs,
             converted.skipped, converted.chance)
    return converted


def load_converted(task_name: str, root: Path) -> ConvertedTask | None:
    """The task as converted before, or None if absent, incomplete, stale or moved."""
    folder = Path(root) / task_name.removeprefix(TASK_PREFIX)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    converted = ConvertedTask(task_name, folder, int(meta.get("docs", 0)), meta.get("skipped", {}),
                              float(meta.get("chance", 0.0)))
    same_place = meta.get("data_file") == str(converted.data_file.resolve())
    fresh = meta.get("converter_version") == CONVERTER_VERSION and same_place
    return converted if fresh and converted.data_file.is_file() and converted.yaml_file.is_file() else None


def read_task_jsons(archive: Path, folders: Iterable[str]) -> dict[str, dict]:
    """The parsed task.json of each folder, read in one pass over the (tar.gz) sdist."""
    wanted = {f"{_MEMBER_ROOT}{folder.strip('/')}/task.json": folder for folder in folders}
    found: dict[str, dict] = {}
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for member in tf:
                suffix = next((s for s in wanted if member.name.endswith("/" + s)), None)
                if suffix is None or not member.isfile():
                    continue
                stream = tf.extractfile(member)
                assert stream is not None  # a regular file always has a stream
                found[wanted[suffix]] = json.load(stream)
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise MixbitsDataError(f"{archive} could not be read ({err}); delete it so that it is downloaded "
                               f"again") from err
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise MixbitsDataError(f"{archive.name} has no task.json for {missing}; the archive is not {BIGBENCH_SPEC}. "
                               f"Delete {archive} so that it is downloaded again")
    return found


def _download_with_pip_wheel(pip_wheel: Path, spec: str, folder: Path) -> None:
    """`pip download --no-deps` of `spec`'s sdist with the pip inside `pip_wheel`, renamed into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        cmd = [sys.executable, str(pip_wheel / "pip"), "download", "--no-deps", "--disable-pip-version-check", "-q",
               "--no-binary", ":all:", spec, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = sorted(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or len(got) != 1:
            detail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise MixbitsDataError(f"could not download {spec!r} (sdist) with {pip_wheel.name}: {detail}. Fix: let pip "
                                   f"reach the package index, or place the sdist in {folder}/")
        os.replace(got[0], folder / got[0].name)


def bigbench_archive() -> Path:
    """The BIG-bench sdist, downloaded once into the package cache (see `mixbits.data.cache`)."""
    try:
        return fetch_package(BIGBENCH_SPEC, sdist=True)
    except MixbitsDataError as err:
        if "direct URL" not in str(err):
            raise
    log.warning("this pip refuses the %s sdist (it declares a direct URL dependency); downloading it with %s",
                BIGBENCH_SPEC, FALLBACK_PIP)
    _download_with_pip_wheel(fetch_package(FALLBACK_PIP), BIGBENCH_SPEC, package_dir(BIGBENCH_SPEC, sdist=True))
    return fetch_package(BIGBENCH_SPEC, sdist=True)


def check_embedded_names(task_names: Iterable[str]) -> list[EmbeddedTask]:
    tasks = []
    for name in task_names:
        task = embedded_task(name)
        if task is None:
            raise MixbitsDataError(f"{name!r} is not an embedded task; the embedded tasks are "
                                   f"{', '.join(embedded_task_names())}")
        tasks.append(task)
    return tasks


def ensure_embedded_tasks(task_names: Iterable[str], *, root: Path | None = None) -> dict[str, ConvertedTask]:
    """Each named `bb_*` task, converted on first use (the sdist is downloaded and read once for all)."""
    root = Path(root) if root is not None else tasks_root()
    tasks = check_embedded_names(task_names)
    done = {t.task_name: c for t in tasks if (c := load_converted(t.task_name, root)) is not None}
    todo = [t for t in tasks if t.task_name not in done]
    if todo:
        log.info("converting %d BIG-bench tasks from the %s sdist into %s", len(todo), BIGBENCH_SPEC, root)
        raw = read_task_jsons(bigbench_archive(), [t.folder for t in todo])
        for task in todo:
            conversion = convert_task_json(raw[task.folder], name=task.folder, style=task.style)
            done[task.task_name] = write_task(task.task_name, conversion, root, task.style)
    return {t.task_name: done[t.task_name] for t in tasks}
