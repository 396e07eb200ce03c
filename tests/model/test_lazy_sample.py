"""A lazy checkpoint's fingerprint equals the fingerprint of the same model loaded whole."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixbits.model.lazy import open_checkpoint
from mixbits.model.lazy_sample import checkpoint_sampler
from mixbits.sensitivity.cache import SAMPLE_BLOCKS, SAMPLE_ELEMENTS, weights_fingerprint
from tests.conftest import tiny_gpt2, tiny_llama


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_fingerprint_as_the_loaded_model(build, dtype, tmp_path):
    build().to(dtype).save_pretrained(tmp_path, max_shard_size="100KB")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    lazy = open_checkpoint(tmp_path)
    sample = checkpoint_sampler(lazy, blocks=SAMPLE_BLOCKS, size=SAMPLE_ELEMENTS)
    assert weights_fingerprint(lazy.model, sample) == weights_fingerprint(loaded)
    assert weights_fingerprint(lazy.model) != weights_fingerprint(loaded)  # without the samples: shapes only


def test_another_checkpoint_of_the_same_shapes_differs(tmp_path):
    tiny_llama(seed=0).save_pretrained(tmp_path / "a")
    tiny_llama(seed=1).save_pretrained(tmp_path / "b")
    prints = []
    for folder in ("a", "b"):
        lazy = open_checkpoint(tmp_path / folder)
        prints.append(weights_fingerprint(lazy.model, checkpoint_sampler(lazy, blocks=SAMPLE_BLOCKS, size=SAMPLE_ELEMENTS)))
    assert prints[0] != prints[1]
