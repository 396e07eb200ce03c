"""mixbits.quantize / QuantizedModel / mixbits.load, called as a notebook user would, on the tiny random Llama."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mixbits
from mixbits.errors import UserError

TINY = dict(quantizer="rtn", seqlen=32, calib_windows=4, group_sizes=(32, 64), device="cpu", progress=False)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Computed caches go to a temporary MIXBITS_HOME, so each run tests the code, not the cache."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("mixbits-home")
        mp.setenv("MIXBITS_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def quantized(home, hf, tiny_text_file):
    model, tokenizer = hf
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qm = mixbits.quantize(model, tokenizer=tokenizer, target_bpw=3.5, calibration=str(tiny_text_file), **TINY)
    return qm, before


def test_quantize_a_loaded_model_meets_the_budget_and_leaves_the_original(quantized, hf):
    qm, before = quantized
    model, _ = hf
    assert isinstance(qm, mixbits.QuantizedModel)
    assert len(qm.shapes) == 14 and set(qm.plan.specs) <= set(qm.shapes)
    assert 3.0 < qm.bits_per_weight <= 3.5 + 1e-9
    assert qm.info["quantizer"] == "rtn" and qm.info["budget"] == "3.5 bpw"
    assert qm.original is model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    name = "model.layers.0.mlp.down_proj"
    assert not torch.equal(qm.model.get_submodule(name).weight, model.get_submodule(name).weight)
    ids = torch.randint(0, 200, (1, 12))
    out = qm.model.generate(ids, max_new_tokens=4, do_sample=False)  # the quantized model is a transformers model
    assert out.shape == (1, 16)


def test_evaluate_reports_perplexity_kl_and_top1_against_the_original(quantized, tiny_text_file):
    qm, _ = quantized
    r = qm.evaluate(str(tiny_text_file), max_windows=4)
    assert r["windows"] == 4 and r["seqlen"] == 32 and r["tokens"] == 4 * 31
    assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and r["kl"] > 0 and 0 <= r["top1"] <= 1
    assert r["ppl"] != r["original_ppl"] and math.isfinite(r["original_ppl"])
    windows = torch.randint(0, 200, (3, 16))
    again = qm.evaluate(windows)
    assert again["windows"] == 3 and again["seqlen"] == 16 and again["kl"] > 0


def test_save_native_and_load_give_the_same_logits_and_plan(quantized, tmp_path):
    qm, _ = quantized
    path = qm.save(tmp_path / "model")
    assert (path / "model.safetensors.index.json").is_file() and (path / "mixbits.json").is_file()
    back = mixbits.load(path)
    assert back.plan.specs == qm.plan.specs and back.bits_per_weight == pytest.approx(qm.bits_per_weight)
    assert back.original is None and back.tokenizer is not None
    ids = torch.randint(0, 200, (2, 24))
    with torch.no_grad():
        assert torch.allclose(back.model(input_ids=ids).logits, qm.model(input_ids=ids).logits, atol=1e-5)
    r = back.evaluate(torch.randint(0, 200, (2, 16)))
    assert math.isfinite(r["ppl"]) and r["kl"] is None and r["original_ppl"] is None


def test_export_to_gptq_with_nearest_and_a_loaded_model_saves_again(quantized, tmp_path):
    qm, _ = quantized
    path = qm.save(tmp_path / "gptq", format="gptq", nearest=True)
    assert list(path.glob("*.safetensors")) and (path / "config.json").is_file()
    back = mixbits.load(qm.save(tmp_path / "model"))
    again = mixbits.load(back.save(tmp_path / "again"))
    ids = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, back.model(input_ids=ids).logits)
    with pytest.raises(UserError, match="original"):  # nearest re-quantizes changed layers from the original
        back.save(tmp_path / "gptq2", format="gptq", nearest=True)


def test_a_folder_path_and_a_document_list_give_the_loaded_models_plan(home, tiny_model_dir, tiny_text_file, hf):
    from mixbits.data.text import load_text

    docs = load_text(str(tiny_text_file), "calibration")
    by_path = mixbits.quantize(str(tiny_model_dir), target_bpw=3.5, calibration=docs, **TINY)
    model, tokenizer = hf
    by_object = mixbits.quantize(model, tokenizer=tokenizer, target_bpw=3.5, calibration=docs, **TINY)
    assert by_path.plan.specs == by_object.plan.specs
    assert by_path.info["model"] == str(tiny_model_dir)
    assert by_path.bits_per_weight <= 3.5 + 1e-9


def test_a_size_budget_and_token_windows(home, hf):
    model, _ = hf
    windows = torch.randint(0, 200, (4, 32))
    qm = mixbits.quantize(model, target_size_mb=0.1, calibration=windows, **TINY)  # no tokenizer: windows given
    assert qm.info["budget"] == "0.1 MB" and qm.seqlen == 32
    assert qm.info["calibration"]["windows"] == 4 and qm.info["calibration"]["source"] == "Tensor"
    assert qm.plan.storage_bytes(qm.shapes) < 0.1e6 and 3.5 < qm.bits_per_weight < 16


@pytest.mark.parametrize("kwargs, named", [
    (dict(quantizer="awq"), "quantizer='awq'"),
    (dict(target_bpw=3.5, target_size_mb=1.0), "target_bpw=3.5"),
    (dict(target_bpw=-1.0), "target_bpw=-1.0"),
    (dict(seqlen=4), "seqlen=4"),
    (dict(calibration=42), "calibration="),
    (dict(calibration="no-such-text"), "calibration='no-such-text'"),
    (dict(calibration=torch.zeros(4, 32)), "calibration= token windows"),
])
def test_bad_arguments_raise_user_error_naming_the_argument(hf, kwargs, named):
    model, tokenizer = hf
    args = dict(TINY, tokenizer=tokenizer, **{"target_bpw": 3.5} | kwargs)
    with pytest.raises(UserError, match=named.replace("(", r"\(").replace("[", r"\[")):
        mixbits.quantize(model, **args)


def test_a_loaded_model_without_tokenizer_or_a_bad_model_is_a_user_error(hf, tiny_model_dir, tmp_path):
    model, tokenizer = hf
    with pytest.raises(UserError, match="tokenizer="):
        mixbits.quantize(model, target_bpw=3.5, **TINY)
    with pytest.raises(UserError, match="tokenizer="):
        mixbits.quantize(str(tiny_model_dir), tokenizer=tokenizer, target_bpw=3.5, **TINY)
    with pytest.raises(UserError, match="model= must be"):
        mixbits.quantize(42, target_bpw=3.5, **TINY)
    with pytest.raises(UserError, match="path=.*no mixbits.json"):
        mixbits.load(tmp_path)


def test_save_refuses_an_unknown_format(quantized, tmp_path):
    qm, _ = quantized
    with pytest.raises(UserError, match="format='onnx'"):
        qm.save(tmp_path / "x", format="onnx")
    assert not (tmp_path / "x").exists()


def test_import_mixbits_is_cheap():
    import subprocess
    import sys

    code = "import sys, mixbits; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
