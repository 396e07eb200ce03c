"""The HTML report: self-contained, every section when its data is there and none when not,
escaped text, and only numbers read from the files (a hand-edited number shows as edited)."""

import json
import re

import pytest
from typer.testing import CliRunner

from mixbits.cli.common import app
from mixbits.errors import UserError
import mixbits.cli.report  # noqa: F401  (registers `mixbits report`)
from mixbits.report.comparison_report import write_comparison_report
from mixbits.report.html import write_report
from mixbits.report.run_files import load_run

from .conftest import JSON_FILES, edit_results, zeroshot_section

CORE = ("Summary", "Budget and solver", "Sensitivity and plan", "Most sensitive linears", "Plan histogram",
        "Stage timings", "Configuration")
OPTIONAL = ("Block-AP training", "Zero-shot tasks", "Iterative path")


def headings(html):
    return set(re.findall(r"<h[23]>([^<]*)</h[23]>", html))


def assert_self_contained(html):
    assert "http://" not in html and "https://" not in html
    sources = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", html, re.IGNORECASE)
    assert all(s.startswith("data:image/png;base64,") or s.startswith("#") for s in sources), sources
    assert "<link" not in html.lower() and "@import" not in html and "url(" not in html


def test_a_plain_run_report_is_self_contained_with_every_core_section(plain_run):
    path = write_report(plain_run)
    html = path.read_text()
    assert path == plain_run / "report.html"
    assert_self_contained(html)
    assert set(CORE) <= headings(html) and not set(OPTIONAL) & headings(html)
    images = re.findall(r"<img [^>]*>", html)
    assert len(images) == 3 and all('alt="' in i and 'alt=""' not in i for i in images)
    assert sorted(p.name for p in (plain_run / "plots").iterdir()) == ["allocation.png", "quality_vs_size.png",
                                                                      "sensitivity.png"]
    assert "imagesLoaded" in html and "imagesTotal" in html  # the counter the browser check reads


def test_every_optional_section_appears_with_its_data(full_run):
    html = write_report(full_run).read_text()
    assert_self_contained(html)
    assert set(CORE) | set(OPTIONAL) <= headings(html)
    assert len(re.findall(r"<img ", html)) == 6
    assert "bb_physical_intuition" in html and "rolled back" in html and "E2E-QP" in html
    assert "52.0 % ± 7.0 %" in html  # original acc ± stderr, as the section gives them


def test_zeroshot_is_read_from_its_own_file_too(plain_run):
    (plain_run / "zeroshot.json").write_text(json.dumps(zeroshot_section()))
    html = write_report(plain_run).read_text()
    assert "Zero-shot tasks" in headings(html) and "bb_logical_deduction" in html


def test_text_from_the_files_is_escaped(plain_run):
    evil = '<script>alert("x")</script>'

    def rename(results):
        results["model"]["name"] = evil
        results["models"][evil] = dict(results["models"]["mixed"])

    edit_results(plain_run, rename)
    html = write_report(plain_run).read_text()
    assert evil not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # only the page's own image counter


def test_the_report_shows_hand_edited_numbers_and_changes_no_input(plain_run):
    def edit(results):
        results["models"]["mixed"]["ppl"] = 12345.678
        results["timings_s"]["quantize"] = 4242.0

    edit_results(plain_run, edit)
    before = {n: (plain_run / n).read_bytes() for n in JSON_FILES}
    html = write_report(plain_run).read_text()
    assert "12,345.68" in html and "<td class=num>4,242</td>" in html
    assert {n: (plain_run / n).read_bytes() for n in JSON_FILES} == before


def test_a_folder_without_results_json_is_named_with_its_writer(tmp_path):
    with pytest.raises(UserError, match=r"results\.json not found.*mixbits run"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text('{"format": "mixbits.jobs.sweep/1"}')
    with pytest.raises(ValueError, match="mixbits.results/1"):
        load_run(tmp_path)


def test_cli_writes_the_report_or_names_the_missing_file(plain_run, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["report", str(plain_run), "--no-verbose"])
    assert ok.exit_code == 0 and "report.html" in ok.output and (plain_run / "report.html").is_file()
    bad = runner.invoke(app, ["report", str(tmp_path / "nothing"), "--no-verbose"])
    assert bad.exit_code == 2 and "does not exist" in bad.output and "mixbits run" in bad.output


def comparison_summary(run_dirs):
    models = {}
    for name, run_dir in run_dirs.items():
        m = json.loads((run_dir / "results.json").read_text())["models"]
        models[name] = {
            "run_dir": str(run_dir), "parameters": 123456,
            "original": {"ppl": m["original"]["ppl"], "bytes_on_disk": m["original"]["bytes_on_disk"]},
            "mixed": {**{k: m["mixed"][k] for k in ("ppl", "kl", "bpw", "bytes_on_disk")},
                      "compression": m["original"]["bytes_on_disk"] / m["mixed"]["bytes_on_disk"]},
            "uniform": {k.removeprefix("uniform "): {f: v[f] for f in ("ppl", "kl", "bpw", "bytes_on_disk", "fits_budget")}
                        for k, v in m.items() if k.startswith("uniform ")}}
    return {"format": "mixbits.comparison/1", "config": {"allocation": {"target_bpw": 3.5}}, "models": models}


def test_comparison_report_tables_every_model(tiny_run, tiny_qat_run, tmp_path):
    folder = tmp_path / "compare"
    folder.mkdir()
    summary = comparison_summary({"tiny-a": tiny_run, "<tiny-b>": tiny_qat_run})
    (folder / "comparison_summary.json").write_text(json.dumps(summary))
    table = json.loads((tiny_run / "sensitivity.json").read_text())
    analysis = {"format": "mixbits.analysis/1", "model": "tiny-a", "config": {},
                "sensitivity": {"method": "fisher", "units": [u["name"] for u in table["units"]],
                                "scores": {"fisher_trace": [u["scores"]["fisher_trace"] for u in table["units"]]}},
                "plan": json.loads((tiny_run / "plan.json").read_text())["layers"], "results": {}, "timings_s": {}}
    (folder / "tiny-a_analysis.json").write_text(json.dumps(analysis))
    html = write_comparison_report(folder / "comparison_summary.json").read_text()
    assert_self_contained(html)
    assert {"Models", "Uniform baselines", "Sensitivity per model", "tiny-a"} <= headings(html)
    assert "&lt;tiny-b&gt;" in html and "<tiny-b>" not in html
    assert f"{summary['models']['tiny-a']['mixed']['ppl']:.2f}" in html and len(re.findall("<img ", html)) == 1
