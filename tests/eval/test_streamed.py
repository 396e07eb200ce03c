import copy

import pytest
import torch

from mixbits.eval.perplexity import evaluate_models
from mixbits.eval.streamed import Variant, evaluate_streamed
from mixbits.model.arch import find_linears, get_weight, set_weight
from mixbits.model.lazy import open_checkpoint
from mixbits.quant.affine import fake_quantize
from mixbits.quant.spec import QuantSpec
from tests.conftest import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")
SPEC = QuantSpec(3, 32)


def windows(n=3, seqlen=24):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


def quantize_all(name, weight):
    return fake_quantize(weight.float(), SPEC)


def quantized_copy(model):
    """The whole-model reference for the variant: a copy with every block linear fake-quantized."""
    variant = copy.deepcopy(model)
    for name in find_linears(variant):
        module = variant.get_submodule(name)
        set_weight(module, fake_quantize(get_weight(module).float(), SPEC))
    return variant


def assert_same(streamed, whole, names):
    for name in names:
        for field in ("ppl", "kl", "top1"):
            assert getattr(streamed[name], field) == pytest.approx(getattr(whole[name], field), rel=1e-4, abs=1e-9), (name, field)
        assert streamed[name].tokens == whole[name].tokens and streamed[name].windows == whole[name].windows


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_equals_whole_model_evaluation(build, batch_size):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    whole = evaluate_models({"original": model, "w3g32": quantized_copy(model)}, windows(), device=CPU,
                            reference="original", progress=False)
    streamed = evaluate_streamed(model, windows(), [Variant("w3g32", quantize_all), Variant("original")],
                                 device=CPU, reference="original", topk=None, batch_size=batch_size, progress=False)
    assert list(streamed) == ["w3g32", "original"]
    assert_same(streamed, whole, ["original", "w3g32"])
    assert streamed["w3g32"].kl > 1e-5 and streamed["w3g32"].top1 < 1 and streamed["original"].kl == 0.0 and streamed["original"].top1 == 1.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights put back


def test_lazy_checkpoint_gives_the_same_numbers(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    whole = evaluate_models({"original": model, "w3g32": quantized_copy(model)}, windows(), device=CPU,
                            reference="original", progress=False)
    ckpt = open_checkpoint(tmp_path)
    streamed = evaluate_streamed(ckpt, windows(), [Variant("original"), Variant("w3g32", quantize_all)],
                                 reference="original", progress=False)  # auto: vocab 256 keeps full log-probs
    assert_same(streamed, whole, ["original", "w3g32"])
    assert {p.device.type for p in ckpt.model.parameters()} == {"meta"}


def test_top_k_kl_is_a_lower_bound_that_is_exact_at_full_k():
    model = tiny_llama()
    variants = [Variant("original"), Variant("w3g32", quantize_all)]
    run = lambda k: evaluate_streamed(model, windows(), variants, device=CPU, reference="original", topk=k,
                                      progress=False)["w3g32"]
    full, everything, few = run(None), run(256), run(8)
    assert everything.kl == pytest.approx(full.kl, rel=1e-4)
    assert 0 < few.kl <= full.kl * (1 + 1e-5)
    assert few.top1 == full.top1 and few.ppl == full.ppl  # top-1 and perplexity do not depend on k


@pytest.mark.parametrize("batch_size", [1, 2])
def test_hidden_state_summary_is_exact(batch_size):
    """topk="hidden" keeps the reference's final hidden states and recomputes its log-probs: the same
    numbers as the full log-probabilities, not a bound."""
    model = tiny_llama()
    variants = [Variant("original"), Variant("w3g32", quantize_all)]
    run = lambda k: evaluate_streamed(model, windows(), variants, device=CPU, reference="original", topk=k,
                                      batch_size=batch_size, progress=False)
    full, hidden = run(None), run("hidden")
    for name in ("original", "w3g32"):
        assert hidden[name].kl == pytest.approx(full[name].kl, rel=1e-6, abs=1e-12)
        assert hidden[name].top1 == full[name].top1 and hidden[name].ppl == full[name].ppl
    assert hidden["w3g32"].kl > 1e-5


def test_auto_never_chooses_a_bound(monkeypatch):
    """Above the size limit for full log-probs, "auto" keeps hidden states (exact), never top-k."""
    import mixbits.eval.streamed as streamed

    monkeypatch.setattr(streamed, "AUTO_FULL_BYTES", 1)
    assert streamed.resolve_topk("auto", 10, 256) == streamed.HIDDEN
    model = tiny_llama()
    variants = [Variant("original"), Variant("w3g32", quantize_all)]
    auto = evaluate_streamed(model, windows(), variants, device=CPU, reference="original", progress=False)
    full = evaluate_streamed(model, windows(), variants, device=CPU, reference="original", topk=None, progress=False)
    assert auto["w3g32"].kl == pytest.approx(full["w3g32"].kl, rel=1e-6)


def test_without_reference_only_perplexity():
    model = tiny_llama()
    res = evaluate_streamed(model, windows(1), [Variant("a")], device=CPU, progress=False)
    whole = evaluate_models({"a": model}, windows(1), device=CPU, progress=False)
    assert res["a"].kl is None and res["a"].ppl == pytest.approx(whole["a"].ppl, rel=1e-5)


def test_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="reference 'b'"):
        evaluate_streamed(model, windows(1), [Variant("a")], device=CPU, reference="b")
    with pytest.raises(ValueError, match="unique"):
        evaluate_streamed(model, windows(1), [Variant("a"), Variant("a")], device=CPU)
    with pytest.raises(ValueError, match="topk=0"):
        evaluate_streamed(model, windows(1), [Variant("a")], device=CPU, reference="a", topk=0, progress=False)
    with pytest.raises(ValueError, match="shape"):
        evaluate_streamed(model, windows(1), [Variant("a", lambda n, w: w[:1])], device=CPU, progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lazy_checkpoint_on_cuda(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    whole = evaluate_models({"original": model, "w3g32": quantized_copy(model)}, windows(), device=CPU,
                            reference="original", progress=False)
    ckpt = open_checkpoint(tmp_path, device="cuda", compute_dtype=torch.float32)
    streamed = evaluate_streamed(ckpt, windows(), [Variant("original"), Variant("w3g32", quantize_all)],
                                 reference="original", progress=False)
    for name in whole:
        assert streamed[name].ppl == pytest.approx(whole[name].ppl, rel=1e-3)
        assert streamed[name].kl == pytest.approx(whole[name].kl, rel=1e-2, abs=1e-6)
