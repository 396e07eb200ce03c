import math

import pytest
import torch
import torch.nn.functional as F

from mixbits.eval.perplexity import evaluate_models
from tests.conftest import tiny_llama


def test_perplexity_kl_and_top1_match_a_plain_reference():
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    windows = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    res = evaluate_models({"a": a, "b": b}, windows, device=torch.device("cpu"), reference="a", progress=False)
    with torch.no_grad():
        losses = [a(input_ids=w[None], labels=w[None]).loss for w in windows]
        assert res["a"].ppl == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
        la = torch.cat([F.log_softmax(a(input_ids=w[None]).logits[0, :-1], -1) for w in windows])
        lb = torch.cat([F.log_softmax(b(input_ids=w[None]).logits[0, :-1], -1) for w in windows])
    kl = F.kl_div(lb, la, log_target=True, reduction="batchmean").item()
    assert res["b"].kl == pytest.approx(kl, rel=1e-4)
    assert res["b"].top1 == pytest.approx((la.argmax(-1) == lb.argmax(-1)).float().mean().item())
    assert res["a"].kl == pytest.approx(0.0, abs=1e-7) and res["a"].top1 == 1.0
    assert res["a"].tokens == 3 * 31 and res["a"].windows == 3


def test_without_reference_there_is_no_divergence():
    res = evaluate_models({"a": tiny_llama()}, torch.randint(0, 256, (1, 16)), device=torch.device("cpu"), progress=False)
    assert res["a"].kl is None and res["a"].top1 is None


def test_unknown_reference_is_refused():
    with pytest.raises(ValueError, match="reference"):
        evaluate_models({"a": tiny_llama()}, torch.zeros(1, 8, dtype=torch.long), device=torch.device("cpu"), reference="b")
