import copy
import math

import pytest
import torch

from mixbits.model.arch import find_blocks, find_linears, get_weight
from mixbits.model.blockwise import block_forward, capture_block_inputs
from mixbits.quant.affine import dequantize, minmax_qparams, quantize
from mixbits.quant.spec import QuantSpec
from mixbits.train.activations import Stream
from mixbits.train.block_ap import BlockHParams, stream_loss, train_block
from mixbits.train.quantized_block import QuantizedBlock, start_of
from tests.conftest import tiny_llama

CPU = torch.device("cpu")
SPEC = QuantSpec(2, 32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def stream(inputs, hidden=None):
    s = Stream()
    for i, (h, a, k) in enumerate(zip(inputs.hidden, inputs.args, inputs.kwargs)):
        s.append(h if hidden is None else hidden[i], a, k)
    return s


@pytest.fixture(scope="module")
def setting():
    """Block 0 of a tiny Llama at w2g32 (RTN start); 4 training and 2 validation batches of 2 x 16."""
    model = tiny_llama()
    prefix, blocks = find_blocks(model)
    g = torch.Generator().manual_seed(3)
    data = {}
    for key, n in (("train", 8), ("val", 4)):
        inputs = capture_block_inputs(model, torch.randint(0, 256, (n, 16), generator=g), batch_size=2, progress=False)
        data[key] = (stream(inputs), stream(inputs, block_forward(blocks[0], inputs, device=CPU)))
    block_q, starts, keys, transposed = copy.deepcopy(blocks[0]), {}, {}, {}
    for n in (n for n, i in find_linears(model).items() if i.block == 0):
        sub = n[len(prefix) + 3:]
        w = get_weight(model.get_submodule(n)).detach()
        qp = minmax_qparams(w, SPEC)
        q = dequantize(quantize(w, qp, SPEC), qp, SPEC)
        with torch.no_grad():
            block_q.get_submodule(sub).weight.copy_(q)
        starts[n], keys[n], transposed[n] = start_of(w, q, qp, SPEC), sub + ".weight", False
    make = lambda: QuantizedBlock(copy.deepcopy(block_q), keys, transposed, starts, CPU)  # noqa: E731
    return make, data, starts


def hparams(setting, epochs=2.0, lr=1e-4, wlr=2e-5, **kw):
    return BlockHParams(epochs, lr, {n: wlr for n in setting[2]}, **kw)


def run(setting, hp, train=None, seed=0, qb=None):
    make, data, _ = setting
    qb = qb or make()
    out = train_block(qb, train or data["train"], data["val"], hp, device=CPU,
                      generator=torch.Generator().manual_seed(seed), progress=False)
    return qb, out


def test_training_lowers_the_loss_and_keeps_the_best_state(setting):
    qb, out = run(setting, hparams(setting, epochs=4, lr=3e-3, wlr=3e-4))
    assert out.loss_end < out.loss_start and not out.fallback and out.steps == 16
    assert len(out.val_history) == 5 and out.loss_end == min(out.val_history)
    assert out.val_history[round(out.best_epoch)] == out.loss_end
    # the kept state really scores what is reported (it is what gets written)
    assert stream_loss(qb, *setting[1]["val"], out.final, CPU) == out.loss_end
    print(f"block-0 val MSE after / before Block-AP: {out.loss_end / out.loss_start:.3f}")


def test_the_restored_state_is_the_best_one_seen_not_the_last(setting):
    qb, out = run(setting, hparams(setting, epochs=6, lr=1e-2, wlr=1e-3))  # val loss dips, then rises again
    assert 0 < out.best_epoch < out.epochs_run == 6
    assert out.loss_end == min(out.val_history) < out.val_history[-1]
    assert stream_loss(qb, *setting[1]["val"], out.final, CPU) == out.loss_end
    assert stream_loss(qb, *setting[1]["val"], qb.finalize(), CPU) == out.val_history[-1]


def test_a_block_never_ends_worse_than_its_start(setting):
    _, out = run(setting, hparams(setting, lr=1.0, wlr=1.0))  # absurd lrs wreck every epoch
    assert out.kept_start and out.loss_end == out.loss_start and max(out.val_history[1:]) > out.loss_start
    for n, start in setting[2].items():
        assert torch.equal(out.final[n].weight, dequantize(quantize(start.weight, start.qparams, SPEC),
                                                           start.qparams, SPEC))


def test_patience_stops_early(setting):
    _, out = run(setting, hparams(setting, epochs=5, lr=1.0, wlr=1.0, patience=2))
    assert out.epochs_run == 2 and out.kept_start


def test_fractional_epochs_validate_after_the_partial_one(setting):
    _, out = run(setting, hparams(setting, epochs=1.5))
    assert out.steps == 6 and out.epochs_run == 1.5 and len(out.val_history) == 3


def test_injected_nan_loss_is_skipped_with_halved_lr(setting):
    make, data, _ = setting
    inputs, targets = data["train"]
    poisoned = stream(_Captured(inputs), [h * float("nan") if i == 1 else h for i, h in enumerate(_hidden(inputs))])
    _, out = run(setting, hparams(setting, epochs=3, lr=3e-3, wlr=3e-4, max_nonfinite=5), train=(poisoned, targets))
    assert out.nonfinite_steps == 3 and out.lr_scale_end == 0.125 and not out.fallback
    assert out.loss_end < out.loss_start
    assert all(torch.isfinite(f.weight).all() and torch.isfinite(f.qparams.scale).all() for f in out.final.values())


def test_injected_nan_gradient_is_skipped(setting):
    make, _, starts = setting
    qb = make()
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 2 else grad

    qb.scale[next(iter(starts))].register_hook(poison)
    _, out = run(setting, hparams(setting, epochs=2, lr=3e-3, wlr=3e-4), qb=qb)
    assert out.nonfinite_steps == 1 and out.lr_scale_end == 0.5 and not out.fallback
    assert out.loss_end < out.loss_start


def test_too_many_nonfinite_steps_fall_back_to_the_start(setting):
    _, data, starts = setting
    inputs, targets = data["train"]
    poisoned = stream(_Captured(inputs), [h * float("nan") for h in _hidden(inputs)])
    _, out = run(setting, hparams(setting, max_nonfinite=3), train=(poisoned, targets))
    assert out.fallback and out.kept_start and out.nonfinite_steps == 3 and out.steps == 3
    for n, start in starts.items():
        assert torch.equal(out.final[n].qparams.scale, start.qparams.scale)
        assert math.isfinite(out.loss_end)


class _Captured:
    """A Stream seen as captured inputs, to copy it with other hidden states."""

    def __init__(self, s: Stream) -> None:
        self.hidden = tuple(_hidden(s))
        self.args, self.kwargs = tuple(s.args), tuple(s.kwargs)


def _hidden(s: Stream):
    return [s.hidden(i) for i in range(len(s))]
