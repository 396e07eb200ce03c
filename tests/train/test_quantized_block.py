import copy

import pytest
import torch

from mixbits.model.arch import find_blocks, find_linears, get_weight
from mixbits.model.blockwise import block_forward, capture_block_inputs
from mixbits.quant.affine import dequantize, minmax_qparams, quantize
from mixbits.quant.gptq import gptq_quantize
from mixbits.quant.qlinear import QuantLinear
from mixbits.quant.spec import QuantSpec
from mixbits.train.quantized_block import QuantizedBlock, finalize_linear, start_of
from tests.conftest import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rtn(w, spec):
    qp = minmax_qparams(w, spec)
    return dequantize(quantize(w, qp, spec), qp, spec), qp


def test_start_keeps_the_original_weight_when_rtn_reproduces_the_init():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(3, 32)
    q, qp = rtn(w, spec)
    start = start_of(w, q, qp, spec)
    assert torch.equal(start.weight, w)
    final = finalize_linear(start.weight, start.qparams.scale, start.qparams.zero, spec)
    assert torch.equal(final.weight, q) and torch.equal(final.qparams.scale, qp.scale)


def test_start_takes_the_written_weight_for_gptq():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 64, generator=g), torch.randn(256, 64, generator=g)
    spec = QuantSpec(2, 32)
    res = gptq_quantize(w, x.T @ x, spec)
    start = start_of(w, res.weight, res.qparams, spec)
    assert torch.equal(start.weight, res.weight)
    final = finalize_linear(start.weight, start.qparams.scale, start.qparams.zero, spec)
    assert torch.equal(final.weight, res.weight)


def test_finalize_rounds_to_storable_values_and_the_export_keeps_the_codes():
    g = torch.Generator().manual_seed(0)
    w, spec = torch.randn(4, 64, generator=g), QuantSpec(4, 32)
    scale = minmax_qparams(w, spec).scale * (1 + 1e-3 * torch.rand(4, 2, generator=g))  # off the fp16 grid
    zero = torch.full((4, 2), 7.4)
    final = finalize_linear(w, scale, zero, spec)
    assert torch.equal(final.qparams.scale, final.qparams.scale.half().float())
    assert torch.equal(final.qparams.zero, torch.full((4, 2), 7.0))
    packed = QuantLinear.from_weight(final.weight, None, spec, final.qparams)
    assert torch.equal(packed.dequantized_weight(), final.weight)
    assert finalize_linear(w, scale * float("nan"), zero, spec) is None


def test_symmetric_zero_is_fixed():
    w, spec = torch.randn(4, 32), QuantSpec(3, 32, symmetric=True)
    final = finalize_linear(w, minmax_qparams(w, spec).scale, torch.zeros(4, 1), spec)
    assert torch.equal(final.qparams.zero, torch.full((4, 1), 4.0))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_block_runs_with_fake_weights_and_gradients_reach_w_s_z(make):
    model = make()
    prefix, blocks = find_blocks(model)
    spec = QuantSpec(3, 32)
    names = [n for n, i in find_linears(model).items() if i.block == 0]
    starts, keys, transposed, block_q = {}, {}, {}, copy.deepcopy(blocks[0])
    for n in names:
        sub = n[len(prefix) + 3:]
        w = get_weight(model.get_submodule(n)).detach()
        q, qp = rtn(w, spec)
        starts[n], keys[n], transposed[n] = start_of(w, q, qp, spec), sub + ".weight", find_linears(model)[n].transposed
        with torch.no_grad():
            block_q.get_submodule(sub).weight.copy_(q.t() if transposed[n] else q)
    qb = QuantizedBlock(copy.deepcopy(block_q), keys, transposed, starts, CPU)
    inputs = capture_block_inputs(model, torch.randint(0, 256, (2, 16)), progress=False)
    hidden, args, kwargs = inputs.hidden[0], inputs.args[0], inputs.kwargs[0]
    expected = block_forward(block_q, inputs, device=CPU)[0]
    assert torch.equal(qb(hidden, args, kwargs, qb.fake_weights()).detach(), expected)
    assert torch.equal(qb(hidden, args, kwargs, qb.stored_weights(qb.finalize())), expected)
    qb(hidden, args, kwargs, qb.fake_weights()).pow(2).mean().backward()
    n = names[0]
    assert qb.weight[n].grad.abs().sum() > 0 and qb.scale[n].grad.abs().sum() > 0
    assert all(p.grad is None for p in qb.block.parameters())
    assert isinstance(qb.zero[n], torch.nn.Parameter)
