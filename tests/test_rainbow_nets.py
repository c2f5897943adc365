"""Rainbow network pieces: NoisyLinear (Fortunato et al. 2018) and the C51 head / projection / loss
(Bellemare et al. 2017). The projection is checked against a direct per-sample, per-atom loop."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlq.nets import QNetwork
from rlq.nets.distributional import (CategoricalHead, categorical_loss, categorical_projection, gather_actions,
                                     linear_factory, make_linear)
from rlq.nets.noisy import NoisyLinear, has_noisy, noise_disabled, reset_noise, set_noise


# ----------------------------------------------------------------------------------------------------
# categorical projection
# ----------------------------------------------------------------------------------------------------
def reference_projection(next_probs, reward, discount, support):
    """Bellemare et al. 2017, Algorithm 1, written as plain loops over samples and atoms."""
    z = [float(v) for v in support]
    n = len(z)
    v_min, v_max = z[0], z[-1]
    dz = (v_max - v_min) / (n - 1)
    out = torch.zeros(next_probs.shape, dtype=torch.float64)
    for i in range(next_probs.shape[0]):
        r, d = float(reward[i]), float(discount[i])
        for j in range(n):
            p = float(next_probs[i, j])
            tz = min(max(r + d * z[j], v_min), v_max)
            b = (tz - v_min) / dz
            lo, up = math.floor(b), math.ceil(b)
            lo, up = min(max(lo, 0), n - 1), min(max(up, 0), n - 1)
            if lo == up:
                out[i, lo] += p
            else:
                out[i, lo] += p * (up - b)
                out[i, up] += p * (b - lo)
    return out


def random_probs(b, atoms, gen, dtype=torch.float32):
    logits = torch.randn(b, atoms, generator=gen, dtype=torch.float64) * 2
    return torch.softmax(logits, dim=1).to(dtype)


@pytest.mark.parametrize("atoms,v_min,v_max", [(51, -10.0, 10.0), (11, -5.0, 5.0), (21, 0.0, 200.0), (2, -1.0, 1.0)])
def test_projection_matches_reference_loop(atoms, v_min, v_max):
    gen = torch.Generator().manual_seed(atoms)
    support = torch.linspace(v_min, v_max, atoms)
    b = 64
    probs = random_probs(b, atoms, gen)
    span = v_max - v_min
    # rewards well inside and far past both edges
    reward = (torch.rand(b, generator=gen) * 3 - 1.5) * span
    discount = torch.full((b,), 0.99)
    discount[::4] = 0.0              # terminals
    discount[1::4] = 0.99 ** 3       # 3-step bootstrap
    discount[2::8] = 1.0
    reward[3] = 10 * span            # everything clamps to v_max
    reward[5] = -10 * span           # everything clamps to v_min
    reward[6] = 0.0
    out = categorical_projection(probs, reward, discount, support)
    ref = reference_projection(probs, reward, discount, support)
    assert out.shape == (b, atoms) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)  # float32 b has ~1e-6 error
    torch.testing.assert_close(out.sum(1), torch.ones(b), atol=1e-5, rtol=0)
    assert (out >= 0).all()
    # past the edges: all mass on one edge atom
    assert out[3, -1] == pytest.approx(1.0, abs=1e-6) and out[5, 0] == pytest.approx(1.0, abs=1e-6)


def test_projection_float64_exact_match():
    gen = torch.Generator().manual_seed(1)
    support = torch.linspace(-10, 10, 51, dtype=torch.float64)
    probs = random_probs(128, 51, gen, torch.float64)
    reward = torch.randn(128, generator=gen, dtype=torch.float64) * 8
    discount = torch.rand(128, generator=gen, dtype=torch.float64)
    discount[::3] = 0.0
    out = categorical_projection(probs, reward, discount, support)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_projection(probs, reward, discount, support), atol=1e-12, rtol=0)


def test_projection_exact_atoms_l_equals_u():
    """With dz = 1 and integer rewards, discount 1 shifts the distribution by whole atoms: every b is an
    integer (l == u) and no mass may be lost."""
    support = torch.linspace(-5, 5, 11)
    gen = torch.Generator().manual_seed(2)
    probs = random_probs(4, 11, gen)
    reward = torch.tensor([0.0, 2.0, -3.0, 1.0])
    discount = torch.tensor([1.0, 1.0, 1.0, 0.0])
    out = categorical_projection(probs, reward, discount, support)
    torch.testing.assert_close(out, reference_projection(probs, reward, discount, support).float(), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(out[0], probs[0])                       # identity
    shifted = torch.zeros(11)
    shifted[2:] = probs[1, :-2]
    shifted[-1] += probs[1, -2:].sum()                                 # mass pushed past v_max piles up there
    torch.testing.assert_close(out[1], shifted)
    shifted = torch.zeros(11)
    shifted[:-3] = probs[2, 3:]
    shifted[0] += probs[2, :3].sum()
    torch.testing.assert_close(out[2], shifted)
    expected = torch.zeros(11)
    expected[6] = 1.0                                                  # terminal, reward 1 = atom 6
    torch.testing.assert_close(out[3], expected)
    torch.testing.assert_close(out.sum(1), torch.ones(4))


def test_projection_terminal_puts_mass_at_clamped_reward():
    support = torch.linspace(-5, 5, 11)
    probs = random_probs(3, 11, torch.Generator().manual_seed(3))
    out = categorical_projection(probs, torch.tensor([2.3, 50.0, -7.0]), torch.zeros(3), support)
    expected = torch.zeros(3, 11)
    expected[0, 7], expected[0, 8] = 0.7, 0.3   # b = 7.3
    expected[1, 10] = 1.0
    expected[2, 0] = 1.0
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_projection_preserves_mean_inside_support():
    """Away from the edges the projection keeps the expectation: E[m] = r + discount * E[p]."""
    support = torch.linspace(-10, 10, 51)
    gen = torch.Generator().manual_seed(4)
    probs = torch.zeros(32, 51)
    probs[:, 20:31] = random_probs(32, 11, gen)      # mass on [-2, 2]
    reward = torch.rand(32, generator=gen) * 4 - 2
    discount = torch.full((32,), 0.99 ** 3)
    out = categorical_projection(probs, reward, discount, support)
    torch.testing.assert_close(out @ support, reward + discount * (probs @ support), atol=1e-4, rtol=0)


def test_projection_scalar_discount_and_shape_errors():
    support = torch.linspace(-1, 1, 5)
    probs = random_probs(6, 5, torch.Generator().manual_seed(5))
    reward = torch.linspace(-0.5, 0.5, 6)
    a = categorical_projection(probs, reward, 0.9, support)
    b = categorical_projection(probs, reward, torch.full((6,), 0.9), support)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        categorical_projection(probs[:, :4], reward, 0.9, support)
    with pytest.raises(ValueError):
        categorical_projection(probs[0], reward, 0.9, support)


# ----------------------------------------------------------------------------------------------------
# loss, head
# ----------------------------------------------------------------------------------------------------
def test_categorical_loss_is_cross_entropy():
    gen = torch.Generator().manual_seed(6)
    log_p = torch.log_softmax(torch.randn(8, 51, generator=gen), 1).requires_grad_(True)
    target = random_probs(8, 51, gen).requires_grad_(True)
    loss = categorical_loss(log_p, target)
    assert loss.shape == (8,)
    by_hand = torch.stack([-(target[i] * log_p[i]).sum() for i in range(8)])
    torch.testing.assert_close(loss, by_hand)
    assert (loss.detach() >= 0).all()
    loss.sum().backward()
    torch.testing.assert_close(log_p.grad, -target.detach())
    assert target.grad is None  # the target is detached
    # cross-entropy >= entropy of the target, with equality when p = target
    same = categorical_loss(target.detach().log(), target.detach())
    entropy = -(target.detach() * target.detach().log()).sum(1)
    torch.testing.assert_close(same, entropy)


@pytest.mark.parametrize("dueling", [False, True])
@pytest.mark.parametrize("hidden", [0, 16])
@pytest.mark.parametrize("noisy", [False, True])
def test_categorical_head_shapes_normalized(dueling, hidden, noisy):
    torch.manual_seed(0)
    head = CategoricalHead(12, 4, atoms=21, v_min=-3, v_max=7, dueling=dueling, hidden=hidden, noisy=noisy)
    h = torch.randn(5, 12)
    log_p = head(h)
    assert log_p.shape == (5, 4, 21) and log_p.dtype == torch.float32
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(5, 4))
    assert head.support.shape == (21,)
    torch.testing.assert_close(head.support, torch.linspace(-3, 7, 21))
    assert head.delta_z == pytest.approx(0.5)
    assert "support" in head.state_dict()
    assert has_noisy(head) == noisy
    assert not any(isinstance(m, nn.Linear) for m in head.modules()) if noisy else not has_noisy(head)
    q = head.q_values(log_p)
    assert q.shape == (5, 4)
    torch.testing.assert_close(q, (log_p.exp() * torch.linspace(-3, 7, 21)).sum(-1))
    assert (q >= -3 - 1e-5).all() and (q <= 7 + 1e-5).all()
    if dueling:
        assert head.value is not None and head.advantage is not None
    log_p.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_dueling_categorical_combines_logits():
    torch.manual_seed(1)
    head = CategoricalHead(6, 3, atoms=7, dueling=True)
    h = torch.randn(4, 6)
    v = head.value(h).view(4, 1, 7)
    a = head.advantage(h).view(4, 3, 7)
    expected = torch.log_softmax(v + a - a.mean(1, keepdim=True), dim=-1)
    torch.testing.assert_close(head(h), expected)
    # shifting every action's advantage logits by the same vector changes nothing (identifiability)
    with torch.no_grad():
        head.advantage.bias.add_(torch.randn(7).repeat(3))
    torch.testing.assert_close(head(h), expected)


def test_categorical_head_q_values_expectation_by_hand():
    head = CategoricalHead(3, 2, atoms=3, v_min=-1, v_max=1)
    p = torch.tensor([[[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]])
    torch.testing.assert_close(head.q_values(p.log()), torch.tensor([[0.3, -1.0]]))


def test_categorical_head_rejects_bad_support():
    with pytest.raises(ValueError):
        CategoricalHead(3, 2, atoms=1)
    with pytest.raises(ValueError):
        CategoricalHead(3, 2, v_min=1, v_max=1)


def test_gather_actions():
    log_p = torch.randn(4, 3, 5)
    actions = torch.tensor([2, 0, 1, 2])
    torch.testing.assert_close(gather_actions(log_p, actions), torch.stack([log_p[i, actions[i]] for i in range(4)]))


def test_c51_learns_fixed_point_of_self_loop():
    """One state looping on itself with reward 1 and discount 0.9: C51 (projection + cross-entropy) must
    converge to Q = 1 / (1 - 0.9) = 10 for the rewarded action and 0 for the terminal one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-off dominates, and is slow on a loaded machine
    try:
        _self_loop(steps=400)
    finally:
        torch.set_num_threads(threads)


def _self_loop(steps):
    torch.manual_seed(0)
    net = QNetwork(nn.Identity(), CategoricalHead(1, 2, atoms=51, v_min=0, v_max=20, dueling=True))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    obs = torch.ones(2, 1)
    action = torch.tensor([0, 1])
    reward = torch.tensor([1.0, 0.0])
    discount = torch.tensor([0.9, 0.0])          # action 1 ends the episode with reward 0
    for _ in range(steps):
        with torch.no_grad():
            log_p_next = net(obs)
            a_star = net.head.q_values(log_p_next).argmax(1)
            m = categorical_projection(gather_actions(log_p_next, a_star).exp(), reward, discount, net.head.support)
        loss = categorical_loss(gather_actions(net(obs), action), m).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = net.head.q_values(net(obs))[0]
    assert q[0].item() == pytest.approx(10.0, abs=0.3)
    assert q[1].item() == pytest.approx(0.0, abs=0.1)


# ----------------------------------------------------------------------------------------------------
# NoisyLinear
# ----------------------------------------------------------------------------------------------------
def f(x):
    return x.sign() * x.abs().sqrt()


def test_noisy_init_values():
    torch.manual_seed(0)
    layer = NoisyLinear(400, 30, sigma0=0.5)
    bound = 1 / math.sqrt(400)
    assert layer.weight_mu.shape == (30, 400) and layer.bias_mu.shape == (30,)
    assert layer.weight_sigma.shape == (30, 400) and layer.bias_sigma.shape == (30,)
    torch.testing.assert_close(layer.weight_sigma, torch.full((30, 400), 0.5 * bound))
    torch.testing.assert_close(layer.bias_sigma, torch.full((30,), 0.5 * bound))
    assert layer.weight_mu.abs().max() <= bound and layer.bias_mu.abs().max() <= bound
    assert layer.weight_mu.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # U(-b, b)
    assert NoisyLinear(16, 4, sigma0=0.1).weight_sigma[0, 0].item() == pytest.approx(0.1 / 4)
    assert layer.epsilon_in.shape == (400,) and layer.epsilon_out.shape == (30,)
    assert layer.epsilon_in.abs().sum() > 0  # noise is sampled at construction
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"weight_mu", "weight_sigma", "bias_mu", "bias_sigma"}
    assert {n for n, _ in layer.named_buffers()} == {"epsilon_in", "epsilon_out"}


def test_noisy_forward_is_factorized_noise_from_global_rng():
    layer = NoisyLinear(7, 5)
    torch.manual_seed(123)
    layer.reset_noise()
    torch.manual_seed(123)
    eps_in, eps_out = f(torch.randn(7)), f(torch.randn(5))
    torch.testing.assert_close(layer.epsilon_in, eps_in)
    torch.testing.assert_close(layer.epsilon_out, eps_out)
    x = torch.randn(3, 7)
    w = layer.weight_mu + layer.weight_sigma * torch.outer(eps_out, eps_in)
    bias = layer.bias_mu + layer.bias_sigma * eps_out
    torch.testing.assert_close(layer(x), F.linear(x, w, bias))


def test_noisy_noise_changes_after_reset_and_is_fixed_between():
    torch.manual_seed(0)
    layer = NoisyLinear(10, 6)
    x = torch.randn(4, 10)
    y1 = layer(x)
    torch.testing.assert_close(layer(x), y1)   # no resampling on forward
    layer.reset_noise()
    y2 = layer(x)
    assert not torch.allclose(y1, y2)
    assert not torch.allclose(y2, F.linear(x, layer.weight_mu, layer.bias_mu))


def test_noisy_reproducible_under_manual_seed():
    x = torch.randn(4, 10)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        layer = NoisyLinear(10, 6)
        a = layer(x)
        layer.reset_noise()
        outs.append((a, layer(x), layer.state_dict()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for k in outs[0][2]:
        torch.testing.assert_close(outs[0][2][k], outs[1][2][k])
    # an explicit generator works too and leaves the global RNG alone
    layer = NoisyLinear(10, 6)
    state = torch.get_rng_state()
    layer.reset_noise(torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())


def test_noisy_mean_mode_eval_and_flag():
    torch.manual_seed(0)
    layer = NoisyLinear(10, 6)
    x = torch.randn(4, 10)
    mean = F.linear(x, layer.weight_mu, layer.bias_mu)
    layer.eval()
    assert not layer.noisy
    y = layer(x)
    layer.reset_noise()
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(y, mean)
    layer.train()
    assert layer.noisy
    assert not torch.allclose(layer(x), mean)
    layer.noise_enabled = False
    torch.testing.assert_close(layer(x), mean)
    layer.noise_enabled = True
    net = nn.Sequential(NoisyLinear(10, 8), nn.ReLU(), NoisyLinear(8, 3))
    with noise_disabled(net):
        assert all(not m.noisy for m in net if isinstance(m, NoisyLinear))
        a = net(x)
        reset_noise(net)
        torch.testing.assert_close(net(x), a)
    assert all(m.noise_enabled for m in net if isinstance(m, NoisyLinear))
    set_noise(net, False)
    assert all(not m.noise_enabled for m in net if isinstance(m, NoisyLinear))
    torch.testing.assert_close(net(x), a)
    set_noise(net, True)
    assert not torch.allclose(net(x), a)


def test_noisy_state_dict_round_trip():
    torch.manual_seed(0)
    src = NoisyLinear(9, 4)
    src.reset_noise()
    sd = src.state_dict()
    assert set(sd) == {"weight_mu", "weight_sigma", "bias_mu", "bias_sigma", "epsilon_in", "epsilon_out"}
    dst = NoisyLinear(9, 4)
    x = torch.randn(3, 9)
    assert not torch.allclose(dst(x), src(x))
    dst.load_state_dict(sd)
    torch.testing.assert_close(dst(x), src(x))
    # through torch.save / load
    import io
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    other = NoisyLinear(9, 4)
    other.load_state_dict(torch.load(buf))
    torch.testing.assert_close(other(x), src(x))


def test_noisy_gradient_flows_to_mu_and_sigma():
    torch.manual_seed(0)
    layer = NoisyLinear(5, 3)
    x = torch.randn(8, 5)
    layer(x).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # sigma's gradient is mu's gradient times the noise
    torch.testing.assert_close(layer.weight_sigma.grad,
                               layer.weight_mu.grad * torch.outer(layer.epsilon_out, layer.epsilon_in))
    torch.testing.assert_close(layer.bias_sigma.grad, layer.bias_mu.grad * layer.epsilon_out)
    # in mean mode sigma gets no gradient
    layer.zero_grad()
    layer.eval()
    layer(x).pow(2).sum().backward()
    assert layer.weight_sigma.grad is None or layer.weight_sigma.grad.abs().sum() == 0


def test_noisy_helpers_and_factories():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), NoisyLinear(8, 8), nn.ReLU(), NoisyLinear(8, 2))
    assert has_noisy(net) and not has_noisy(nn.Sequential(nn.Linear(4, 2)))
    before = [m.epsilon_in.clone() for m in net if isinstance(m, NoisyLinear)]
    assert reset_noise(net) == 2
    after = [m.epsilon_in for m in net if isinstance(m, NoisyLinear)]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert reset_noise(nn.Linear(2, 2)) == 0
    assert isinstance(make_linear(3, 2), nn.Linear)
    layer = make_linear(3, 2, noisy=True, sigma0=0.3)
    assert isinstance(layer, NoisyLinear) and layer.sigma0 == 0.3
    assert linear_factory(False) is nn.Linear
    noisy = linear_factory(True, 0.4)(6, 2)
    assert isinstance(noisy, NoisyLinear) and noisy.sigma0 == 0.4 and noisy.weight_mu.shape == (2, 6)


def test_noisy_categorical_network_modes():
    torch.manual_seed(0)
    net = QNetwork(nn.Identity(), CategoricalHead(6, 3, atoms=11, dueling=True, hidden=8, noisy=True))
    x = torch.randn(4, 6)
    a = net(x)
    reset_noise(net)
    b = net(x)
    assert not torch.allclose(a, b)
    net.eval()
    c = net(x)
    reset_noise(net)
    torch.testing.assert_close(net(x), c)
    # a target copy via load_state_dict carries the noise, and the support
    target = QNetwork(nn.Identity(), CategoricalHead(6, 3, atoms=11, dueling=True, hidden=8, noisy=True))
    net.train()
    target.load_state_dict(net.state_dict())
    torch.testing.assert_close(target(x), net(x))
    with torch.inference_mode():
        reset_noise(target)   # allowed inside inference mode
    assert not torch.allclose(target(x), net(x))
