"""bench/end_to_end.py in --quick mode (tiny random Llama), so the script cannot rot.

No time is asserted: the test checks that each step ran as its own process with a measured wall
time and peak RSS, that mixbits' evaluation stage is taken out of its time, that a missing tool
says why, and that a rerun measures nothing again.
"""

from __future__ import annotations

import json

import pytest

from tests.bench import load_bench_script


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    e2e = load_bench_script("end_to_end")
    out = tmp_path_factory.mktemp("e2e")
    argv = ["--quick", "--out", str(out), "--subjects", "mixbits-rtn", "--threads", "1"]
    return e2e, e2e.main(argv), out, argv


def test_mixbits_subject_ran_with_its_evaluation_taken_out(quick):
    _, data, out, _ = quick
    r = data["subjects"]["mixbits-rtn"]
    assert r["status"] == "ok", r
    step = r["steps"]["mixbits-rtn"]
    assert step["rc"] == 0 and step["peak_rss_mib"] > 50
    assert step["excluded_s"]["evaluate"] > 0
    assert r["seconds"] == pytest.approx(step["wall_s"] - step["excluded_s"]["evaluate"])
    assert (out / "mixbits-rtn" / "plan.json").is_file()
    assert "| mixbits-rtn |" in (out / "end_to_end.md").read_text() and "| 1.00 |" in (out / "end_to_end.md").read_text()


def test_a_missing_tool_says_why(quick, tmp_path):
    e2e, _, _, _ = quick
    args = e2e.parse_args(["--out", str(tmp_path)])
    subject = e2e._peer(args, "gptqmodel", {}, "w4g128", "no_such_module_for_this_test")
    assert subject.missing and "no_such_module_for_this_test is not importable" in subject.missing
    assert e2e.measure(subject, {}, args)["status"].startswith("not run: ")


def test_unknown_subject_is_refused_before_any_work(quick, tmp_path, capsys):
    e2e, _, _, _ = quick
    with pytest.raises(SystemExit):
        e2e.parse_args(["--subjects", "mixbits-rtn,llama", "--out", str(tmp_path)])
    assert "unknown subjects ['llama']" in capsys.readouterr().err


def test_a_rerun_measures_nothing_again(quick):
    e2e, data, _, argv = quick
    again = e2e.main(argv)
    assert again["subjects"] == json.loads(json.dumps(data["subjects"]))


def test_the_every_row_subject_asks_for_every_row(quick, tmp_path):
    e2e, _, _, _ = quick
    args = e2e.parse_args(["--out", str(tmp_path), "--subjects", "mixbits-gptq,mixbits-gptq-all-rows"])
    ids = tmp_path / "ids.json"
    ids.write_text("[]")
    default, every = e2e.subjects(args, "hf", ids, tmp_path / "text.txt")
    assert "--gain-rows" not in default.steps[0].argv  # the default, whatever it is
    argv = every.steps[0].argv
    assert argv[argv.index("--gain-rows") + 1] == "0" and "every row" in every.settings
