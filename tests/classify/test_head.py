"""The head's math: masked mean pooling, the logistic fit's optimality, folds, cross-validation."""

import pytest
import torch
import torch.nn.functional as F

from mixbits.classify.head import cross_validate, fit_logistic, sentence_embedding, stratified_folds, train_head


def test_sentence_embedding_is_the_unit_masked_mean():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    out = sentence_embedding(hidden, mask)
    for i in range(3):
        mean = hidden[i, : int(mask[i].sum())].mean(0)
        torch.testing.assert_close(out[i], mean / mean.norm())
    hidden[1, 2:] = 1e6  # padding positions never leak in
    torch.testing.assert_close(sentence_embedding(hidden, mask)[1], out[1])


def blobs(n: int, seed: int, shift: float = 1.5):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 8, generator=gen) + shift * (2 * y[:, None] - 1) * torch.tensor([1.0, -1.0] + [0.0] * 6)
    return x, y


def test_fit_logistic_reaches_the_optimum():
    x, y = blobs(60, 0)
    l2 = 0.1
    weight, bias = fit_logistic(x, y, 2, l2)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    loss = F.cross_entropy(x.double() @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
    grads = torch.autograd.grad(loss, (weight, bias))
    assert max(float(g.abs().max()) for g in grads) < 1e-6  # a convex problem: zero gradient = the minimum


def test_train_head_is_above_chance_on_held_out_blobs_and_folds_the_standardization():
    x, y = blobs(120, 1)
    fit = train_head(x[:80], y[:80].tolist(), 2, l2_grid=(0.01, 1.0), folds=4, seed=0)
    assert fit.weight.shape == (2, 8) and fit.bias.shape == (2,) and fit.l2 in (0.01, 1.0)
    assert set(fit.cv_accuracy) == {0.01, 1.0} and fit.train_accuracy > 0.85
    held = float(((x[80:] @ fit.weight.T + fit.bias).argmax(-1) == y[80:]).float().mean())
    assert held > 0.8
    # the folded head equals the fit on standardized features
    mu, sigma = x[:80].double().mean(0), x[:80].double().std(0)
    w, b = fit_logistic((x[:80].double() - mu) / sigma, y[:80], 2, fit.l2)
    torch.testing.assert_close(fit.weight.double(), w / sigma, rtol=1e-4, atol=1e-5)
    same = train_head(x[:80], y[:80].tolist(), 2, l2_grid=(0.01, 1.0), folds=4, seed=0)
    assert torch.equal(same.weight, fit.weight)  # deterministic


def test_one_l2_skips_cross_validation():
    x, y = blobs(20, 2)
    fit = train_head(x, y.tolist(), 2, l2_grid=(0.5,))
    assert fit.l2 == 0.5 and fit.cv_accuracy == {}


def test_stratified_folds_partition_and_balance():
    labels = [0] * 10 + [1] * 6
    folds = stratified_folds(labels, 3, seed=4)
    assert sorted(sum(folds, [])) == list(range(16))
    for fold in folds:
        assert sum(labels[i] for i in fold) == 2 and len(fold) in (5, 6)  # each class dealt evenly
    assert folds == stratified_folds(labels, 3, seed=4)


def test_bad_inputs_name_the_fix():
    x, y = blobs(6, 3)
    with pytest.raises(ValueError, match="positive values"):
        train_head(x, y.tolist(), 2, l2_grid=(0.0,))
    with pytest.raises(ValueError, match="one label per row"):
        train_head(x, y[:3].tolist(), 2, l2_grid=(1.0,))
    with pytest.raises(ValueError, match="fewer --head-folds"):
        cross_validate(x, y, 2, (1.0,), folds=10, seed=0)
