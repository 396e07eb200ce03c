import numpy as np
import pytest
import torch

from mixbits.model.arch import find_linears
from mixbits.model.lazy import open_checkpoint
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.fisher import empirical_fisher, fisher_table
from mixbits.sensitivity.fisher_streamed import fisher_by_block, streamed_fisher, streamed_fisher_table
from tests.conftest import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")
CONFIGS = (QuantSpec(2, 32), QuantSpec(4, 64), KEEP)


def windows(n=3, seqlen=16):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


def assert_same_fisher(streamed, reference):
    assert streamed.keys() == reference.keys()
    for name, ref in reference.items():
        assert streamed[name].dtype == torch.float32 and streamed[name].shape == ref.shape, name
        assert torch.allclose(streamed[name], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())), name


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_streamed_fisher_equals_full_model_fisher(build):
    model = build()
    linears = find_linears(model)
    reference = empirical_fisher(model, windows(), linears, device=CPU, progress=False)
    streamed = streamed_fisher(model, windows(), linears, device=CPU, progress=False)
    assert_same_fisher(streamed, reference)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_lazy_checkpoint_gives_the_same_table_one_block_at_a_time(build, tmp_path):
    model = build()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    linears = find_linears(model)
    damage, scores = fisher_table(model, windows(), linears, CONFIGS, device=CPU, progress=False)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    seen = []
    for index, loaded, fisher, _ in fisher_by_block(ckpt, windows(), find_linears(ckpt.model), progress=False):
        real = {n.split(".")[2] for n, p in loaded.named_parameters() if p.device.type != "meta"
                and n.startswith(ckpt.block_path + ".")}
        seen.append((index, real))
        assert {linears[name].block for name in fisher} == {index}
    assert seen == [(1, {"1"}), (0, {"0"})]  # last block first, one block materialized at a time
    lazy_damage, lazy_scores = streamed_fisher_table(ckpt, windows(), find_linears(ckpt.model), CONFIGS,
                                                     offload_dir=tmp_path / "boundaries", progress=False)
    assert np.allclose(lazy_damage, damage, rtol=1e-5, atol=0) and (damage[:, 0] > damage[:, 1]).all()
    assert np.allclose(lazy_scores["fisher_trace"], scores["fisher_trace"], rtol=1e-5, atol=0)
    assert not list((tmp_path / "boundaries").iterdir())  # boundary files consumed
    assert {p.device.type for p in ckpt.model.parameters()} == {"meta"}


def test_a_subset_of_linears():
    model = tiny_llama()
    linears = find_linears(model)
    some = {n: i for n, i in linears.items() if n.endswith("down_proj") or ".0.self_attn.q_proj" in n}
    reference = empirical_fisher(model, windows(2), linears, device=CPU, progress=False)
    streamed = streamed_fisher(model, windows(2), some, device=CPU, progress=False)
    assert_same_fisher(streamed, {n: reference[n] for n in some})


def test_qwen2_with_per_layer_attention_types(tmp_path):
    from tests.model.test_stream import tiny_qwen2

    model = tiny_qwen2()
    linears = find_linears(model)
    reference = empirical_fisher(model, windows(2), linears, device=CPU, progress=False)
    model.save_pretrained(tmp_path)
    assert_same_fisher(streamed_fisher(open_checkpoint(tmp_path), windows(2), linears, progress=False), reference)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lazy_checkpoint_on_cuda(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    linears = find_linears(model)
    reference = empirical_fisher(model, windows(), linears, device=CPU, progress=False)
    on_gpu = streamed_fisher(open_checkpoint(tmp_path, device="cuda", compute_dtype=torch.float32), windows(),
                             linears, progress=False)
    for name, ref in reference.items():
        assert on_gpu[name].device.type == "cuda"
        assert torch.allclose(on_gpu[name].cpu(), ref, rtol=1e-3, atol=1e-5 * float(ref.abs().max())), name
    half = streamed_fisher(open_checkpoint(tmp_path, device="cuda", compute_dtype=torch.bfloat16), windows(),
                           linears, progress=False)
    assert all(f.dtype == torch.float32 for f in half.values())  # accumulated in float32
    trace = lambda fisher: sum(float(f.sum()) for f in fisher.values())
    assert trace(half) == pytest.approx(trace(reference), rel=0.1)


def test_one_builder_one_key_one_meta_for_a_lazy_checkpoint_and_the_loaded_model(tmp_path, monkeypatch):
    from mixbits.sensitivity.cache import cache_key_parts
    from mixbits.sensitivity.methods import cached_tables

    monkeypatch.setenv("MIXBITS_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_llama()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    ckpt, linears = open_checkpoint(tmp_path / "ckpt"), find_linears(model)
    key = dict(model_name="m", linears=linears, calibration_sha256="x", configs=CONFIGS, method="fisher",
               granularity="layer")
    assert cache_key_parts(model=ckpt, **key) == cache_key_parts(model=model, **key)  # shards sampled, not meta
    common = dict(model_name="m", device=CPU, progress=False)
    streamed, hit = cached_tables(["fisher"], ckpt, windows(), linears, CONFIGS, **common)  # computed, stored
    assert hit == set()
    whole, hit = cached_tables(["fisher"], model, windows(), linears, CONFIGS, **common)
    assert hit == {"fisher"}  # the streamed table serves the whole model
    fresh = cached_tables(["fisher"], model, windows(), linears, CONFIGS, use_cache=False, **common)[0]["fisher"]
    drop = {"seconds"}
    assert ({k: v for k, v in streamed["fisher"].meta.items() if k not in drop}
            == {k: v for k, v in fresh.meta.items() if k not in drop})  # one metadata rule, no "streamed" flag
    assert np.allclose(streamed["fisher"].damage, fresh.damage, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="whole model"):
        cached_tables(["divergence"], ckpt, windows(), linears, CONFIGS, **common)
