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


@pytest.mark.parametrize("shared", [True, False])
def test_bf16_autocast_backward_equals_the_composed_autocast_ops(shared):
    """Under bf16 autocast the own backward runs in bf16 too: outputs bf16, parameter and input gradients fp32
    (autograd casts them), equal to autocast's composed addmm / baddbmm up to the order of the bf16 sums."""
    torch.manual_seed(0)
    ens = EnsembleLinear(4, 32, 16)
    x = torch.randn(8, 32, requires_grad=True) if shared else torch.randn(4, 8, 32, requires_grad=True)
    g = torch.randn(4, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ens(x)
    assert y.dtype == torch.bfloat16
    y.float().backward(g)
    got = [ens.weight.grad.clone(), ens.bias.grad.clone(), x.grad.clone()]
    assert all(t.dtype == torch.float32 for t in got)
    ens.zero_grad()
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if shared:
            ref = torch.addmm(ens.bias.reshape(-1), x, ens.weight.reshape(64, 32).t()).view(8, 4, 16).transpose(0, 1)
        else:
            ref = torch.baddbmm(ens.bias.unsqueeze(1), x, ens.weight.transpose(1, 2))
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=0)
    ref.float().backward(g)
    for a, r in zip(got, [ens.weight.grad, ens.bias.grad, x.grad]):
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)  # bf16 rounding of differently ordered sums
        assert (a - r).abs().max() <= 0.02 * r.abs().max()


def test_bf16_weights_of_a_frozen_layer_are_cast_once_and_recast_after_any_write():
    """A target network's bf16 weights are cached between forwards and follow every in-place change; a trained
    layer's are cast at every forward (the fused Adam step does not bump version counters)."""
    torch.manual_seed(0)
    ens = EnsembleLinear(3, 8, 5)
    x = torch.randn(3, 6, 8)

    def fresh():
        return torch.baddbmm(ens.bias.unsqueeze(1).bfloat16(), x.bfloat16(), ens.weight.bfloat16().transpose(1, 2))

    opt = torch.optim.Adam(ens.parameters(), lr=0.1, fused=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = ens(x)
    assert "_amp_cache" not in ens.__dict__
    ens(x).sum().backward()
    opt.step()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ens(x), fresh()) and not torch.equal(ens(x), before)
        ens.requires_grad_(False)  # as the agents' target networks
        first = ens(x)
        cached = ens.__dict__["_amp_cache"][1]
        assert torch.equal(first, fresh())
        assert ens(x).dtype == torch.bfloat16 and ens.__dict__["_amp_cache"][1] is cached  # reused
        ens.weight.mul_(2.0)  # in-place writes: a hard copy (load_state_dict), Polyak lerp_
        assert torch.equal(ens(x), fresh()) and not torch.equal(ens(x), first)
        torch._foreach_lerp_([ens.weight], [torch.zeros(3, 5, 8)], 0.5)
        assert torch.equal(ens(x), fresh())
        ens.load_state_dict({"weight": torch.zeros(3, 5, 8), "bias": torch.ones(3, 5)})
        assert torch.equal(ens(x), torch.ones(3, 6, 5, dtype=torch.bfloat16))
        ens.bias = torch.nn.Parameter(torch.full((3, 5), 2.0), requires_grad=False)  # a replaced parameter
        assert torch.equal(ens(x), torch.full((3, 6, 5), 2.0, dtype=torch.bfloat16))
        ens.weight[2] = 1.0  # a member subset reads the cached cast
        idx = torch.tensor([2, 0])
        want = torch.baddbmm(ens.bias[idx].unsqueeze(1).bfloat16(), x[:2].bfloat16(),
                             ens.weight[idx].bfloat16().transpose(1, 2))
        assert torch.equal(ens(x[:2], idx), want)
