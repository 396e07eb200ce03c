"""bench/quality.py end to end in --quick mode (a tiny random Llama), so the script cannot rot.

Nothing about quality or time is asserted: the test checks that every requested row is there and
ran, that its perplexities are finite, that a mixbits row's bytes and bpw are those of the plan it
saved, and that a rerun measures nothing again. The llama.cpp rows and the `mixbits-gguf` rows
(mixbits' GGUF file at each llama.cpp preset's bytes, run in llama.cpp) join only where
llama-cpp-python imports and llama.cpp's tools are already built (CI has neither); the part of
`mixbits-gguf` that needs no llama.cpp (plan at a file size, quantize, write, bytes) runs everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from tests.bench import load_bench_script

MIXBITS_ARMS = ("uniform-rtn", "optimal-rtn", "heuristics")


def _llamacpp_ready() -> bool:
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    from quality_llamacpp import tools
    from quality_rows import NotRun

    try:
        tools(build=False)
    except NotRun:
        return False
    return True


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    quality = load_bench_script("quality")
    arms = MIXBITS_ARMS + (("llamacpp", "llamacpp-imatrix", "mixbits-gguf") if _llamacpp_ready() else ())
    out = tmp_path_factory.mktemp("quality")
    argv = ["--quick", "--out", str(out), "--arms", ",".join(arms), "--no-build-llamacpp"]
    return quality, quality.main(argv), out, argv, arms


def test_every_requested_arm_has_rows_that_ran(quick):
    _, data, out, _, arms = quick
    rows = data["rows"].values()
    assert {r["arm"] for r in rows} >= set(arms)
    assert all(r["status"] == "ok" for r in rows), [(r["label"], r["status"]) for r in rows if r["status"] != "ok"]
    assert {r["label"] for r in rows if r["arm"] == "optimal-rtn"} == {"2.5 bpw", "3.5 bpw", "4.5 bpw"}
    assert (out / "quality.md").read_text().count("## Every row on `") == 2 and (out / "quality.png").stat().st_size > 0


def test_every_row_has_a_finite_perplexity_on_both_domains(quick):
    _, data, _, _, _ = quick
    domains = set(data["meta"]["windows"])
    assert len(domains) == 2 and set(data["meta"]["original"]) == domains
    for r in data["rows"].values():
        assert set(r["domains"]) == domains, r["label"]
        for d in r["domains"].values():
            assert math.isfinite(d["ppl"]) and d["ppl"] > 1 and d["kl"] >= -1e-6, r["label"]


def test_bytes_and_bpw_are_those_of_the_saved_plan(quick):
    _, data, out, _, _ = quick
    from mixbits.model.arch import find_linears
    from mixbits.model.load import load_model
    from mixbits.plan import Plan

    model, _ = load_model(str(out / "quick-data" / "tiny-llama"))
    shapes = {n: (i.out_features, i.in_features) for n, i in find_linears(model).items()}
    n_weights = sum(o * i for o, i in shapes.values())
    for r in data["rows"].values():
        assert r["bpw"] == pytest.approx(8 * r["linear_bytes"] / n_weights), r["label"]
        if r["arm"] in MIXBITS_ARMS:
            plan = Plan.load(out / r["plan_file"])
            assert r["linear_bytes"] == plan.storage_bytes(shapes), r["label"]
            assert sum(r["plan"].values()) == len(shapes)
        if r["arm"] == "optimal-rtn":
            assert r["bpw"] <= r["settings"]["budget_bpw"] + 1e-9
        if r["arm"] == "mixbits-gguf":  # the whole file at or below the preset's, exactly as predicted
            preset = data["rows"][r["settings"]["matches"]]
            assert r["file_bytes"] == r["predicted_file_bytes"] <= r["target_file_bytes"] == preset["file_bytes"]


def test_a_rerun_measures_nothing_again(quick):
    quality, data, _, argv, _ = quick
    again = quality.main(argv)
    assert again["rows"] == json.loads(json.dumps(data["rows"]))


def test_gguf_report_pairs_each_mixbits_file_with_its_preset(quick):
    _, data, out, _, arms = quick
    text = (out / "quality.md").read_text()
    assert ("## GGUF files at equal size" in text) == ("mixbits-gguf" in arms)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The --quick bench (tiny Llama with rows of 256 and 512, its calibration windows), no rows run."""
    quality = load_bench_script("quality")
    args = quality.parse_args(["--quick", "--out", str(tmp_path_factory.mktemp("gguf"))])
    quality.apply_quick(args)
    return quality.setup(args)


def _uniform_file(bench, spec) -> int:
    from mixbits.export.gguf_size import gguf_size, gguf_weight_bytes, meta_model

    import quality_gguf

    size = gguf_size(meta_model(bench.p.model.config), bench.p.tokenizer, tokenizer_pre=quality_gguf.pre(bench))
    return size.fixed + sum(gguf_weight_bytes(s, spec) for s in bench.p.shapes.values())


def test_gguf_file_at_a_size_is_written_at_or_below_it_with_every_planned_type(bench):
    """Without llama.cpp: the arm's plan at a file size between all-Q3_K and all-Q5_K, quantized with
    importance on the ggml grids, written; its bytes are the prediction and at most the target, and
    every block linear of the file holds the type the plan gave it."""
    import gguf
    import quality_gguf
    from mixbits.quant.spec import GGML_TYPES

    target = (_uniform_file(bench, GGML_TYPES["Q3_K"]) + _uniform_file(bench, GGML_TYPES["Q5_K"])) // 2
    made = quality_gguf.solve(bench, target, "clip")
    assert made.path.stat().st_size == made.predicted_bytes <= target
    assert made.plan.meta["gguf"]["target_bytes"] == target
    assert len({s.label for s in made.plan.specs.values()}) > 1, "a mixed plan between two uniform files"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(made.path).tensors}
    assert {gguf_name(n): s.label.upper() for n, s in made.plan.specs.items()} == \
        {n: t for n, t in types.items() if n.startswith("blk.") and n.split(".")[2] in SHORT.values()}
    again = quality_gguf.solve(bench, target, "clip")
    assert again.path == made.path and again.seconds == 0.0


def test_gguf_file_trained_with_block_ap_holds_the_trained_weights_at_the_same_bytes(bench):
    """`--gguf-quantizer blockap-clip`: the same plan as clip's at that size, trained on its ggml grids; the
    file has the same bytes and its tensors differ from clip's (training moved codes or scales)."""
    import gguf
    import quality_gguf
    from gguf.quants import dequantize
    from mixbits.quant.spec import GGML_TYPES

    target = (_uniform_file(bench, GGML_TYPES["Q3_K"]) + _uniform_file(bench, GGML_TYPES["Q5_K"])) // 2
    clip, trained = (quality_gguf.solve(bench, target, q) for q in ("clip", "blockap-clip"))
    assert dict(trained.plan.specs) == dict(clip.plan.specs)
    assert trained.path.stat().st_size == clip.path.stat().st_size == trained.predicted_bytes <= target
    read = [{t.name: dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(m.path).tensors} for m in (clip, trained)]
    layers = [gguf_name(n) for n in clip.plan.specs]
    assert sum(not (read[0][n] == read[1][n]).all() for n in layers) > len(layers) // 2


SHORT = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
         "up_proj": "ffn_up", "down_proj": "ffn_down"}


def gguf_name(layer: str) -> str:
    """model.layers.3.mlp.down_proj -> blk.3.ffn_down.weight"""
    return f"blk.{layer.split('.')[2]}.{SHORT[layer.rsplit('.', 1)[1]]}.weight"


def test_gguf_target_below_the_smallest_file_is_not_run_naming_it(bench):
    import quality_gguf
    from quality_rows import NotRun
    from mixbits.quant.spec import GGML_TYPES

    smallest = _uniform_file(bench, GGML_TYPES["Q2_K"])
    with pytest.raises(NotRun, match="smallest GGUF file is"):
        quality_gguf.budget(bench, smallest - 1)
