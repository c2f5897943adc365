"""Rainbow = the DQN agent with every switch on: composition, networks, updates, PER wiring, ablations."""
import numpy as np
import pytest
import torch

from rlq.agents import make_agent
from rlq.nets.distributional import CategoricalHead
from rlq.nets.noisy import NoisyLinear
from rlq.replay import PrioritizedSampler
from rlq.replay.base import Batch
from rlq.train import _compose, build_config
from rlq.trainer import Trainer

SWITCHES = ("double", "dueling", "noisy", "distributional", "prioritized")


def cfg_for(*overrides):
    ov = ["agent=rainbow", *overrides]
    return build_config(_compose(ov), ov)


def test_rainbow_config_has_every_switch_on_and_each_can_be_turned_off():
    a = cfg_for().agent
    assert a.name == "rainbow" and all(a[s] for s in SWITCHES) and a.n_step == 3
    assert a.eps_start == 0.0 and a.eps_end == 0.0  # noisy nets explore
    for s in SWITCHES:
        off = cfg_for(f"agent.{s}=false").agent
        assert not off[s] and all(off[o] for o in SWITCHES if o != s)
    no_noise = cfg_for("agent.noisy=false").agent
    assert no_noise.eps_start == 1.0 and no_noise.eps_end == 0.05  # epsilon-greedy comes back


def test_rainbow_atari_preset_follows_the_paper():
    a = cfg_for("env=Pong").agent
    assert (a.lr, a.adam_eps, a.v_min, a.v_max, a.atoms, a.n_step) == (6.25e-5, 1.5e-4, -10.0, 10.0, 51, 3)
    assert (a.target_update_period, a.learning_starts, a.train_freq, a.batch_size) == (2000, 20000, 4, 32)
    assert (a.cnn_features, a.head_hidden, a.per_alpha, a.per_beta0) == (0, 512, 0.5, 0.4)


def _spaces(cfg, tmp_path):
    t = Trainer(cfg, tmp_path)
    try:
        return t.env.single_observation_space, t.env.single_action_space, t
    finally:
        t.close()


def test_atari_rainbow_network_and_prioritized_buffer(tmp_path):
    cfg = cfg_for("env=Pong", "agent.buffer_size=1000")
    obs_space, act_space, trainer = _spaces(cfg, tmp_path)
    net = trainer.agent.online
    assert isinstance(net.head, CategoricalHead) and net.head.dueling
    assert net.encoder.out_dim == 3136  # conv torso only; the streams have their own 512 units
    noisy = [m for m in net.modules() if isinstance(m, NoisyLinear)]
    assert len(noisy) == 4 and {m.out_features for m in noisy} == {512, 51, 6 * 51}
    assert isinstance(trainer.buffer.sampler, PrioritizedSampler) and trainer.buffer.frame_stack == 4
    out = net.q_values(torch.zeros(2, 4, 84, 84, dtype=torch.uint8))
    assert out.shape == (2, 6)


def make_batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(obs=torch.randn(b, 4, generator=g), action=torch.randint(0, 2, (b,), generator=g),
                 reward=torch.rand(b, generator=g), discount=torch.full((b,), 0.99 ** 3),
                 next_obs=torch.randn(b, 4, generator=g), idx=torch.arange(b), weights=torch.rand(b, generator=g))


def cartpole_agent(*overrides):
    import gymnasium as gym

    cfg = cfg_for(*overrides)
    torch.manual_seed(0)
    return make_agent(cfg.agent, gym.spaces.Box(-5, 5, (4,), np.float32), gym.spaces.Discrete(2))


def test_distributional_update_reports_cross_entropy_priorities_and_learns():
    agent = cartpole_agent()
    batch = make_batch()
    first = agent.update(batch)
    assert first.priorities.shape == (8,) and (first.priorities > 0).all()
    # the priority is the per-sample cross-entropy; the loss is its IS-weighted mean
    assert first.metrics["loss"] == pytest.approx(float((batch.weights.numpy() * first.priorities).mean()), rel=1e-5)
    for _ in range(30):
        last = agent.update(batch)
    assert last.metrics["loss"] < first.metrics["loss"]


def test_noisy_acting_explores_and_evaluation_is_deterministic():
    agent = cartpole_agent()
    obs = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    greedy = [agent.act(obs, explore=False) for _ in range(3)]
    assert all((g == greedy[0]).all() for g in greedy)
    explored = [agent.act(obs, explore=True) for _ in range(5)]
    assert any((e != greedy[0]).any() for e in explored)  # fresh noise changes some actions


@pytest.mark.parametrize("switch", SWITCHES + ("n_step",))
def test_each_ablation_builds_and_updates(switch):
    override = "agent.n_step=1" if switch == "n_step" else f"agent.{switch}=false"
    agent = cartpole_agent(override)
    out = agent.update(make_batch())
    assert np.isfinite(out.metrics["loss"])
