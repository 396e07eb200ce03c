"""BIG-bench task.json -> lm-eval task: prompts, skipped examples, chance, YAML that lm-eval loads."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import pytest

from mixbits.data import bigbench
from mixbits.data.bigbench import (
    EMBEDDED_TASKS,
    PromptFormat,
    convert_task_json,
    embedded_task_names,
    ensure_embedded_tasks,
    load_converted,
    read_task_jsons,
    tasks_root,
    write_task,
)
from mixbits.data.errors import MixbitsDataError

PREFIXED = {
    "task_prefix": "Answer well.\n",
    "example_input_prefix": "\nQuestion: ",
    "example_output_prefix": "\nAnswer: ",
    "choice_prefix": "\n - ",
    "append_choices_to_input": True,
    "examples": [
        {"input": "Is ice cold?", "target_scores": {"yes": 1, "no": 0}},
        {"input": "Pick red.", "target_scores": {"blue": 0, "red": 1, "green": 0, "pink": 0}},
        {"input": "Tie.", "target_scores": {"a": 1, "b": 1, "c": 0}},  # two best answers
        {"input": "All zero.", "target_scores": {"a": 0, "b": 0}},  # no best answer
        {"input": "Free text.", "target": "anything"},  # not multiple choice
        {"input": "Pick c.", "target_scores": {"a": 0.0, "b": 0.25, "c": 1.0}},
    ],
}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def by_index(conversion):
    return {doc["index"]: doc for doc in conversion.docs}


def test_prompt_uses_the_task_prefixes():
    docs = by_index(convert_task_json(PREFIXED))
    query = docs[1]["query"]
    head = "Answer well.\n\nQuestion: Pick red."
    assert query.startswith(head) and query.endswith("\nAnswer: ")
    listed = query[len(head):-len("\nAnswer: ")].split("\n - ")
    assert listed[0] == "" and sorted(listed[1:]) == ["blue", "green", "pink", "red"]


def test_prompt_defaults_and_choices_not_appended_when_the_task_says_false():
    plain = {"examples": [{"input": "Is it?", "target_scores": {"Yes": 0, "No": 1}}]}
    assert convert_task_json(plain).docs[0]["query"].startswith("\nQ: Is it?\n  choice: ")
    assert convert_task_json(plain).docs[0]["query"].endswith("\nA: ")
    for flag in (False, "false", "False"):  # some task.json files write the flag as a string
        doc = convert_task_json({**plain, "append_choices_to_input": flag}).docs[0]
        assert doc["query"] == "\nQ: Is it?\nA: "
    assert PromptFormat.of({"append_choices_to_input": "true"}).append_choices


def test_examples_without_a_single_best_answer_are_skipped_and_counted():
    conversion = convert_task_json(PREFIXED)
    assert conversion.skipped == {"no_single_best": 2, "no_target_scores": 1}
    docs = by_index(conversion)
    assert sorted(docs) == [0, 1, 5]
    for index, doc in docs.items():
        scores = PREFIXED["examples"][index]["target_scores"]
        assert doc["choices"] == list(scores)  # scored in the task's own order
        assert scores[doc["choices"][doc["gold"]]] == max(scores.values())


def test_chance_is_the_mean_of_one_over_the_number_of_choices():
    conversion = convert_task_json(PREFIXED)
    kept = [PREFIXED["examples"][i]["target_scores"] for i in (0, 1, 5)]
    assert conversion.chance == pytest.approx(sum(1 / len(s) for s in kept) / len(kept))


def test_documents_are_shuffled_the_same_way_every_time():
    many = {"examples": [{"input": f"q{i}", "target_scores": {"x": 1, "y": 0}} for i in range(40)]}
    first, again = convert_task_json(many).docs, convert_task_json(many).docs
    order = [doc["index"] for doc in first]
    assert order == [doc["index"] for doc in again]
    assert sorted(order) == list(range(40)) and order != list(range(40))


def test_a_task_with_subtasks_or_no_choices_is_refused():
    with pytest.raises(MixbitsDataError, match="subtask"):
        convert_task_json({"name": "goal_step_wikihow", "subtasks": []}, name="goal_step_wikihow")
    with pytest.raises(MixbitsDataError, match="single best"):
        convert_task_json({"examples": [{"input": "x", "target_scores": {"a": 1, "b": 1}}]})


def test_the_written_yaml_loads_in_lm_eval_and_scores_query_plus_choice(tmp_path):
    from lm_eval.tasks import TaskManager

    converted = write_task("bb_synthetic", convert_task_json(PREFIXED), tmp_path)
    assert load_converted("bb_synthetic", tmp_path) == converted
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = manager.load(["bb_synthetic"])["tasks"]["bb_synthetic"]
    assert task.OUTPUT_TYPE == "multiple_choice" and set(task._metric_fn_list) == {"acc", "acc_norm"}
    docs = list(task.eval_docs)
    assert docs == [dict(doc) for doc in convert_task_json(PREFIXED).docs]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    for instance in task.instances:
        doc = instance.doc
        context, continuation = instance.arguments
        assert context + continuation == doc["query"] + doc["choices"][instance.idx]


def test_cloze_style_lists_no_choices_and_scores_each_after_a_space(tmp_path):
    from lm_eval.tasks import TaskManager

    docs = convert_task_json(PREFIXED, style="cloze").docs
    assert {d["query"] for d in docs} >= {"Answer well.\nQuestion: Pick red.\nAnswer:"}
    assert not any("blue" in d["query"] or "\n - " in d["query"] for d in docs)
    write_task("bb_synthetic_cloze", convert_task_json(PREFIXED, style="cloze"), tmp_path, "cloze")
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = manager.load(["bb_synthetic_cloze"])["tasks"]["bb_synthetic_cloze"]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    for instance in task.instances:
        context, continuation = instance.arguments
        assert context == instance.doc["query"] and continuation == " " + instance.doc["choices"][instance.idx]


def test_stale_or_moved_conversions_are_not_trusted(tmp_path):
    converted = write_task("bb_synthetic", convert_task_json(PREFIXED), tmp_path / "a")
    meta = json.loads((converted.folder / "meta.json").read_text())
    (converted.folder / "meta.json").write_text(json.dumps({**meta, "converter_version": -1}))
    assert load_converted("bb_synthetic", tmp_path / "a") is None
    (tmp_path / "a").rename(tmp_path / "b")
    assert load_converted("bb_synthetic", tmp_path / "b") is None


def test_registry_names_are_unique_and_prefixed():
    names = embedded_task_names()
    assert len(set(names)) == len(names) == len(EMBEDDED_TASKS)
    assert all(name.startswith("bb_") for name in names)
    for required in ("physical_intuition", "social_iqa", "winowhy", "strategyqa"):
        assert f"bb_{required}" in names and f"bb_{required}_cloze" in names
    assert any(task.folder.startswith("goal_step_wikihow/") for task in EMBEDDED_TASKS)


def test_unknown_task_is_an_error_naming_the_embedded_ones(home, monkeypatch):
    monkeypatch.setattr(bigbench, "bigbench_archive", lambda: pytest.fail("nothing may be downloaded"))
    with pytest.raises(MixbitsDataError, match="bb_winowhy"):
        ensure_embedded_tasks(["bb_winowhy", "bb_no_such_task"])


def test_converted_tasks_are_reused_without_the_archive(home, monkeypatch):
    write_task("bb_winowhy", convert_task_json(PREFIXED), tasks_root())
    monkeypatch.setattr(bigbench, "bigbench_archive", lambda: pytest.fail("nothing may be downloaded"))
    assert ensure_embedded_tasks(["bb_winowhy"])["bb_winowhy"].docs == 3


def tar_with(tmp_path, members: dict[str, dict]):
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return path


def test_task_jsons_are_read_from_the_sdist_including_subtasks(tmp_path):
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    archive = tar_with(tmp_path, {root + "a/task.json": {"n": 1}, root + "b/sub/task.json": {"n": 2},
                                  root + "b/task.json": {"n": 3}})
    assert read_task_jsons(archive, ["a", "b/sub"]) == {"a": {"n": 1}, "b/sub": {"n": 2}}
    with pytest.raises(MixbitsDataError, match="'c'"):
        read_task_jsons(archive, ["a", "c"])


def test_missing_tasks_are_converted_from_one_read_of_the_archive(home, monkeypatch, tmp_path):
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    archive = tar_with(tmp_path, {root + "winowhy/task.json": PREFIXED,
                                  root + "goal_step_wikihow/step_ordering/task.json": {"examples": PREFIXED["examples"][:2]}})
    monkeypatch.setattr(bigbench, "bigbench_archive", lambda: archive)
    names = ["bb_winowhy", "bb_goal_step_wikihow_step_ordering"]
    converted = ensure_embedded_tasks(names)
    assert list(converted) == names
    assert [converted[n].docs for n in names] == [3, 2]
    assert load_converted("bb_winowhy", tasks_root()) == converted["bb_winowhy"]


def test_sdist_refused_by_new_pip_is_fetched_with_the_older_pip_wheel(home, monkeypatch, tmp_path):
    calls = []

    def fake_fetch(spec, sdist=False):
        calls.append(spec)
        folder = bigbench.package_dir(spec, sdist=sdist)
        found = sorted(folder.glob("*.tar.gz")) if folder.is_dir() else []
        if spec == bigbench.FALLBACK_PIP:
            return tmp_path / "pip-26.2.1-py3-none-any.whl"
        if found:
            return found[0]
        raise MixbitsDataError("could not download: Distributions from PyPI cannot declare direct URL dependencies")

    def fake_run(cmd, **kwargs):
        assert cmd[1].endswith("pip-26.2.1-py3-none-any.whl/pip") and bigbench.BIGBENCH_SPEC in cmd
        (bigbench.Path(cmd[cmd.index("-d") + 1]) / "bigbench-1.0.0.tar.gz").write_bytes(b"sdist")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bigbench, "fetch_package", fake_fetch)
    monkeypatch.setattr(subprocess, "run", fake_run)
    archive = bigbench.bigbench_archive()
    assert archive.read_bytes() == b"sdist"
    assert archive.parent == bigbench.package_dir(bigbench.BIGBENCH_SPEC, sdist=True)
    assert calls == [bigbench.BIGBENCH_SPEC, bigbench.FALLBACK_PIP, bigbench.BIGBENCH_SPEC]


@pytest.mark.embedded
def test_real_bigbench_tasks_convert_with_valid_gold_indices():
    converted = ensure_embedded_tasks(embedded_task_names())
    assert set(converted) == set(embedded_task_names())
    for name, task in converted.items():
        docs = [json.loads(line) for line in task.data_file.read_text().splitlines()]
        assert task.docs == len(docs) > 0, name
        assert all(0 <= doc["gold"] < len(doc["choices"]) and len(doc["choices"]) >= 2 for doc in docs), name
        assert 0 < task.chance < 1, name
