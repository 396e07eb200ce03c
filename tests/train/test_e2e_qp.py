import math

import pytest
import torch

from mixbits.model.arch import find_linears, get_weight
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.quant.affine import quantize
from mixbits.quant.spec import QuantSpec
from mixbits.train.e2e_qp import E2EParams, train_step_sizes
from mixbits.train.optim import cosine_lr
from tests.conftest import tiny_llama

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def windows(n, seed):
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def quantized():
    model = tiny_llama()
    plan = Plan.uniform(find_linears(model), QuantSpec(2, 32))
    model_q, report = quantize_model(model, plan, device=CPU, progress=False)
    return model_q, plan.quantized(), dict(report.qparams)


def codes(model, specs, qparams):
    return {n: quantize(get_weight(model.get_submodule(n)), qparams[n], s) for n, s in specs.items()}


def test_only_the_scales_move_and_the_codes_stay(quantized):
    model_q, specs, qparams = quantized
    before = codes(model_q, specs, qparams)
    hp = E2EParams(epochs=2, batch_size=2, lrs={n: 1e-3 for n in specs})
    new, stats = train_step_sizes(model_q, specs, qparams, windows(8, 1), windows(4, 2), hp, device=CPU,
                                  generator=torch.Generator().manual_seed(0), progress=False)
    after = codes(model_q, specs, new)
    assert all(torch.equal(before[n], after[n]) for n in specs)
    assert all(torch.equal(new[n].zero, qparams[n].zero) for n in specs)
    assert all(torch.equal(new[n].scale, new[n].scale.half().float()) for n in specs)
    assert stats.loss_end < stats.loss_start and stats.best_epoch > 0
    assert any(not torch.equal(new[n].scale, qparams[n].scale) for n in specs)
    assert all(p.requires_grad for p in model_q.parameters())
    print(f"E2E-QP validation LM loss {stats.loss_start:.4f} -> {stats.loss_end:.4f}")


def test_nonfinite_training_losses_fall_back(quantized):
    model_q, specs, qparams = quantized
    hp = E2EParams(epochs=1, batch_size=2, lrs={n: 1e-3 for n in specs}, max_nonfinite=2)
    # NaN only while gradients are recorded: every training step fails, validation stays finite
    hook = model_q.model.layers[0].register_forward_hook(
        lambda module, args, out: out * float("nan") if torch.is_grad_enabled() else None)
    try:
        new, stats = train_step_sizes(model_q, specs, qparams, windows(8, 1), windows(4, 2), hp, device=CPU,
                                      generator=torch.Generator().manual_seed(0), progress=False)
    finally:
        hook.remove()
    assert stats.fallback and stats.nonfinite_steps == 2 and stats.steps == 2 and stats.loss_end == stats.loss_start
    assert all(torch.equal(new[n].scale, qparams[n].scale) for n in specs) and math.isfinite(stats.loss_end)


def test_cosine_decays_from_lr_to_lr_over_factor():
    assert cosine_lr(1e-4, 0, 10, 20) == pytest.approx(1e-4)
    assert cosine_lr(1e-4, 10, 10, 20) == pytest.approx(5e-6)
    assert cosine_lr(1e-4, 5, 10, 20) == pytest.approx((1e-4 + 5e-6) / 2)
