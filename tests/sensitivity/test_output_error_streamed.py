"""The output-error table block by block equals the loaded model's, one block materialized at a time."""

import numpy as np
import pytest
import torch

from mixbits.errors import UserError
from mixbits.model.arch import find_linears
from mixbits.model.lazy import open_checkpoint
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.methods import compute_tables
from mixbits.sensitivity.output_error import output_error_table
from mixbits.sensitivity.output_error_streamed import streamed_output_error_table
from tests.conftest import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")
CONFIGS = (QuantSpec(2, 32), QuantSpec(4, 64), KEEP)


def windows(n=3, seqlen=16):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_streamed_output_error_equals_the_loaded_models(build, tmp_path, materialized):
    model = build()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    linears = find_linears(model)
    want, want_scores = output_error_table(model, windows(), linears, CONFIGS, device=CPU, progress=False)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    got, got_scores = streamed_output_error_table(ckpt, windows(), find_linears(ckpt.model), CONFIGS, progress=False)
    live, counts = materialized
    assert max(counts) == 1 and not live  # one piece at a time
    assert np.allclose(got, want, rtol=1e-5, atol=0) and (want[:, 0] > want[:, 1]).all() and (want[:, 2] == 0).all()
    assert np.allclose(got_scores["output_error"], want_scores["output_error"], rtol=1e-5, atol=0)


def test_a_block_source_serves_fisher_gradient_and_output_error_and_names_the_others(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    linears = find_linears(ckpt.model)
    methods = ["fisher", "gradient", "output_error"]
    tables = compute_tables(methods, ckpt, windows(), linears, CONFIGS, device=CPU, progress=False)
    want = compute_tables(methods, model, windows(), find_linears(model), CONFIGS, device=CPU, progress=False)
    for m in methods:  # the fisher + gradient pass shared, as for the loaded model
        assert np.allclose(tables[m].damage, want[m].damage, rtol=1e-4, atol=0), m
        for key, score in want[m].scores.items():
            assert np.allclose(tables[m].scores[key], score, rtol=1e-4, atol=0), (m, key)
    assert tables["gradient"].meta["shared_pass_with"] == "fisher"
    alone = compute_tables(["gradient"], ckpt, windows(), linears, CONFIGS, device=CPU, progress=False)["gradient"]
    assert np.allclose(alone.damage, want["gradient"].damage, rtol=1e-4, atol=0)
    with pytest.raises(UserError, match=r"methods \['divergence'\] need the whole model"):
        compute_tables(["fisher", "divergence"], ckpt, windows(), linears, CONFIGS, device=CPU, progress=False)
