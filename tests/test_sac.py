"""SAC, discrete SAC and DSAC-T / DSAC-v1: every loss term against hand-computed values on tiny batches, the
twin-distribution choice, state round trips, quantized networks, actions and their bounds."""
from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from rlq.agents import make_agent
from rlq.agents.sac import (alpha_loss, discrete_actor_loss, discrete_sac_target, dsac_t_critic_loss,
                            dsac_v1_critic_loss, sac_target, squashed_log_prob)
from rlq.replay.base import Batch
from rlq.train import _compose, build_config

BOX = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
PENDULUM_ACT = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
T = torch.tensor


def _agent(name, obs_space=BOX, act_space=PENDULUM_ACT, *extra, quant=None):
    ov = [f"agent={name}", *extra]
    cfg = build_config(_compose(ov), ov)
    return make_agent(cfg.agent, obs_space, act_space, seed=0, quant=cfg.quant if quant else None)


def _batch(obs_space, act_space, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(b, *obs_space.shape, generator=g) * 2 - 1
    nxt = torch.rand(b, *obs_space.shape, generator=g) * 2 - 1
    if isinstance(act_space, gym.spaces.Discrete):
        act = torch.randint(0, act_space.n, (b,), generator=g)
    else:
        act = torch.rand(b, *act_space.shape, generator=g) * (act_space.high[0] - act_space.low[0]) + act_space.low[0]
    return Batch(obs=obs, action=act, reward=torch.randn(b, generator=g), discount=torch.full((b,), 0.99),
                 next_obs=nxt, idx=torch.arange(b), weights=torch.ones(b))


def _roundtrip(state):
    """Through bytes, as a checkpoint goes (and loadable with weights_only=True: no pickled objects)."""
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- loss terms by hand -------------------------------------------------------------------------------------------
def test_squashed_log_prob_equals_torch_tanh_transform():
    mean, log_std = T([[0.3, -1.2]]), T([[-0.5, 0.4]])
    u = T([[0.8, -2.5]])
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, log_std.exp()),
                                                       [torch.distributions.TanhTransform()])
    want = dist.log_prob(torch.tanh(u)).sum(-1)
    torch.testing.assert_close(squashed_log_prob(u, mean, log_std), want, rtol=1e-5, atol=1e-5)
    # stable where tanh saturates: log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) ~ -2|u| + 2 log 2
    far = squashed_log_prob(T([[30.0, -30.0]]), T([[30.0, -30.0]]), T([[0.0, 0.0]]))
    assert torch.isfinite(far).all()
    assert far.item() == pytest.approx(2 * (-0.5 * math.log(2 * math.pi)) + 2 * (2 * 30 - 2 * math.log(2)), rel=1e-5)


def test_sac_critic_target_by_hand():
    y = sac_target(T([1.0, 0.5]), T([0.99, 0.0]), T([2.0, 3.0]), T([1.5, 4.0]), T([-1.0, 0.2]), 0.1)
    # min(2, 1.5) - 0.1 * (-1) = 1.6 -> 1 + 0.99 * 1.6; a terminal transition keeps only its reward
    torch.testing.assert_close(y, T([1.0 + 0.99 * 1.6, 0.5]))


def test_discrete_sac_target_and_actor_loss_by_hand():
    logp = torch.log(T([[0.25, 0.75]]))
    q1, q2 = T([[1.0, 2.0]]), T([[3.0, 0.0]])  # min: [1, 0]
    v = 0.25 * (1 - 0.5 * math.log(0.25)) + 0.75 * (0 - 0.5 * math.log(0.75))
    y = discrete_sac_target(T([0.1]), T([0.9]), logp, q1, q2, 0.5)
    assert y.item() == pytest.approx(0.1 + 0.9 * v, abs=1e-6)
    loss = discrete_actor_loss(logp, torch.min(q1, q2), 0.5)
    assert loss.item() == pytest.approx(0.25 * (0.5 * math.log(0.25) - 1) + 0.75 * (0.5 * math.log(0.75)), abs=1e-6)
    # the actor's gradient moves probability toward the action with the larger soft value
    logits = torch.zeros(1, 2, requires_grad=True)
    discrete_actor_loss(torch.log_softmax(logits, 1), T([[1.0, 0.0]]), 0.1).backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]


def test_alpha_loss_moves_alpha_toward_the_target_entropy():
    log_alpha = torch.zeros((), requires_grad=True)
    loss = alpha_loss(log_alpha, T([0.2, 0.4]), target_entropy=1.0)  # entropy 0.3 below 1.0: alpha must grow
    assert loss.item() == pytest.approx(0.0)
    loss.backward()
    assert log_alpha.grad.item() == pytest.approx(0.3 - 1.0)  # descent raises log alpha
    log_alpha.grad = None
    alpha_loss(log_alpha, T([2.0]), target_entropy=1.0).backward()
    assert log_alpha.grad.item() == pytest.approx(1.0)


def test_dsac_t_critic_loss_by_hand():
    q = T([1.0], requires_grad=True)
    std = T([2.0], requires_grad=True)
    # y_b = q + clamp(y_s - q, -3 * 1.5, 3 * 1.5) = 5.5; omega = 1.5^2 / (2^2 + 0.1); Huber_50 = x^2 / 2 here
    omega = 2.25 / 4.1
    loss = dsac_t_critic_loss(q, std, y=T([2.0]), y_sample=T([10.0]), mean_std=T(1.5))
    want = omega * (0.5 * 1.0 + 2.0 * (4.0 - 0.5 * 4.5 ** 2) / 2.1)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert q.grad.item() == pytest.approx(omega * (1.0 - 2.0), rel=1e-6)      # toward the mean target y
    assert std.grad.item() == pytest.approx(omega * (4.0 - 10.125) / 2.1, rel=1e-6)
    # omega is clamped to [0.1, 10]; beyond delta = 50 the Huber term is linear
    tiny = dsac_t_critic_loss(T([0.0]), T([100.0]), T([0.0]), T([0.0]), mean_std=T(0.1))
    assert tiny.item() == pytest.approx(0.1 * (0 + 100.0 * (1e4 - 0) / 100.1), rel=1e-6)
    far = dsac_t_critic_loss(T([0.0]), T([0.0]), T([100.0]), T([0.0]), mean_std=T(10.0))
    assert far.item() == pytest.approx(10.0 * (50 * (100 - 25)), rel=1e-6)


def test_dsac_v1_critic_loss_by_hand():
    q = T([1.0], requires_grad=True)
    std = T([2.0], requires_grad=True)
    loss = dsac_v1_critic_loss(q, std, y=T([30.0]), td_bound=20.0)  # y_b = 1 + 20 = 21
    assert loss.item() == pytest.approx(-29 / 4.1 - (400 - 4) / 8.1 * 2, rel=1e-6)
    loss.backward()
    assert q.grad.item() == pytest.approx(-29 / 4.1, rel=1e-6)
    assert std.grad.item() == pytest.approx(-396 / 8.1, rel=1e-6)


def test_dsac_t_uses_the_twin_with_the_smaller_mean(monkeypatch):
    """Expected value substituting with min over the two target means, and the sampled target from the
    critic whose mean is smaller (twin value distribution learning)."""
    agent = _agent("dsac")
    b = _batch(BOX, PENDULUM_ACT, b=2)
    fixed = iter([  # target critic 1, target critic 2, online 1, online 2: (mean, std, sample)
        (T([1.0, 5.0]), T([1.0, 1.0]), T([1.5, 4.0])),
        (T([2.0, 3.0]), T([1.0, 1.0]), T([2.5, 2.0])),
        (T([0.5, 0.5], requires_grad=True), T([1.0, 1.0], requires_grad=True), T([0.0, 0.0])),
        (T([0.7, 0.7], requires_grad=True), T([2.0, 2.0], requires_grad=True), T([0.0, 0.0])),
    ])
    monkeypatch.setattr(agent, "_sample_q", lambda out: next(fixed))
    monkeypatch.setattr(agent.actor_target, "sample", lambda obs, gen=None: (torch.zeros(2, 1), T([-1.0, 0.5])))
    r, d, alpha = b.reward, b.discount, agent.alpha
    loss, _ = agent._dsac_critic_loss(b.obs, agent.from_env(b.action), r, d, b.next_obs, alpha)
    y = r + d * (T([1.0, 3.0]) - alpha * T([-1.0, 0.5]))    # min of the means: [1 (critic 1), 3 (critic 2)]
    y_s = r + d * (T([1.5, 2.0]) - alpha * T([-1.0, 0.5]))  # the samples of those same critics
    ms = agent.mean_std  # first batch: sigma-bar = the batch means, 1 and 2
    torch.testing.assert_close(ms, T([1.0, 2.0]))
    want = (dsac_t_critic_loss(T([0.5, 0.5]), T([1.0, 1.0]), y, y_s, ms[0])
            + dsac_t_critic_loss(T([0.7, 0.7]), T([2.0, 2.0]), y, y_s, ms[1]))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


# -- agents ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,extra", [("sac", []), ("dsac", []), ("dsac", ["agent.variant=v1"]),
                                        ("sac", ["agent.policy_delay=2"])])
def test_continuous_agents_update_act_and_resume_exactly(name, extra):
    a = _agent(name, BOX, PENDULUM_ACT, *extra, "agent.learning_starts=0")
    assert len(a.critics) == (1 if "agent.variant=v1" in extra else 2)
    batch = _batch(BOX, PENDULUM_ACT, b=16)
    for _ in range(3):
        out = a.update(batch)
    assert math.isfinite(out.metrics["loss"]) and "q_mean" in out.metrics
    obs = np.random.default_rng(0).uniform(-1, 1, (5, 3)).astype(np.float32)
    for explore in (True, False):
        act = a.act(obs, explore=explore)
        assert act.shape == (5, 1) and act.dtype == np.float32 and np.all(np.abs(act) <= 2.0)
    np.testing.assert_array_equal(a.act(obs, explore=False), a.act(obs, explore=False))  # deterministic mean
    b = _agent(name, BOX, PENDULUM_ACT, *extra, "agent.learning_starts=0")
    b.load_state_dict(_roundtrip(a.state_dict()))
    a.update(batch)
    b.update(batch)
    for x, y in zip(a.state_dict()["critics"].values(), b.state_dict()["critics"].values()):
        assert torch.equal(x, y)
    for x, y in zip(a.actor.parameters(), b.actor.parameters()):
        assert torch.equal(x, y)
    np.testing.assert_array_equal(a.act(obs, explore=True), b.act(obs, explore=True))


def test_warm_up_actions_are_uniform_in_the_bounds():
    a = _agent("sac", BOX, gym.spaces.Box(np.array([-1.0, 0.0], np.float32), np.array([1.0, 10.0], np.float32)))
    act = a.act(np.zeros((4000, 3), np.float32), explore=True)  # step 0 < learning_starts
    assert act.shape == (4000, 2) and act[:, 1].min() >= 0 and act[:, 1].max() <= 10 and 4.5 < act[:, 1].mean() < 5.5


def test_discrete_sac_updates_acts_and_resumes():
    obs_space, act_space = gym.spaces.Box(-1, 1, (4,), np.float32), gym.spaces.Discrete(3)
    a = _agent("sac_discrete", obs_space, act_space, "agent.learning_starts=0")
    assert a.target_entropy == pytest.approx(0.98 * math.log(3))
    batch = _batch(obs_space, act_space, b=16)
    for _ in range(3):
        out = a.update(batch)
    assert math.isfinite(out.metrics["loss"]) and 0 <= out.metrics["entropy"] <= math.log(3) + 1e-6
    obs = np.zeros((6, 4), np.float32)
    acts = a.act(obs, explore=True)
    assert acts.shape == (6,) and acts.dtype.kind == "i" and acts.min() >= 0 and acts.max() < 3
    b = _agent("sac_discrete", obs_space, act_space, "agent.learning_starts=0")
    b.load_state_dict(_roundtrip(a.state_dict()))
    a.update(batch)
    b.update(batch)
    assert all(torch.equal(x, y) for x, y in zip(a.critics.parameters(), b.critics.parameters()))
    np.testing.assert_array_equal(a.act(obs, explore=True), b.act(obs, explore=True))


def test_discrete_sac_on_pixels_uses_the_nature_cnn():
    obs_space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    a = _agent("sac_discrete", obs_space, gym.spaces.Discrete(6), "agent.learning_starts=0")
    from rlq.nets.encoders import NatureCNN
    assert isinstance(a.actor.encoder, NatureCNN) and isinstance(a.critics[0].encoder, NatureCNN)
    b = Batch(obs=torch.randint(0, 256, (4, 4, 84, 84), dtype=torch.uint8), action=torch.tensor([0, 1, 5, 2]),
              reward=torch.zeros(4), discount=torch.full((4,), 0.99),
              next_obs=torch.randint(0, 256, (4, 4, 84, 84), dtype=torch.uint8), idx=torch.arange(4),
              weights=torch.ones(4))
    assert math.isfinite(a.update(b).metrics["loss"])


@pytest.mark.parametrize("name,space,act_space", [("sac", BOX, PENDULUM_ACT), ("dsac", BOX, PENDULUM_ACT),
                                                  ("sac_discrete", BOX, gym.spaces.Discrete(2))])
def test_quantization_reaches_actor_and_critics(name, space, act_space):
    from rlq.nets.ensemble import EnsembleLinear
    from rlq.quant.layers import QuantEnsembleLinear, QuantLinear
    a = _agent(name, space, act_space, "quant=w8a8", "agent.learning_starts=0", quant=True)
    nets = [a.actor, a.critics, a.critic_targets] + ([a.actor_target] if name == "dsac" else [])
    for net in nets:  # (SAC's critics are one vectorized ensemble: EnsembleLinear layers)
        linears = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, EnsembleLinear))]
        assert linears and all(isinstance(m, (QuantLinear, QuantEnsembleLinear)) for m in linears)
    a.start_quantization()
    assert a.quant_active
    assert math.isfinite(a.update(_batch(space, act_space, b=8)).metrics["loss"])


@pytest.mark.parametrize("name,space,msg", [
    ("sac", gym.spaces.Discrete(2), "agent 'sac' needs a continuous (Box, 1-d) action space, got Discrete(2); use "
                                    "agent=sac_discrete"),
    ("dsac", gym.spaces.Discrete(2), "agent 'dsac' needs a continuous"),
    ("sac_discrete", PENDULUM_ACT, "agent 'sac_discrete' needs a discrete action space, got Box(-2.0, 2.0, (1,), "
                                   "float32); use agent=sac (or dsac)"),
])
def test_wrong_action_space_is_one_clear_error(name, space, msg):
    with pytest.raises(ValueError) as e:
        _agent(name, BOX, space)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_log_std_modes_map_the_raw_output_into_the_range():
    from rlq.agents.sac import GaussianActor
    raw = T([[-30.0, -1.0, 0.0, 0.3, 5.0]])
    for mode, want in (("clamp", T([[-20.0, -1.0, 0.0, 0.3, 0.5]])),
                       ("tanh", -20.0 + 0.5 * 20.5 * (torch.tanh(raw) + 1.0))):
        actor = GaussianActor(2, 5, [4], -20.0, 0.5, mode)
        with torch.no_grad():  # last layer: the mean rows 0, the log-std rows read the raw values off the bias
            last = actor.net[-1]
            last.weight.zero_()
            last.bias.copy_(torch.cat([torch.zeros(5), raw[0]]))
        mean, log_std = actor(torch.zeros(1, 2))
        torch.testing.assert_close(log_std, want)
        torch.testing.assert_close(mean, torch.zeros(1, 5))
    # the configs: SAC squashes (CleanRL), DSAC-T clips as its authors do, so an untrained actor has sigma ~ 1
    assert _agent("sac").actor.log_std_mode == "tanh"
    dsac = _agent("dsac")
    assert dsac.actor.log_std_mode == dsac.actor_target.log_std_mode == "clamp"
    _, log_std = dsac.actor(torch.zeros(64, 3))
    assert log_std.abs().max() < 1.0  # with tanh into [-20, 0.5] it would start near -9.75 (sigma ~ 6e-5)


@pytest.mark.parametrize("name", ["sac", "dsac"])
def test_actor_update_leaves_the_critics_alone(name):
    """The actor's loss goes through the critics to the action, but computes no critic weight gradient, and
    the critics stay trainable afterwards."""
    a = _agent(name, BOX, PENDULUM_ACT, "agent.learning_starts=0", "agent.policy_delay=1")
    batch = _batch(BOX, PENDULUM_ACT, b=16)
    actor_before = [p.detach().clone() for p in a.actor.parameters()]
    critic_grads = []
    step = a.optimizer_step

    def spy(loss, optimizer, params, max_grad_norm=0.0):
        before = [None if p.grad is None else p.grad.clone() for p in a.critics.parameters()]
        out = step(loss, optimizer, params, max_grad_norm)
        if optimizer is a.actor_optimizer:
            critic_grads.append((before, [p.grad for p in a.critics.parameters()]))
        return out

    a.optimizer_step = spy
    a.update(batch)
    assert len(critic_grads) == 1
    for x, y in zip(*critic_grads[0]):  # the critic step's gradients, untouched by the actor's backward
        assert torch.equal(x, y)
    assert all(p.requires_grad for p in a.critics.parameters())
    assert any(not torch.equal(x, y) for x, y in zip(actor_before, a.actor.parameters()))


def test_bad_log_std_mode_is_one_clear_error():
    from rlq.config import ConfigError
    ov = ["agent=dsac", "env=Pendulum", "agent.log_std_mode=exp"]
    with pytest.raises(ConfigError, match=r"^agent.log_std_mode='exp' is not a log-std mapping: choose tanh or clamp$"):
        build_config(_compose(ov), ov)
