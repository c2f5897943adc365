"""DQN agent: targets against hand-computed values, heads, schedules, state round trip."""
import io

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rlq.agents import agent_names, make_agent
from rlq.agents.dqn import linear_schedule
from rlq.config import config_dir
from rlq.nets import DuelingHead, make_encoder
from rlq.replay.base import Batch


def agent_cfg(name="dqn", **kw):
    cfg = OmegaConf.load(config_dir() / "agent" / "dqn.yaml")
    cfg.pop("atari")
    cfg.name = name
    for k, v in kw.items():
        cfg[k] = v
    return cfg


OBS = gym.spaces.Box(-1, 1, (3,), np.float32)
ACT = gym.spaces.Discrete(2)


def tiny_batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(obs=torch.randn(b, 3, generator=g), action=torch.randint(0, 2, (b,), generator=g),
                 reward=torch.randn(b, generator=g), discount=torch.tensor([0.99, 0.0, 0.99 ** 3, 0.5])[:b],
                 next_obs=torch.randn(b, 3, generator=g), idx=torch.arange(b), weights=torch.ones(b))


def test_registry_names_and_unknown():
    assert {"dqn", "double_dqn", "dueling_dqn"} <= set(agent_names())
    with pytest.raises(ValueError, match="unknown agent name 'nope': choose one of"):
        make_agent(agent_cfg("nope"), OBS, ACT)


def test_continuous_action_space_rejected():
    with pytest.raises(ValueError, match="needs a discrete action space"):
        make_agent(agent_cfg(), OBS, gym.spaces.Box(-1, 1, (2,)))


@pytest.mark.parametrize("double", [False, True])
def test_td_target_matches_hand_computation(double):
    torch.manual_seed(0)
    agent = make_agent(agent_cfg(double=double, hidden=[8]), OBS, ACT)
    # make target differ from online so Double DQN matters
    with torch.no_grad():
        for p in agent.target.parameters():
            p.add_(torch.randn_like(p))
    batch = tiny_batch()
    with torch.no_grad():
        q_t = agent.target(batch.next_obs)
        q_o = agent.online(batch.next_obs)
    expected = []
    for i in range(4):
        a = int(q_o[i].argmax()) if double else int(q_t[i].argmax())
        expected.append(float(batch.reward[i]) + float(batch.discount[i]) * float(q_t[i, a]))
    torch.testing.assert_close(agent.td_target(batch), torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_update_reduces_loss_and_reports_priorities():
    torch.manual_seed(0)
    agent = make_agent(agent_cfg(lr=1e-2, target_update_period=10_000), OBS, ACT)
    batch = tiny_batch()
    first = agent.update(batch)
    for _ in range(50):
        last = agent.update(batch)
    assert last.metrics["loss"] < first.metrics["loss"] * 0.5
    assert first.priorities.shape == (4,) and (first.priorities >= 0).all()


def test_hard_and_polyak_target_updates():
    torch.manual_seed(0)
    hard = make_agent(agent_cfg(target_update_period=3), OBS, ACT)
    batch = tiny_batch()
    hard.update(batch)
    hard.update(batch)
    assert not torch.equal(hard.online.head.q.weight, hard.target.head.q.weight)
    hard.update(batch)
    assert torch.equal(hard.online.head.q.weight, hard.target.head.q.weight)
    soft = make_agent(agent_cfg(tau=0.5), OBS, ACT)
    before = soft.target.head.q.weight.clone()
    soft.update(batch)
    torch.testing.assert_close(soft.target.head.q.weight, 0.5 * before + 0.5 * soft.online.head.q.weight)


def test_dueling_head_advantage_is_centred():
    torch.manual_seed(0)
    head = DuelingHead(5, 3)
    h = torch.randn(7, 5)
    q = head(h)
    v = head.value(h)
    torch.testing.assert_close(q.mean(dim=1, keepdim=True), v)


def test_epsilon_schedule_and_acting():
    assert linear_schedule(1.0, 0.1, 100, 0) == 1.0
    assert linear_schedule(1.0, 0.1, 100, 50) == pytest.approx(0.55)
    assert linear_schedule(1.0, 0.1, 100, 1000) == pytest.approx(0.1)
    agent = make_agent(agent_cfg(eps_decay_steps=100, eps_end=0.0), OBS, ACT)
    obs = np.zeros((5, 3), np.float32)
    agent.set_step(0)
    assert agent.act(obs, explore=True).shape == (5,)
    agent.set_step(1000)
    greedy = agent.act(obs, explore=False)
    assert (agent.act(obs, explore=True) == greedy).all()  # epsilon 0 after decay


def test_encoder_choice_errors():
    with pytest.raises(ValueError, match="encoder 'mlp' got image observations"):
        make_encoder("mlp", (4, 84, 84), np.uint8)
    with pytest.raises(ValueError, match="encoder 'cnn' needs image observations"):
        make_encoder("cnn", (4,), np.float32)
    cnn = make_encoder("auto", (4, 84, 84), np.uint8)
    assert cnn(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).shape == (2, 512)


def test_state_dict_round_trip_is_exact():
    torch.manual_seed(0)
    a = make_agent(agent_cfg(dueling=True), OBS, ACT)
    batch = tiny_batch()
    for _ in range(3):
        a.update(batch)
    a.set_step(123)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    torch.manual_seed(1)
    b = make_agent(agent_cfg(dueling=True), OBS, ACT)
    b.load_state_dict(state)
    obs = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    assert (a.act(obs, explore=True) == b.act(obs, explore=True)).all()
    ua, ub = a.update(batch), b.update(batch)
    assert ua.metrics["loss"] == ub.metrics["loss"]
    for pa, pb in zip(a.online.parameters(), b.online.parameters()):
        assert torch.equal(pa, pb)
