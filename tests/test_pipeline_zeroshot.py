"""`mixbits run --tasks`: zero-shot accuracy of the original and the mixed model in results.json and
the report; a bad task name stops the run before the model loads."""

import json

import pytest

from mixbits.config import AllocationConfig, DataConfig, RunConfig
from mixbits.data.errors import MixbitsDataError
from mixbits.pipeline import run


def _cfg(model_dir, text_file, out, tasks, limit=4) -> RunConfig:
    return RunConfig(
        model=str(model_dir), output_dir=out, device="cpu", quantizer="rtn", progress=False,
        data=DataConfig(dataset=str(text_file), seqlen=32, calib_windows=2, eval_windows=2),
        allocation=AllocationConfig(target_bpw=3.5, group_sizes=(32,)), tasks=tasks, task_limit=limit,
    )


@pytest.mark.embedded
def test_run_scores_both_models_on_the_same_documents_and_reports_them(tiny_model_dir, tiny_text_file, tmp_path):
    cfg = _cfg(tiny_model_dir, tiny_text_file, tmp_path, ("bb_winowhy_cloze",))
    results = run(cfg)
    task = json.loads((tmp_path / "results.json").read_text())["zeroshot"]["tasks"]["bb_winowhy_cloze"]
    assert task == results["zeroshot"]["tasks"]["bb_winowhy_cloze"]
    assert task["docs"] == 4 and task["chance"] == pytest.approx(0.5) and set(task["models"]) == {"original", "mixed"}
    for scores in task["models"].values():
        assert 0 <= scores["acc"] <= 1 and scores["acc"] * 4 == pytest.approx(round(scores["acc"] * 4))
    assert "zeroshot" in results["timings_s"]
    assert "bb_winowhy_cloze" in (tmp_path / "report.html").read_text()


def test_unknown_task_stops_the_run_before_the_model_loads(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    import mixbits.pipeline as pipeline

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the task names were checked")

    monkeypatch.setattr(pipeline, "load_model", no_load)
    with pytest.raises(MixbitsDataError, match="bb_no_such_task"):
        run(_cfg(tiny_model_dir, tiny_text_file, tmp_path, ("bb_no_such_task",)))
    assert not (tmp_path / "results.json").exists()


@pytest.mark.embedded
def test_streamed_run_scores_as_the_whole_model_run(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    """Zero-shot in a streamed run: each model loaded alone (`model.dispatch`, placed by accelerate under
    a budget: tests/model/test_dispatch.py), never the whole model by the run's own loader; the same
    accuracies as the whole-model path."""
    from dataclasses import replace

    import mixbits.pipeline as pipeline

    task = "bb_winowhy_cloze"
    whole = run(replace(_cfg(tiny_model_dir, tiny_text_file, tmp_path / "whole", (task,)), stream=False, report=False))

    def no_load(*a, **k):
        raise AssertionError("the streamed run loaded the whole model with load_model")

    monkeypatch.setattr(pipeline, "load_model", no_load)
    streamed = run(replace(_cfg(tiny_model_dir, tiny_text_file, tmp_path / "streamed", (task,)), report=False,
                           offload_dir=tmp_path / "offload"))
    assert streamed["zeroshot"]["tasks"][task] == whole["zeroshot"]["tasks"][task]
    assert streamed["config"]["stream"] is True and "zeroshot" in streamed["timings_s"]
    assert list((tmp_path / "offload").iterdir()) == []  # its temporary offload folder is removed
