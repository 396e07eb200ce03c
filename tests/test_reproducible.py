"""Same CPU numbers at any thread count: MKL's strict reproducibility mode, set on import (mixbits.reproducible)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mixbits.reproducible as reproducible

mkl_only = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch's CPU BLAS is not MKL here")


def test_importing_mixbits_requests_strict_mkl_and_keeps_a_user_choice():
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    code = "import mixbits, os; print(os.environ['MKL_CBWR'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == reproducible.MKL_MODE == "AUTO,STRICT"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MKL_CBWR": "AVX2,STRICT"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "AVX2,STRICT"


@mkl_only
@pytest.mark.skipif(not os.environ.get("MKL_CBWR", "").endswith("STRICT"), reason="MKL_CBWR set by the user, not strict")
def test_a_long_inner_product_is_the_same_at_1_and_2_threads():
    """128 tokens through a 1536 -> 576 linear: MKL splits the 1536-long sum by thread count unless strict."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(576, 1536, generator=gen), torch.randn(1, 128, 1536, generator=gen)
    saved, outs = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(F.linear(x, w))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(outs[0], outs[1])


def test_results_record_the_mkl_mode_in_force(monkeypatch):
    from mixbits.provenance import environment

    monkeypatch.setenv("MKL_CBWR", "AVX2,STRICT")
    assert environment(torch.device("cpu"))["mkl_cbwr"] == "AVX2,STRICT"
    monkeypatch.delenv("MKL_CBWR")
    assert environment(torch.device("cpu"))["mkl_cbwr"] is None
