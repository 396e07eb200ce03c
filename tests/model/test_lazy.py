import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixbits.errors import UserError
from mixbits.model.lazy import open_checkpoint
from tests.conftest import tiny_gpt2, tiny_llama


def save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    model = tiny_llama()
    path = save(model, tmp_path_factory.mktemp("sharded"), max_shard_size="100KB")
    return model, path


def devices(model, prefix=""):
    return {p.device.type for n, p in model.named_parameters(remove_duplicate=False) if n.startswith(prefix)}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_materialized_model_equals_the_saved_one(build, tmp_path):
    model = build()
    path = save(model, tmp_path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    ckpt = open_checkpoint(path)
    assert devices(ckpt.model) == {"meta"}
    full = ckpt.materialize("")
    assert full.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(full.state_dict()[k], v) for k, v in model.state_dict().items())
    assert full.get_output_embeddings().weight is full.get_input_embeddings().weight  # tied: held once
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(full(input_ids=ids).logits, model(input_ids=ids).logits)
    ckpt.release("")
    assert devices(ckpt.model) == {"meta"}


def test_one_block_at_a_time(sharded):
    model, path = sharded
    ckpt = open_checkpoint(path)
    with ckpt.block(1) as block:
        assert block is ckpt.model.model.layers[1]
        assert devices(ckpt.model, "model.layers.1.") == {"cpu"}
        assert devices(ckpt.model, "model.layers.0.") == {"meta"} and devices(ckpt.model, "lm_head") == {"meta"}
        assert torch.equal(block.mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
        held = sum(p.numel() * p.element_size() for p in block.parameters())
        assert ckpt.nbytes("model.layers.1") == held
    assert devices(ckpt.model) == {"meta"}
    with ckpt.resident():
        assert devices(ckpt.model, "model.layers.") == {"meta"}
        assert devices(ckpt.model, "model.norm") == {"cpu"} and devices(ckpt.model, "lm_head") == {"cpu"}
    assert ckpt.nbytes(None) == model.model.embed_tokens.weight.numel() * 4 + model.model.norm.weight.numel() * 4
    with pytest.raises(IndexError, match="blocks 0..1"):
        ckpt.block_prefix(2)


def test_bfloat16_checkpoint_is_read_in_the_compute_dtype(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    path = save(model, tmp_path)  # single file
    assert (path / "model.safetensors").is_file()
    ckpt = open_checkpoint(path)
    assert ckpt.checkpoint_dtype == torch.bfloat16 and ckpt.compute_dtype == torch.float32
    with ckpt.block(0) as block:
        weight = block.self_attn.q_proj.weight
        assert weight.dtype == torch.float32
        assert torch.equal(weight, model.model.layers[0].self_attn.q_proj.weight.float())
    assert open_checkpoint(path, compute_dtype=torch.bfloat16).nbytes("model.layers.0") * 2 == ckpt.nbytes("model.layers.0")


def test_missing_shard_is_named(sharded, tmp_path):
    _, path = sharded
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in path.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    victim = sorted(copy.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(UserError, match=f"{victim.name}.*re-download"):
        open_checkpoint(copy)


def test_missing_tensor_is_named(tmp_path):
    path = save(tiny_llama(), tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*full checkpoint"):
        open_checkpoint(path)


def test_config_and_weights_of_different_shapes_are_refused(tmp_path):
    path = save(tiny_llama(), tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"shape \[128, 64\].*\[96, 64\]"):
        open_checkpoint(path)


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        open_checkpoint(tmp_path)
    path = save(tiny_llama(), tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="holds no weights"):
        open_checkpoint(path)


def test_pickle_checkpoint_is_converted_once(tmp_path, caplog):
    model = tiny_llama()
    path = tmp_path / "pickled"
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")  # lm_head and embeddings share storage
    with caplog.at_level(logging.INFO, logger="mixbits.model.checkpoint_files"):
        ckpt = open_checkpoint(path, cache_dir=tmp_path / "cache")
    assert "converting the pickle checkpoint" in caplog.text
    assert len(list((tmp_path / "cache").glob("*/model.safetensors.index.json"))) == 1
    full = ckpt.materialize("")
    assert all(torch.equal(full.state_dict()[k], v) for k, v in model.state_dict().items())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mixbits.model.checkpoint_files"):
        open_checkpoint(path, cache_dir=tmp_path / "cache")
    assert "converting" not in caplog.text  # reused


class Payload:
    ran = False

    def __reduce__(self):
        return (_mark, ())


def _mark():
    Payload.ran = True
    return {}


def test_pickle_with_arbitrary_objects_is_never_unpickled(tmp_path):
    path = tmp_path / "evil"
    tiny_llama().config.save_pretrained(path)
    torch.save({"model.embed_tokens.weight": Payload()}, path / "pytorch_model.bin")
    with pytest.raises(UserError, match="weights-only loader"):
        open_checkpoint(path, cache_dir=tmp_path / "cache")
    assert not Payload.ran


def test_sharded_pickle_checkpoint(tmp_path):
    model = tiny_llama()
    path = tmp_path / "pickled"
    model.config.save_pretrained(path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = sorted(state)
    halves = {"pytorch_model-1.bin": names[: len(names) // 2], "pytorch_model-2.bin": names[len(names) // 2 :]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, path / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = open_checkpoint(path, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*/model-*.safetensors"))) == 2
    with ckpt.block(0) as block:
        assert torch.equal(block.self_attn.o_proj.weight, model.model.layers[0].self_attn.o_proj.weight)
    (path / "pytorch_model-2.bin").unlink()
    with pytest.raises(UserError, match="pytorch_model-2.bin.*re-download"):
        open_checkpoint(path, cache_dir=tmp_path / "other-cache")


def test_unreadable_index_is_named(sharded, tmp_path):
    _, path = sharded
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in path.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(UserError, match="weight_map"):
        open_checkpoint(copy)


def test_preloaded_checkpoint_reads_no_file_and_gives_the_same_tensors(sharded, monkeypatch):
    model, path = sharded
    ckpt = open_checkpoint(path, preload=True)
    assert ckpt.preloaded
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # the tied head: held once
    held = sum(t.numel() * t.element_size() for t in unique.values())
    assert ckpt.preload() == held  # every tensor the model needs, in its stored dtype
    import builtins

    def no_open(*args, **kwargs):
        raise AssertionError("a preloaded checkpoint opened a file")

    monkeypatch.setattr(builtins, "open", no_open)
    with ckpt.block(1) as block:
        assert torch.equal(block.mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
        block.mlp.down_proj.weight.data.zero_()  # a stage changing the module in place ...
    with ckpt.block(1) as block:  # ... never reaches the preloaded tensor
        assert torch.equal(block.mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    with ckpt.resident() as full:
        assert torch.equal(full.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_preloaded_bfloat16_embedding_is_held_without_a_copy(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    path = save(model, tmp_path)
    ckpt = open_checkpoint(path, preload=True)
    with ckpt.resident() as full:
        held = full.model.embed_tokens.weight
        assert held.dtype == torch.bfloat16 and torch.equal(held, model.model.embed_tokens.weight)
        assert held.data_ptr() in {t.data_ptr() for t in ckpt._ram.values()}  # the preloaded storage itself
    with ckpt.block(0) as block:  # blocks are cast copies
        assert block.self_attn.q_proj.weight.data_ptr() not in {t.data_ptr() for t in ckpt._ram.values()}


def test_preloaded_bfloat16_checkpoint_is_cast_like_a_read_one(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    path = save(model, tmp_path)
    read, held = open_checkpoint(path), open_checkpoint(path, preload=True)
    for ckpt in (read, held):
        with ckpt.block(0) as block:
            weight = block.self_attn.q_proj.weight
            assert weight.dtype == torch.float32
            assert torch.equal(weight, model.model.layers[0].self_attn.q_proj.weight.float())
    same = open_checkpoint(path, compute_dtype=torch.bfloat16, preload=True)
    with same.block(0) as block:
        block.self_attn.q_proj.weight.data.fill_(1.0)  # same dtype: a copy, not the preloaded tensor
    with same.block(0) as block:
        assert torch.equal(block.self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
