"""The sharded native format: exact round trips, resume after a crash (byte-identical shards), a
damaged shard redone, sizes from shapes equal to the bytes on disk, the first single-file layout
still read, and exports streamed from a folder equal to exports of the model in memory."""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import weakref

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mixbits.errors import UserError
from mixbits.export import compressed, gguf, gptq, native_shards
from mixbits.export.from_native import load_for_export, model_source, stored_source
from mixbits.export.native import (
    LEGACY_FORMAT, WEIGHTS, _block_tensors, load_native, model_tensors, native_size_bytes, open_native, save_native,
)
from mixbits.export.native_shards import INDEX, REST, NativeWriter, block_file, native_size_of
from mixbits.export.streamed import export_stored
from mixbits.model.apply import layer_shapes, round_to_storage
from mixbits.model.arch import find_blocks, get_bias, get_weight
from mixbits.plan import Plan
from mixbits.quant.packed import packed_tensors
from mixbits.quant.qlinear import QuantLinear
from mixbits.quant.spec import QuantSpec
from tests.conftest import make_text, make_tokenizer, tiny_gpt2

L = "model.layers."


def llama(blocks: int = 3, bias: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=blocks,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, attention_bias=bias)
    return LlamaForCausalLM(cfg).eval()


def mixed_plan(blocks: int = 3) -> Plan:
    """Asymmetric and symmetric, 4/8 bits, groups 32/64 and kept layers; storable by gptq, compressed, gguf."""
    labels = {}
    for i in range(blocks):
        labels.update({f"{L}{i}.self_attn.{p}": "w4g32" for p in ("q_proj", "k_proj", "v_proj")})
        labels.update({f"{L}{i}.mlp.{p}": "w4g64s" for p in ("gate_proj", "up_proj")})
        labels[f"{L}{i}.self_attn.o_proj"] = "w8g32s" if i % 2 else "fp16"
        labels[f"{L}{i}.mlp.down_proj"] = "w8g64s"
    return Plan({n: QuantSpec.parse(s) for n, s in labels.items()})


def shard_hashes(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def reference(model, plan):
    """The model the native folder must reload to: planned layers packed, other tensors fp16-rounded."""
    ref = copy.deepcopy(model)
    for name, spec in plan.quantized().items():
        module = ref.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, QuantLinear.from_weight(get_weight(module), get_bias(module), spec))
    round_to_storage(ref, plan)
    return ref


@pytest.mark.parametrize("make", [lambda: llama(bias=True), tiny_gpt2], ids=["llama-bias", "gpt2"])
def test_round_trip_is_exact(make, tmp_path):
    model = make()
    plan = mixed_plan() if model.config.model_type == "llama" else Plan.uniform(layer_shapes(model), QuantSpec(4, 32))
    written = save_native(model, plan, tmp_path / "m")
    on_disk = sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors"))
    assert written == native_size_bytes(model, plan) == on_disk
    loaded, ref = load_native(tmp_path / "m"), reference(model, plan)
    for name in plan.quantized():
        want = packed_tensors(name, get_weight(model.get_submodule(name)), plan.specs[name],
                              bias=get_bias(model.get_submodule(name)))
        got = loaded.get_submodule(name).state_dict()
        assert set(want) == {f"{name}.{k}" for k in got}
        assert all(torch.equal(got[k.rpartition(".")[2]], v) for k, v in want.items())
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref(input_ids=ids).logits)
    index = json.loads((tmp_path / "m" / INDEX).read_text())["weight_map"]
    assert set(index.values()) == {block_file(i) for i in range(len(find_blocks(model)[1]))} | {REST}


def write_model(writer: NativeWriter, model, plan, blocks) -> None:
    tensors, tied = model_tensors(model)
    path = find_blocks(model)[0]
    for i in blocks:
        writer.write_block(i, _block_tensors(model, plan, {}, tensors, path, i))
    writer.write_rest({k: v for k, v in tensors.items() if not k.startswith(path + ".")}, tied)


def test_a_writer_interrupted_after_block_k_resumes_to_identical_shards(tmp_path, monkeypatch):
    model, plan, tok = llama(blocks=4), mixed_plan(4), make_tokenizer(make_text(10))
    save_native(model, plan, tmp_path / "whole", tok)
    out = tmp_path / "run" / "model"
    real = native_shards.write_shard

    def crash_on_block_2(path, tensors, metadata=None):
        if path.name == block_file(2):
            raise KeyboardInterrupt("killed while writing block 2")
        return real(path, tensors, metadata)

    monkeypatch.setattr(native_shards, "write_shard", crash_on_block_2)
    with pytest.raises(KeyboardInterrupt):
        write_model(NativeWriter(out, plan, model.config, tok), model, plan, range(4))
    monkeypatch.setattr(native_shards, "write_shard", real)
    assert not list(out.glob(".*mixbits-tmp"))  # the half-written shard left nothing behind
    again = NativeWriter(out, plan, model.config, tok)
    assert again.done_blocks() == {0, 1} and not again.rest_done()
    write_model(again, model, plan, sorted(set(range(4)) - again.done_blocks()))
    again.finish()
    assert shard_hashes(out) == shard_hashes(tmp_path / "whole") and len(shard_hashes(out)) == 5
    assert json.loads((out / INDEX).read_text()) == json.loads((tmp_path / "whole" / INDEX).read_text())
    assert torch.equal(again.read_block(3)[f"{L}3.mlp.down_proj.qweight"],
                       open_native(out).block(3)[f"{L}3.mlp.down_proj.qweight"])


def test_a_truncated_or_unlisted_shard_is_redone(tmp_path):
    model, plan = llama(), mixed_plan()
    out = tmp_path / "m"
    write_model(NativeWriter(out, plan, model.config), model, plan, range(3))
    shard = out / block_file(1)
    shard.write_bytes(shard.read_bytes()[:-100])  # a copy cut short, or a disk that lost the tail
    progress = json.loads((out / "progress.json").read_text())
    del progress["shards"][block_file(2)]  # killed after the shard landed, before progress listed it
    (out / "progress.json").write_text(json.dumps(progress))
    writer = NativeWriter(out, plan, model.config)
    assert writer.done_blocks() == {0} and writer.rest_done()
    with pytest.raises(RuntimeError, match=r"blocks \[1, 2\]"):
        writer.finish()
    assert NativeWriter(out, Plan({}), model.config, block_path="model.layers").done_blocks() == set()  # another plan
    assert NativeWriter(out, plan, model.config, provenance={"quantizer": "gptq"}).done_blocks() == set()
    write_model(writer, model, plan, [1, 2])
    writer.finish()
    save_native(model, plan, tmp_path / "whole")
    assert shard_hashes(out) == shard_hashes(tmp_path / "whole")


def test_loading_a_folder_with_a_truncated_shard_names_the_shard(tmp_path):
    model, plan = llama(), mixed_plan()
    save_native(model, plan, tmp_path / "m")
    shard = tmp_path / "m" / block_file(1)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{block_file(1)}.*truncated"):
        load_native(tmp_path / "m")


def test_writer_refuses_packed_layers_given_as_weights_and_foreign_folders(tmp_path):
    model, plan = llama(), mixed_plan()
    tensors, _ = model_tensors(model)
    writer = NativeWriter(tmp_path / "m", plan, model.config)
    with pytest.raises(ValueError, match="self_attn.q_proj is quantized"):
        writer.write_block(0, {k: v for k, v in tensors.items() if k.startswith(f"{L}0.")})
    with pytest.raises(ValueError, match="outside"):
        writer.write_block(0, {"model.norm.weight": tensors["model.norm.weight"]})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(UserError, match="notes.txt"):
        NativeWriter(tmp_path / "mine", plan, model.config)


PLANS = {
    "mixed": lambda m: mixed_plan(),
    "uniform": lambda m: Plan.uniform(layer_shapes(m), QuantSpec(3, 64)),
    "keep-all": lambda m: Plan({}),
    "per-channel asym": lambda m: Plan.uniform(layer_shapes(m), QuantSpec(5, None)),
}


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("which", list(PLANS))
def test_sizes_from_shapes_equal_the_bytes_on_disk(which, bias, tmp_path):
    model = llama(bias=bias)
    plan = PLANS[which](model)
    predicted = native_size_bytes(model, plan)
    written = save_native(model, plan, tmp_path / "m")
    on_disk = sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors"))
    assert predicted == written == on_disk
    with init_empty_weights():  # what a streamed run has: shapes only, no storage
        skeleton = AutoModelForCausalLM.from_config(model.config)
    state = {k: v for k, v in skeleton.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    assert native_size_of(layer_shapes(skeleton), plan, state) == on_disk


def legacy_folder(model, plan, path, tokenizer=None):
    """A folder as mixbits wrote it before the sharded layout: one model.safetensors."""
    path.mkdir(parents=True)
    tensors, tied = model_tensors(model)
    flat = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    for name, spec in plan.quantized().items():
        module = model.get_submodule(name)
        flat.pop(f"{name}.weight"), flat.pop(f"{name}.bias", None)
        flat.update(packed_tensors(name, get_weight(module), spec, bias=get_bias(module)))
    save_file(flat, str(path / WEIGHTS), metadata={"format": LEGACY_FORMAT})
    (path / "mixbits.json").write_text(json.dumps({"format": LEGACY_FORMAT, "plan": plan.to_dict(), "tied": tied}))
    model.config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def test_the_single_file_layout_is_still_read(tmp_path):
    model, plan = llama(bias=True), mixed_plan()
    legacy_folder(model, plan, tmp_path / "v1")
    save_native(model, plan, tmp_path / "v2")
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(load_native(tmp_path / "v1")(input_ids=ids).logits,
                           load_native(tmp_path / "v2")(input_ids=ids).logits)
    v1, v2 = load_for_export(tmp_path / "v1"), load_for_export(tmp_path / "v2")
    assert all(torch.equal(a, b) for a, b in zip(v1.model.state_dict().values(), v2.model.state_dict().values()))
    assert open_native(tmp_path / "v1").block(1).keys() == open_native(tmp_path / "v2").block(1).keys()


@pytest.mark.parametrize("fmt", ["gptq", "compressed", "gguf", "native"])
def test_streamed_exports_equal_the_in_memory_exports(fmt, tmp_path):
    model, plan, tok = llama(), mixed_plan(), make_tokenizer(make_text(10))
    legacy_folder(model, plan, tmp_path / "v1", tok)
    save_native(model, plan, tmp_path / "v2", tok)
    written = {name: export_stored(src, tmp_path / name / "out", fmt) for name, src in [
        ("memory", model_source(model, plan, tokenizer=tok)), ("v1", stored_source(tmp_path / "v1")),
        ("v2", stored_source(tmp_path / "v2"))]}
    weights = {"gguf": lambda p: [p], "native": lambda p: sorted(p.glob("*.safetensors"))}.get(
        fmt, lambda p: [p / "model.safetensors"])
    contents = {name: [f.read_bytes() for f in weights(path)] for name, path in written.items()}
    assert contents["memory"] == contents["v1"] == contents["v2"]


@pytest.mark.parametrize("fmt", ["gptq", "compressed", "gguf", "native"])
def test_exports_hold_one_block_at_a_time(fmt, tmp_path):
    model, plan = llama(blocks=4), mixed_plan(4)
    save_native(model, plan, tmp_path / "run")
    source = stored_source(tmp_path / "run")
    alive, read = [], source.read

    def watched(part):
        gc.collect()
        assert not [r for r in alive if r() is not None], f"a part was still held when {part} was read"
        got = read(part)
        alive.extend(weakref.ref(t) for t in [*got.plain.values(), *(x.codes for x in got.layers.values())])
        return got

    object.__setattr__(source, "read", watched)
    export_stored(source, tmp_path / "out", fmt)
    assert len(alive) > 4 * 7


def test_writers_from_a_model_keep_their_signature(tmp_path):
    model, plan = llama(), mixed_plan()
    a = gptq.write_gptq(model, plan, tmp_path / "a")
    b = export_stored(model_source(model, plan), tmp_path / "b", "gptq")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert compressed.write_compressed(model, plan, tmp_path / "c").is_dir()
    assert gguf.write_gguf(model, plan, tmp_path / "d.gguf").is_file()


def test_a_missing_shard_is_named(tmp_path):
    model, plan = llama(), mixed_plan()
    save_native(model, plan, tmp_path / "m")
    (tmp_path / "m" / block_file(1)).unlink()
    with pytest.raises(UserError, match=f"{block_file(1)}.*missing"):
        load_native(tmp_path / "m")


@pytest.mark.parametrize("fmt", ["gguf", "native"])
def test_cli_export_streams_the_run_folder(fmt, tmp_path):
    from typer.testing import CliRunner

    from mixbits.cli import app

    model, plan, tok = llama(), mixed_plan(), make_tokenizer(make_text(10))
    save_native(model, plan, tmp_path / "run" / "model", tok)
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "native")
    r = CliRunner().invoke(app, ["export", "--format", fmt, "--run-dir", str(tmp_path / "run"), "--out", str(out),
                                 "--no-verbose"])
    assert r.exit_code == 0, r.output
    want = export_stored(model_source(model, plan, tokenizer=tok), tmp_path / "want" / out.name, fmt)
    if fmt == "gguf":
        assert out.read_bytes() == want.read_bytes()
    else:
        assert shard_hashes(out) == shard_hashes(want) == shard_hashes(tmp_path / "run" / "model")


def test_the_writer_lives_in_a_claimed_run_folder(tmp_path):
    from mixbits.outdir import claim, files_under, read_manifest

    model, plan = llama(), mixed_plan()
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), claim(run, "run", command="mixbits run"):
        writer = NativeWriter(run / "model", plan, model.config)
        write_model(writer, model, plan, [0, 1])
        raise KeyboardInterrupt  # killed during block 2
    assert read_manifest(run / "model").finished is None
    with claim(run, "run", resume=True, command="mixbits run"):
        writer = NativeWriter(run / "model", plan, model.config)
        assert writer.done_blocks() == {0, 1}
        write_model(writer, model, plan, [2])
        writer.finish()
    listed = set(read_manifest(run).files)
    assert {f"model/{f}" for f in files_under(run / "model")} <= listed | {"model/.mixbits-manifest.json"}
    assert set(read_manifest(run / "model").files) >= {block_file(2), INDEX, "mixbits.json", "config.json"}
    (run / "model" / "notes.txt").write_text("a user's file")
    with claim(run, "run", overwrite=True, command="mixbits run"):
        assert [f for f in files_under(run / "model") if not f.startswith(".")] == ["notes.txt"]
