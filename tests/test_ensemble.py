"""Vectorized ensembles: one batched call equals N separate networks (outputs and gradients)."""
import pytest
import torch
from torch import nn

from rlq.nets.ensemble import EnsembleLinear, EnsembleMLP


def test_ensemble_linear_equals_separate_members():
    torch.manual_seed(0)
    ens = EnsembleLinear(5, 7, 3)
    x = torch.randn(11, 7)
    y = ens(x)
    assert y.shape == (5, 11, 3)
    for i in range(5):
        torch.testing.assert_close(y[i], ens.member(i)(x))
    xs = torch.randn(5, 11, 7)  # one batch per member
    ys = ens(xs)
    for i in range(5):
        torch.testing.assert_close(ys[i], ens.member(i)(xs[i]))


def test_members_are_initialised_independently_like_nn_linear():
    torch.manual_seed(0)
    ens = EnsembleLinear(4, 256, 64)
    w = ens.weight.detach()
    assert not torch.equal(w[0], w[1])
    bound = 1 / 256 ** 0.5
    assert w.abs().max() <= bound + 1e-6 and ens.bias.abs().max() <= bound + 1e-6
    ref = nn.Linear(256, 64).weight.detach()
    assert abs(w.std().item() - ref.std().item()) < 0.1 * ref.std().item()


def test_ensemble_mlp_gradients_match_separate_mlps():
    torch.manual_seed(1)
    ens = EnsembleMLP(3, 4, (16, 16), 2)
    x = torch.randn(8, 4)
    target = torch.randn(3, 8, 2)
    ((ens(x) - target) ** 2).sum().backward()
    for i in range(3):
        layers = list(ens.layers)
        mlp = nn.Sequential(layers[0].member(i), nn.ReLU(), layers[1].member(i), nn.ReLU(), layers[2].member(i))
        ((mlp(x) - target[i]) ** 2).sum().backward()
        for mine, theirs in zip(layers, [mlp[0], mlp[2], mlp[4]]):
            torch.testing.assert_close(mine.weight.grad[i], theirs.weight.grad)
            torch.testing.assert_close(mine.bias.grad[i], theirs.bias.grad)


def test_bad_shapes_are_clear():
    ens = EnsembleLinear(2, 3, 4)
    with pytest.raises(ValueError, match=r"EnsembleLinear\(2\) takes \(B, 3\) or \(2, B, 3\) inputs, got \(3, 5, 3\)"):
        ens(torch.zeros(3, 5, 3))
    with pytest.raises(ValueError, match="n >= 1"):
        EnsembleLinear(0, 3, 4)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("members", [None, [3, 0]])
def test_custom_backward_equals_the_composed_ops(shared, members):
    """EnsembleLinear's own backward (weight gradient in the parameter's layout, first-layer weight gradient as
    (x^T g)^T) gives autograd's gradients of addmm / baddbmm, for the input, weight and bias, with a member
    subset too; under no_grad and autocast the composed ops run."""
    torch.manual_seed(0)
    ens = EnsembleLinear(5, 6, 4)
    idx = None if members is None else torch.tensor(members)
    k = 5 if idx is None else len(members)
    x = torch.randn(9, 6, requires_grad=True) if shared else torch.randn(k, 9, 6, requires_grad=True)
    y = ens(x, idx)
    g = torch.randn_like(y)
    y.backward(g)
    got = [ens.weight.grad.clone(), ens.bias.grad.clone(), x.grad.clone()]
    ens.zero_grad()
    x.grad = None
    w = ens.weight if idx is None else ens.weight.index_select(0, idx)
    b = ens.bias if idx is None else ens.bias.index_select(0, idx)
    if shared:
        ref = torch.addmm(b.reshape(-1), x, w.reshape(k * 4, 6).t()).view(9, k, 4).transpose(0, 1)
    else:
        ref = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    ref.backward(g)
    for a, r in zip(got, [ens.weight.grad, ens.bias.grad, x.grad]):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ens(x, idx), ref, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ens(x, idx).dtype == torch.bfloat16
