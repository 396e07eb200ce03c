"""The Hutchinson trace block by block equals the whole model's (same probes), one block materialized at a time."""

import numpy as np
import pytest
import torch

from mixbits.errors import UserError
from mixbits.model.arch import find_linears
from mixbits.model.lazy import LazyCheckpoint, open_checkpoint
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.hessian import hessian_table, hutchinson_trace
from mixbits.sensitivity.hessian_streamed import (
    hutchinson_by_block, streamed_hessian_table, streamed_hutchinson_trace,
)
from mixbits.sensitivity.methods import cached_tables, compute_tables
from tests.conftest import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")
CONFIGS = (QuantSpec(2, 32), QuantSpec(4, 64), KEEP)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; many small ops


def windows(n=3, seqlen=16):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


def seeded(seed=3):
    return torch.Generator().manual_seed(seed)


def assert_same_traces(got: dict, want: dict):
    """Relative 1e-4, with an absolute floor at 1e-5 of the largest trace: a trace is a sum of signed samples,
    so one near 0 has no meaningful relative error."""
    assert list(got) == list(want)
    floor = 1e-5 * max(abs(t) for t in want.values())
    for name, t in want.items():
        assert got[name] == pytest.approx(t, rel=1e-4, abs=floor), name


def llama(attn: str):
    model = tiny_llama()
    model.set_attn_implementation(attn)
    return model


@pytest.mark.parametrize("build", [lambda: llama("eager"), lambda: llama("sdpa"), tiny_gpt2],
                         ids=["llama-eager", "llama-sdpa", "gpt2-layernorm"])
def test_streamed_trace_equals_the_whole_models_with_the_same_probes(build):
    model = build()
    linears = find_linears(model)
    want_gen, got_gen = seeded(), seeded()
    want = hutchinson_trace(model, windows(), linears, device=CPU, probes=2, progress=False, generator=want_gen)
    got = streamed_hutchinson_trace(model, windows(), linears, device=CPU, probes=2, progress=False, generator=got_gen)
    assert_same_traces(got, want)
    assert sum(t < 0 for t in want.values()) and sum(t > 0 for t in want.values())  # signed: a real comparison
    assert torch.equal(got_gen.get_state(), want_gen.get_state())  # the generator ends where hessian.py leaves it
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    other = streamed_hutchinson_trace(model, windows(), linears, device=CPU, probes=2, progress=False,
                                      generator=seeded(4))
    assert all(other[n] != got[n] for n in linears)  # the probes follow the seed


def test_lazy_checkpoint_one_block_at_a_time_with_boundaries_on_disk(tmp_path, materialized):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    linears = find_linears(model)
    want, want_scores = hessian_table(model, windows(), linears, CONFIGS, device=CPU, progress=False,
                                      generator=seeded())
    ckpt = open_checkpoint(tmp_path / "ckpt")
    got, got_scores = streamed_hessian_table(ckpt, windows(), find_linears(ckpt.model), CONFIGS, progress=False,
                                             generator=seeded(), offload_dir=tmp_path / "boundaries")
    live, counts = materialized
    assert counts and max(counts) == 1 and not live  # one piece at a time, all released
    assert {p.device.type for p in ckpt.model.parameters()} == {"meta"}
    assert not list((tmp_path / "boundaries").iterdir())  # boundary files consumed
    floor = 1e-5 * float(np.abs(want).max())
    assert np.allclose(got, want, rtol=1e-4, atol=floor) and (want[:, 0] >= want[:, 1]).all() and want.max() > 0
    trace_floor = 1e-5 * float(np.abs(want_scores["hessian_trace"]).max())
    assert np.allclose(got_scores["hessian_trace"], want_scores["hessian_trace"], rtol=1e-4, atol=trace_floor)


def test_a_subset_of_linears_in_any_order_skips_the_blocks_below_it():
    model = tiny_llama()
    linears = find_linears(model)
    names = ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    some = {n: linears[n] for n in names}  # block 1 first: the probes are replayed per run of one block
    want = hutchinson_trace(model, windows(2), some, device=CPU, progress=False, generator=seeded())
    assert_same_traces(streamed_hutchinson_trace(model, windows(2), some, device=CPU, progress=False,
                                                 generator=seeded()), want)
    upper = {n: linears[n] for n in names[:2]}
    blocks = [i for i, _, _ in hutchinson_by_block(model, windows(2), upper, device=CPU, progress=False)]
    assert blocks == [1]  # nothing below the first block with a linear goes backward


def test_qwen2_with_per_layer_attention_types(tmp_path):
    from tests.model.test_stream import tiny_qwen2

    model = tiny_qwen2()
    linears = find_linears(model)
    want = hutchinson_trace(model, windows(2), linears, device=CPU, progress=False, generator=seeded())
    model.save_pretrained(tmp_path)
    assert_same_traces(streamed_hutchinson_trace(open_checkpoint(tmp_path), windows(2), linears, progress=False,
                                                 generator=seeded()), want)


def test_the_top_eigenvalue_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    linears = find_linears(ckpt.model)

    def no_read(*args, **kwargs):
        raise AssertionError("a block was read before the option was refused")

    monkeypatch.setattr(LazyCheckpoint, "materialize", no_read)
    with pytest.raises(UserError, match="top_eigen.*--no-stream"):
        compute_tables(["fisher", "hessian"], ckpt, windows(), linears, CONFIGS, device=CPU, progress=False,
                       options={"hessian": {"top_eigen": True}})
    with pytest.raises(UserError, match="top_eigen"):
        streamed_hessian_table(ckpt, windows(), linears, CONFIGS, progress=False, top_eigen=True)


def test_one_key_serves_the_streamed_and_the_whole_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXBITS_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_llama()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    ckpt, linears = open_checkpoint(tmp_path / "ckpt"), find_linears(model)
    common = dict(model_name="m", device=CPU, progress=False, options={"hessian": {"probes": 2}})
    streamed, hit = cached_tables(["hessian"], ckpt, windows(), linears, CONFIGS, generator=seeded(), **common)
    assert hit == set()
    _, hit = cached_tables(["hessian"], model, windows(), linears, CONFIGS, generator=seeded(), **common)
    assert hit == {"hessian"}  # the streamed table serves the whole model
    _, hit = cached_tables(["hessian"], model, windows(), linears, CONFIGS, generator=seeded(5), **common)
    assert hit == set()  # another seed, other probes: another key
    fresh = cached_tables(["hessian"], model, windows(), linears, CONFIGS, generator=seeded(), use_cache=False,
                          **common)[0]["hessian"]
    drop = {"seconds"}
    assert ({k: v for k, v in streamed["hessian"].meta.items() if k not in drop}
            == {k: v for k, v in fresh.meta.items() if k not in drop})
    floor = 1e-5 * float(np.abs(fresh.damage).max())
    assert np.allclose(streamed["hessian"].damage, fresh.damage, rtol=1e-4, atol=floor)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lazy_checkpoint_on_cuda(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    linears = find_linears(model)
    gpu = torch.device("cuda")
    want = hutchinson_trace(model.to(gpu), windows(), linears, device=gpu, progress=False,
                            generator=torch.Generator(device=gpu).manual_seed(3))
    got = streamed_hutchinson_trace(open_checkpoint(tmp_path, device="cuda", compute_dtype=torch.float32), windows(),
                                    linears, progress=False, generator=torch.Generator(device=gpu).manual_seed(3))
    floor = 1e-4 * max(abs(t) for t in want.values())
    for name, t in want.items():
        assert got[name] == pytest.approx(t, rel=1e-3, abs=floor), name
