"""`mixbits run` streamed block by block against the whole-model reference (stream=False), in float32."""

import hashlib
import json
from dataclasses import replace

import pytest
import torch

from mixbits.config import AllocationConfig, DataConfig, RunConfig
from mixbits.errors import UserError
from mixbits.jobs import run_streamed
from mixbits.jobs.run_streamed import whole_model_reasons
from mixbits.pipeline import run
from tests.conftest import make_tokenizer, tiny_gpt2


def config(model_dir, text_file, out, quantizer, **kw):
    return RunConfig(model=str(model_dir), output_dir=out, device="cpu", quantizer=quantizer, use_cache=False,
                     data=DataConfig(dataset=str(text_file), seqlen=32, calib_windows=4, eval_windows=4),
                     allocation=AllocationConfig(target_bpw=3.5, group_sizes=(32, 64)), progress=False,
                     report=False, **kw)


def shards(folder):
    files = sorted((folder / "model").glob("*.safetensors"))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_same_run(streamed, whole, out_streamed, out_whole):
    assert json.loads((out_streamed / "plan.json").read_text()) == json.loads((out_whole / "plan.json").read_text())
    assert streamed["models"].keys() == whole["models"].keys() and len(whole["models"]) >= 3
    for name, want in whole["models"].items():
        got = streamed["models"][name]
        for field in ("ppl", "kl", "top1"):
            assert got[field] == pytest.approx(want[field], rel=1e-4, abs=1e-9), (name, field)
        assert got["bytes_on_disk"] == want["bytes_on_disk"], name  # cost-model sizes = bytes written
        assert got["bpw"] == want["bpw"]
    assert shards(out_streamed) == shards(out_whole)  # the same packed bytes, shard by shard


@pytest.mark.parametrize("quantizer", ["rtn", "clip", "gptq"])
def test_streamed_run_equals_the_whole_model_run(quantizer, tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    whole = run(config(tiny_model_dir, tiny_text_file, tmp_path / "whole", quantizer, stream=False))

    def no_whole_model(*args, **kwargs):
        raise AssertionError("the streamed run loaded the whole model")

    monkeypatch.setattr("mixbits.pipeline.load_model", no_whole_model)
    streamed = run(config(tiny_model_dir, tiny_text_file, tmp_path / "streamed", quantizer))
    assert_same_run(streamed, whole, tmp_path / "streamed", tmp_path / "whole")
    assert streamed["models"]["mixed"]["kl"] > 0
    assert json.loads((tmp_path / "streamed" / "sensitivity.json").read_text())["meta"]["streamed"] is True
    for stage in ("load", "data", "sensitivity", "allocate", "quantize", "evaluate", "save"):
        assert stage in streamed["timings_s"]
    layers, want = streamed["quantizer"]["mixed"]["layers"], whole["quantizer"]["mixed"]["layers"]
    assert layers.keys() == want.keys()
    for name, layer in layers.items():  # errors on the calibration inputs (None for rtn, which takes none)
        assert layer["spec"] == want[name]["spec"]
        assert layer["error"] == (None if want[name]["error"] is None else pytest.approx(want[name]["error"], rel=1e-6))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_text):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = make_tokenizer(tiny_text)
    tiny_gpt2().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_streamed_gpt2_equals_the_whole_model_run(gpt2_dir, tiny_text_file, tmp_path):
    whole = run(config(gpt2_dir, tiny_text_file, tmp_path / "whole", "gptq", stream=False))
    streamed = run(config(gpt2_dir, tiny_text_file, tmp_path / "streamed", "gptq"))
    assert_same_run(streamed, whole, tmp_path / "streamed", tmp_path / "whole")


class Killed(Exception):
    pass


def test_a_killed_run_resumes_from_its_last_finished_block(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    full = run(config(tiny_model_dir, tiny_text_file, tmp_path / "full", "gptq"))
    quantize = run_streamed.quantize_streamed

    def killed_after_block_0(source, plan, **kw):
        def after(i):
            if kw["name"] == "mixed" and i == 0:
                raise Killed
        return quantize(source, plan, after_block=after, **kw)

    monkeypatch.setattr(run_streamed, "quantize_streamed", killed_after_block_0)
    cfg = config(tiny_model_dir, tiny_text_file, tmp_path / "killed", "gptq")
    with pytest.raises(Killed):
        run(cfg)
    assert (tmp_path / "killed" / "model" / "model-block-00000.safetensors").is_file()
    assert not (tmp_path / "killed" / "model" / "model-block-00001.safetensors").exists()
    resumed_blocks = []

    def recording(source, plan, **kw):
        done = quantize(source, plan, **kw)
        if kw["name"] == "mixed":
            resumed_blocks.extend(done.resumed)
        return done

    monkeypatch.setattr(run_streamed, "quantize_streamed", recording)
    again = run(replace(cfg, resume=True))
    assert resumed_blocks == [0]
    assert shards(tmp_path / "killed") == shards(tmp_path / "full") and len(shards(tmp_path / "full")) == 3
    for name, want in full["models"].items():
        assert again["models"][name]["ppl"] == want["ppl"] and again["models"][name]["kl"] == want["kl"]


def test_a_resume_with_other_quantizer_settings_writes_every_block_again(tiny_model_dir, tiny_text_file, tmp_path,
                                                                          monkeypatch):
    from mixbits.quant.gptq import GPTQConfig

    quantize = run_streamed.quantize_streamed
    resumed_blocks, mixed_plans = [], []

    def killed_after_block_0(source, plan, **kw):
        if kw["name"] == "mixed":
            mixed_plans.append(plan.to_dict())

        def after(i):
            if kw["name"] == "mixed" and i == 0:
                raise Killed
        return quantize(source, plan, after_block=after, **kw)

    def recording(source, plan, **kw):
        done = quantize(source, plan, **kw)
        if kw["name"] == "mixed":
            resumed_blocks.extend(done.resumed)
            mixed_plans.append(plan.to_dict())
        return done

    cfg = config(tiny_model_dir, tiny_text_file, tmp_path / "killed", "gptq", damage="rtn")  # plan: Fisher alone
    monkeypatch.setattr(run_streamed, "quantize_streamed", killed_after_block_0)
    with pytest.raises(Killed):
        run(cfg)
    monkeypatch.setattr(run_streamed, "quantize_streamed", recording)
    run(replace(cfg, resume=True, gptq=GPTQConfig(damp=0.05)))
    assert len(mixed_plans) == 2 and mixed_plans[0] == mixed_plans[1]  # the same plan, other quantizer settings
    assert resumed_blocks == []  # block 0 of the first settings is not trusted


def test_writer_provenance_names_what_the_blocks_depend_on():
    from mixbits.quant.gptq import GPTQConfig

    cfg, calib = RunConfig(model="m", quantizer="gptq"), torch.arange(64).reshape(2, 32)
    base = run_streamed.writer_provenance(cfg, calib)
    for changed in (replace(cfg, model="other"), replace(cfg, quantizer="clip"),
                    replace(cfg, gptq=GPTQConfig(damp=0.1)), replace(cfg, compute_dtype="float32")):
        assert run_streamed.writer_provenance(changed, calib) != base
    assert run_streamed.writer_provenance(cfg, calib + 1) != base
    rtn = replace(cfg, quantizer="rtn")
    assert run_streamed.writer_provenance(rtn, calib) == run_streamed.writer_provenance(rtn, calib + 1)


def test_modes_that_need_the_whole_model_are_named():
    from mixbits.config import IterativeConfig

    assert whole_model_reasons(RunConfig(model="x")) == []
    assert whole_model_reasons(RunConfig(model="x", tasks=("piqa",))) == []  # zero-shot: accelerate places the models
    assert whole_model_reasons(RunConfig(model="x", iterative=IterativeConfig())) == ["--iterative"]


def test_the_streamed_and_whole_runs_share_the_sensitivity_cache(tiny_model_dir, tiny_text_file, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("MIXBITS_CACHE_DIR", str(tmp_path / "cache"))  # empty: the whole run computes, streamed reads
    whole = run(replace(config(tiny_model_dir, tiny_text_file, tmp_path / "whole", "rtn", stream=False),
                        use_cache=True))
    streamed = run(replace(config(tiny_model_dir, tiny_text_file, tmp_path / "streamed", "rtn"), use_cache=True))
    assert json.loads((tmp_path / "streamed" / "sensitivity.json").read_text())["meta"].get("streamed") is None
    assert streamed["models"]["mixed"]["ppl"] == pytest.approx(whole["models"]["mixed"]["ppl"], rel=1e-4)


def test_a_budget_below_one_block_is_refused_before_any_weight_is_read(tiny_model_dir, tiny_text_file, tmp_path,
                                                                        monkeypatch):
    from mixbits.errors import UserError
    from mixbits.model.lazy import LazyCheckpoint

    def no_read(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(LazyCheckpoint, "materialize", no_read)
    with pytest.raises(UserError, match="too small for one block"):
        run(config(tiny_model_dir, tiny_text_file, tmp_path / "out", "rtn", max_memory="cpu=1KiB"))


def test_fisher_boundaries_on_disk_give_the_same_plan(tiny_model_dir, tiny_text_file, tmp_path):
    in_memory = run(config(tiny_model_dir, tiny_text_file, tmp_path / "memory", "rtn"))
    on_disk = run(config(tiny_model_dir, tiny_text_file, tmp_path / "disk", "rtn", offload_dir=tmp_path / "offload"))
    assert (json.loads((tmp_path / "disk" / "plan.json").read_text())
            == json.loads((tmp_path / "memory" / "plan.json").read_text()))
    assert on_disk["models"]["mixed"]["ppl"] == in_memory["models"]["mixed"]["ppl"]
    assert list((tmp_path / "offload").iterdir()) == []  # the run's boundary files are removed


@pytest.mark.parametrize("tied", [True, False])
def test_fixed_bytes_of_a_meta_skeleton_equal_the_loaded_models(tied, tmp_path):
    from transformers import AutoModelForCausalLM

    from mixbits.model.arch import find_linears, fixed_bytes_of
    from mixbits.model.lazy import open_checkpoint
    from tests.conftest import tiny_llama

    model = tiny_llama()
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    shapes = {n: (i.out_features, i.in_features) for n, i in find_linears(loaded).items()}
    lazy = open_checkpoint(tmp_path)
    embeddings = 256 * 64 * 2
    norms = (2 * 2 + 1) * 64 * 2
    assert fixed_bytes_of(lazy.model, shapes) == fixed_bytes_of(loaded, shapes) == embeddings * (1 if tied else 2) + norms


def test_a_preloaded_checkpoint_gives_the_same_run(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    from mixbits.model.checkpoint_files import checkpoint_tensors, read_tensor

    reads = []  # lazy.py reads every tensor through the read_tensor it imported
    monkeypatch.setattr("mixbits.model.lazy.read_tensor",
                        lambda handle, entry: reads.append(entry) or read_tensor(handle, entry))
    read = run(config(tiny_model_dir, tiny_text_file, tmp_path / "read", "rtn"))
    passes, reads[:] = len(reads), []
    held = run(config(tiny_model_dir, tiny_text_file, tmp_path / "held", "rtn", preload=True))
    assert_same_run(held, read, tmp_path / "held", tmp_path / "read")
    tensors = len(checkpoint_tensors(tiny_model_dir))
    assert passes > 2 * tensors and len(reads) <= tensors  # read once at the preload, every pass cast from RAM
    with pytest.raises(UserError, match="drop --preload or --no-stream"):
        config(tiny_model_dir, tiny_text_file, tmp_path / "x", "rtn", preload=True, stream=False)
