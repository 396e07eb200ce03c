"""A second tiny model for the experiments: a random GPT-2 (Conv1D linears, fused q/k/v) saved
as a local HF folder with the same BPE tokenizer as `tiny_model_dir`'s Llama."""

from __future__ import annotations

import pytest

import mixbits.cli.experiments  # noqa: F401  (registers `compare` and `ablate` on the app)
from tests.conftest import make_tokenizer, tiny_gpt2


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_text):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = make_tokenizer(tiny_text)
    assert len(tokenizer) <= 256  # the model's vocabulary
    tiny_gpt2().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def small_options(text_file) -> list[str]:
    """CLI options that keep a whole job on a tiny model to about a second."""
    return ["--no-verbose", "--dataset", str(text_file), "--seqlen", "32", "--calib-windows", "2",
            "--eval-windows", "2", "--bits", "2,3,4", "--group-sizes", "32,64", "--quantizer", "rtn",
            "--no-cache", "--device", "cpu"]


# The classifier job's tests use the synthetic sentiment task of tests/classify.
from tests.classify.conftest import encoder_dirs, sentiment_file  # noqa: E402,F401
