"""The fused native step of MLP Q-ensembles (``rlq/nets/native_ensemble.py``, ``ensemble_step.c``): bit-exact
against a torch emulation of its numerics contract, the same bits from both instruction-set paths, the bf16
conversion on special values, and the ``agent.native_step`` switch of ``agent=qensemble``."""
from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from rlq.agents import make_agent
from rlq.config import ConfigError
from rlq.nets import native_ensemble as ne
from rlq.nets.ensemble import EnsembleQNetwork, make_ensemble_encoder
from rlq.replay.base import Batch
from rlq.train import _compose, build_config

pytestmark = pytest.mark.skipif(ne.lib() is None, reason=f"native ensemble step: {ne.status()}")
BF16 = pytest.mark.skipif("avx512bf16" not in ne.available_isas(), reason="this CPU has no AVX512-BF16")

# (members, obs dim, hidden sizes, actions, batch): odd sizes exercise every padding and tail path
SHAPES = [(3, 4, (32, 32), 2, 16), (2, 5, (33, 17), 3, 7), (2, 1, (), 4, 1), (4, 6, (16,), 5, 31),
          (2, 3, (40, 24, 8), 2, 9)]


def _net(n, obs_dim, hidden, n_actions, seed=0):
    torch.manual_seed(seed)
    return EnsembleQNetwork(make_ensemble_encoder(n, "mlp", (obs_dim,), hidden), n_actions)


def _data(b, obs_dim, n_actions, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, obs_dim, generator=g), torch.randint(0, n_actions, (b,), generator=g),
            torch.randn(b, generator=g) * 3, torch.rand(b, generator=g) + 0.5)


# -- a torch emulation of the C contract, rounding for rounding --------------------------------------------------
def _bf(x: torch.Tensor) -> torch.Tensor:
    return x.float().to(torch.bfloat16).float()


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M x K) . b (K x N) as vdpbf16ps computes it: bf16 operands, per output one fp32 accumulator over the k
    pairs in order, adding a[2p+1] b[2p+1] and then a[2p] b[2p] (the bf16 products are exact in fp32)."""
    a, b = _bf(a), _bf(b)
    if a.shape[1] % 2:
        a, b = torch.cat([a, torch.zeros(a.shape[0], 1)], 1), torch.cat([b, torch.zeros(1, b.shape[1])], 0)
    acc = torch.zeros(a.shape[0], b.shape[1])
    for p in range(a.shape[1] // 2):
        acc = acc + a[:, 2 * p + 1:2 * p + 2] * b[2 * p + 1]
        acc = acc + a[:, 2 * p:2 * p + 1] * b[2 * p]
    return acc


def _sumsq(x: torch.Tensor) -> float:
    """The C's sum of squares: 8 double lanes (element e in lane e % 8, each summed in order), then paired."""
    v = x.detach().double().flatten().numpy()
    lanes = [float(np.cumsum(v[j::8] * v[j::8])[-1]) if v[j::8].size else 0.0 for j in range(8)]
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))


def _emulate(layers, obs, act, y, w, max_norm):
    n, b, L = layers[0].n, obs.shape[0], len(layers)
    qs, losses, norms, grads = [], [], [], [[None, None] for _ in layers]
    rows = torch.arange(b)
    for i in range(n):
        xs = [_bf(obs)]
        for l, lin in enumerate(layers):
            z = _mm(lin.weight[i].detach(), xs[-1].t()).t() + lin.bias[i].detach()  # h^T = W . x^T, + bias
            if l < L - 1:
                xs.append(_bf(torch.relu(z)))
        q = z[rows, act]
        d = q - y
        ad = d.abs()
        terms = w * torch.where(ad < 1, (0.5 * d) * d, ad - 0.5)
        losses.append(float(np.float32(sum(float(t) for t in terms) / b)))
        qs.append(q)
        g = torch.zeros(b, z.shape[1])
        g[rows, act] = (w * d.clamp(-1, 1)) / b
        sq, gi = 0.0, []
        for l in range(L - 1, -1, -1):
            gb = torch.zeros(g.shape[1])
            for r in range(b):
                gb = gb + g[r]
            gw = _mm(g.t(), xs[l])
            sq += _sumsq(gb)
            sq += _sumsq(gw)
            gi.append((l, gw, gb))
            if l:
                g = torch.where(xs[l] > 0, _mm(g, layers[l].weight[i].detach()), torch.zeros(()))
        norm = np.float32(math.sqrt(sq))
        norms.append(float(norm))
        factor = np.float32(max_norm) / (norm + np.float32(1e-6))
        for l, gw, gb in gi:
            if max_norm > 0 and math.isfinite(max_norm) and factor < 1:
                gw, gb = gw * float(factor), gb * float(factor)
            grads[l][0] = (grads[l][0] or []) + [gw]
            grads[l][1] = (grads[l][1] or []) + [gb]
    flat = [torch.stack(t) for pair in grads for t in pair]
    return torch.stack(qs), torch.tensor(losses), torch.tensor(norms), flat


def _native(layers, isa, obs, act, y, w, max_norm):
    step = ne.NativeEnsembleStep(layers, isa)
    for lin in layers:
        lin.weight.grad = lin.bias.grad = None
    q, loss, norms = step.step(layers, obs, act, y, w, max_norm)
    grads = [t.grad.clone() for lin in layers for t in (lin.weight, lin.bias)]
    return q, loss, norms, grads, step.forward(layers, obs)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (s[0], s[1], *s[2], s[3], s[4]))))
@pytest.mark.parametrize("max_norm", [0.0, 1e-3])
def test_scalar_step_is_bit_exact_against_the_emulated_contract(shape, max_norm):
    n, obs_dim, hidden, n_actions, b = shape
    layers = ne.ensemble_linears(_net(*shape[:4]))
    obs, act, y, w = _data(b, obs_dim, n_actions)
    q, loss, norms, grads, fwd = _native(layers, "scalar", obs, act, y, w, max_norm)
    eq, eloss, enorms, egrads = _emulate(layers, obs, act, y, w, max_norm)
    assert torch.equal(q, eq)
    assert torch.equal(loss, eloss)
    assert torch.equal(norms, enorms)
    for got, want in zip(grads, egrads):
        assert torch.equal(got, want)
    assert torch.equal(fwd[:, torch.arange(b), act], q)  # the forward alone gives the step's Q-values
    if max_norm:
        assert (norms > max_norm).all()  # the clip was exercised


@BF16
@pytest.mark.parametrize("shape", SHAPES + [(10, 4, (256, 256), 2, 64)],
                         ids=lambda s: "x".join(map(str, (s[0], s[1], *s[2], s[3], s[4]))))
def test_avx512bf16_and_scalar_paths_give_the_same_bits(shape):
    n, obs_dim, hidden, n_actions, b = shape
    layers = ne.ensemble_linears(_net(*shape[:4]))
    obs, act, y, w = _data(b, obs_dim, n_actions, seed=1)
    a = _native(layers, "scalar", obs, act, y, w, 0.05)
    v = _native(layers, "avx512bf16", obs, act, y, w, 0.05)
    for x, z in zip([*a[:3], *a[3], a[4]], [*v[:3], *v[3], v[4]]):
        assert torch.equal(x, z)
    members = torch.tensor([n - 1, 0])
    step = ne.NativeEnsembleStep(layers, "avx512bf16")
    assert torch.equal(step.forward(layers, obs, members), v[4][members])


@pytest.mark.parametrize("isa", ["scalar", pytest.param("avx512bf16", marks=BF16)])
def test_subnormal_sums_flush_to_zero_as_vdpbf16ps_does(isa):
    """2^-70 * 2^-70 = 2^-140 is below fp32's normal range: flushed (both paths); 2^-120 is kept."""
    net = _net(1, 2, (), 1)
    layers = ne.ensemble_linears(net)
    step = ne.NativeEnsembleStep(layers, isa)
    for e, want in ((-70, 0.0), (-60, 2 * 2.0 ** -120)):
        with torch.no_grad():
            layers[0].weight.fill_(2.0 ** e)
            layers[0].bias.zero_()
        assert step.forward(layers, torch.full((1, 2), 2.0 ** e)).item() == want


def test_forward_matches_the_fp32_network_up_to_bf16_rounding():
    net = _net(4, 6, (64, 64), 3)
    layers = ne.ensemble_linears(net)
    obs = torch.randn(32, 6)
    got = ne.NativeEnsembleStep(layers).forward(layers, obs)
    want = net(obs).detach()
    assert got.shape == want.shape == (4, 32, 3)
    assert (got - want).abs().max() < 0.02 * want.abs().max()


@pytest.mark.parametrize("isa", ["scalar", pytest.param("avx512bf16", marks=BF16)])
def test_bf16_conversion_rounds_to_nearest_even_and_flushes_subnormals(isa):
    specials = torch.tensor([1.0, -2.5, 1.00390625, 1.01171875, 1.0 + 2 ** -8 + 2 ** -20, 3.0e38, 3.4e38,
                             float("inf"), -float("inf"), 1e-39, -1e-39, 1.2e-38, 0.0, -0.0])
    x = torch.cat([specials, torch.randn(37) * 100])  # 51 values: the 16-wide loop and its tail
    got = ne.to_bf16(x, isa)
    normal = x.abs() >= torch.finfo(torch.float32).tiny
    assert torch.equal(got[normal].view(torch.int16), x[normal].to(torch.bfloat16).view(torch.int16))
    sub = (x != 0) & ~normal
    assert (got[sub] == 0).all() and torch.equal(torch.signbit(got[sub].float()), torch.signbit(x[sub]))
    nan = ne.to_bf16(torch.tensor([float("nan"), -float("nan")]), isa)
    assert torch.isnan(nan.float()).all()


def test_bad_inputs_are_one_line_errors():
    layers = ne.ensemble_linears(_net(2, 4, (8,), 2))
    step = ne.NativeEnsembleStep(layers, "scalar")
    obs, act, y, w = _data(4, 4, 2)
    with pytest.raises(ValueError, match=r"an action is outside \[0, 2\)"):
        step.step(layers, obs, torch.tensor([0, 1, 2, 0]), y, w, 0.0)
    with pytest.raises(ValueError, match="a member index is outside \\[0, 2\\)"):
        step.forward(layers, obs, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="the ensemble's first layer takes 4 inputs, got observations of 5 values"):
        step.forward(layers, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="4 observations but 3 actions, 4 targets and 4 weights"):
        step.step(layers, obs, act[:3], y, w, 0.0)
    with pytest.raises(ValueError, match="isa='avx2' is not an instruction-set path: choose one of scalar, avx512bf16"):
        ne.NativeEnsembleStep(layers, "avx2")
    assert ne.ensemble_linears(EnsembleQNetwork(make_ensemble_encoder(2, "cnn", (4, 84, 84)), 2)) is None


# -- agent=qensemble agent.native_step -------------------------------------------------------------------------------
CARTPOLE = gym.spaces.Box(-1.0, 1.0, (4,), np.float32), gym.spaces.Discrete(2)


def _agent(*ov):
    ov = ["agent=qensemble", *ov]
    cfg = build_config(_compose(ov), ov)
    return make_agent(cfg.agent, *CARTPOLE, seed=0)


def _batch(b=32, seed=0):
    obs, act, rew, w = _data(b, 4, 2, seed)
    g = torch.Generator().manual_seed(seed + 100)
    return Batch(obs=obs, action=act, reward=rew, discount=torch.full((b,), 0.99),
                 next_obs=torch.randn(b, 4, generator=g), idx=torch.arange(b), weights=torch.ones(b))


@pytest.mark.parametrize("reduction", ["min", "redq"])
def test_native_update_matches_the_torch_bf16_update(reduction):
    """The same update as the torch ops with agent.amp=bf16 up to the rounding differences of two bf16
    implementations: losses, Q-values, priorities, the parameters after Adam; Double DQN's online forward and the
    hard target copy included."""
    ov = ("agent.n_members=5", f"agent.target_reduction={reduction}", "agent.double=true",
          "agent.target_update_period=2", "agent.amp=bf16")
    torch.manual_seed(0)
    ref = _agent(*ov, "agent.native_step=false")
    torch.manual_seed(0)
    nat = _agent(*ov, "agent.native_step=true")
    assert nat._native_active() and not ref._native_active()
    for i in range(6):
        batch = _batch(seed=i)
        a, b = ref.update(batch), nat.update(batch)
        assert b.metrics["loss"] == pytest.approx(a.metrics["loss"], rel=0.02)
        assert b.metrics["q_mean"] == pytest.approx(a.metrics["q_mean"], rel=0.02, abs=2e-3)
        # (an argmax over actions may flip between the two roundings: a few priorities differ more)
        assert np.mean(np.isclose(b.priorities, a.priorities, rtol=0.02, atol=5e-3)) >= 0.9
    moved = [torch.cat([p.flatten() for p in x.online.parameters()]) for x in (ref, nat)]
    assert torch.nn.functional.cosine_similarity(moved[0], moved[1], dim=0) > 0.9999
    assert nat.updates == ref.updates == 6
    assert torch.equal(nat.target.state_dict()["head.0.weight"], nat.online.state_dict()["head.0.weight"])


def test_native_update_skips_a_non_finite_batch():
    a = _agent("agent.n_members=3", "agent.amp=bf16", "agent.native_step=true")
    before = [p.detach().clone() for p in a.online.parameters()]
    batch = _batch()
    batch.reward[3] = float("nan")
    out = a.update(batch)
    assert math.isnan(out.metrics["loss"]) and a.updates == 0
    assert all(torch.equal(p, q) for p, q in zip(a.online.parameters(), before))
    assert math.isfinite(a.update(_batch(seed=1)).metrics["loss"]) and a.updates == 1


def test_auto_uses_the_native_step_on_one_thread_with_avx512bf16():
    a = _agent("agent.n_members=3", "agent.amp=bf16")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert a._native_active() == ("avx512bf16" in ne.available_isas())
        torch.set_num_threads(2)
        assert not a._native_active()
    finally:
        torch.set_num_threads(threads)
    assert _agent("agent.n_members=3")._native is None  # fp32: the torch ops


@pytest.mark.parametrize("ov, msg", [
    (("agent.native_step=true",), "agent.native_step=true cannot be used: it needs agent.amp=bf16"),
    (("agent.native_step=true", "agent.amp=bf16", "env=Pong"), "it needs MLP members"),
])
def test_native_step_true_says_why_it_cannot_run(ov, msg):
    ov = ["agent=qensemble", *ov]
    cfg = build_config(_compose(ov), ov)
    obs = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8) if "env=Pong" in ov else CARTPOLE[0]
    with pytest.raises(ValueError, match=msg):
        make_agent(cfg.agent, obs, gym.spaces.Discrete(6), seed=0)


def test_bad_native_step_value_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"agent.native_step='sometimes' is not a choice: use auto, true or false"):
        ov = ["agent=qensemble", "agent.native_step=sometimes"]
        build_config(_compose(ov), ov)
