"""The one Gram accumulator of model inputs: sums match a naive XᵀX, siblings share one matrix."""

import pytest
import torch
from torch import nn

from mixbits.model.hooks import SharedInputGrams, input_hooks

CPU = torch.device("cpu")


class Siblings(nn.Module):
    """q and k read the very same tensor; o reads another one."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.q, self.k, self.o = nn.Linear(width, 4), nn.Linear(width, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.o(self.q(x) + self.k(x))


def naive_gram(xs: list[torch.Tensor]) -> torch.Tensor:
    rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
    return (rows.T @ rows).float()


def test_sums_and_shares_by_the_shared_input_rule():
    torch.manual_seed(0)
    model, xs = Siblings(), [torch.randn(2, 5, 6) for _ in range(3)]
    grams = SharedInputGrams(CPU)
    with torch.no_grad(), input_hooks(model, ["q", "k", "o"], grams):
        for x in xs:
            grams.new_pass()
            model(x)
    assert grams.H("q") is grams.H("k")  # one matrix, one product per token
    assert grams.shared() == 1 and grams.groups() == [["q", "k"], ["o"]]
    torch.testing.assert_close(grams.H("q"), naive_gram(xs), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        o_inputs = [model.q(x) + model.k(x) for x in xs]
    torch.testing.assert_close(grams.H("o"), naive_gram(o_inputs), rtol=1e-5, atol=1e-4)


def test_sharing_is_not_carried_across_passes():
    grams = SharedInputGrams(CPU)
    x = torch.randn(3, 4)
    grams("a", x)
    grams.new_pass()
    grams("b", x)  # the same tensor, but in a new pass: b keeps its own matrix
    assert grams.H("a") is not grams.H("b") and grams.shared() == 0


def test_sharing_that_changes_between_passes_is_refused():
    grams = SharedInputGrams(CPU)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    grams("a", x)
    grams("b", x)
    grams.new_pass()
    grams("a", x)
    with pytest.raises(RuntimeError, match="b shared its input with a in one pass"):
        grams("b", y)


def test_hooks_are_removed_even_when_the_forward_raises():
    model = Siblings()
    with pytest.raises(ZeroDivisionError), input_hooks(model, ["q"], lambda name, x: 1 / 0):
        model(torch.randn(1, 6))
    model(torch.randn(1, 6))  # would raise again if the hook were still there


def test_input_square_sums_are_the_diagonal_of_the_inputs_gram():
    import torch
    from mixbits.model.arch import find_linears
    from mixbits.model.hooks import input_hooks, input_square_sums
    from tests.conftest import tiny_llama

    model, names = tiny_llama(), ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    windows = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(0))
    seen = {n: [] for n in names}
    with torch.no_grad(), input_hooks(model, names, lambda n, x: seen[n].append(x.reshape(-1, x.shape[-1]))):
        for w in windows:
            model(w[None])
    got = input_square_sums(model, names, windows)
    for n in names:
        x = torch.cat(seen[n]).double()
        torch.testing.assert_close(got[n], torch.diagonal(x.T @ x).float())
        assert got[n].shape == (find_linears(model)[n].in_features,)
