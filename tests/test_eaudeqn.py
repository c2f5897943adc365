"""EauDeQN and the sparsity masks: exact magnitude pruning, masks enforced through Adam, loss-based selection,
pruned replacements, optimizer reset, exact checkpoint round trip; the CLI path (train -> evaluate -> export);
CartPole learning bars (slow)."""
import io
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from rlq.agents import make_agent
from rlq.config import config_dir
from rlq.nets.sparse import (apply_masks_, dense_masks, magnitude_masks, masks_sparsity, n_pruned, prunable_weights,
                             prune_tensors, sparsity_report)
from rlq.replay.base import Batch

OBS = gym.spaces.Box(-1, 1, (3,), np.float32)
ACT = gym.spaces.Discrete(2)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: a second intra-op thread only adds hand-off cost (7x slower updates on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def agent_cfg(**kw):
    dqn = OmegaConf.load(config_dir() / "agent" / "dqn.yaml")
    own = OmegaConf.load(config_dir() / "agent" / "eaudeqn.yaml")
    own.pop("defaults")
    cfg = OmegaConf.merge(dqn, own)
    cfg.pop("atari")
    cfg.hidden = [16, 16]
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def batch(b=16, seed=0, obs_dim=3):
    g = torch.Generator().manual_seed(seed)
    return Batch(obs=torch.randn(b, obs_dim, generator=g), action=torch.randint(0, 2, (b,), generator=g),
                 reward=torch.randn(b, generator=g), discount=torch.full((b,), 0.99),
                 next_obs=torch.randn(b, obs_dim, generator=g), idx=torch.arange(b), weights=torch.ones(b))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


# -- masks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_per_layer_pruning_removes_exactly_the_k_smallest(sparsity):
    net = mlp()
    masks = magnitude_masks(net, sparsity, "layer")
    for name, w in prunable_weights(net).items():
        flat = w.detach().abs().flatten()
        k = min(int(np.floor(sparsity * flat.numel() + 0.5)), flat.numel() - 1)
        removed = set(torch.nonzero(~masks[name].flatten()).flatten().tolist())
        assert removed == set(torch.argsort(flat)[:k].tolist())  # weights are distinct: no ties
        assert n_pruned(flat.numel(), sparsity) == k


def test_per_layer_ties_break_by_position_and_every_layer_keeps_a_weight():
    net = nn.Linear(2, 3)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.5, -0.1], [0.1, 0.2], [-0.1, 0.3]]))
    masks = magnitude_masks(net, 1 / 3)  # k = 2 of the three 0.1s (flat 1, 2, 4): the lowest indices go first
    assert torch.nonzero(~masks["weight"].flatten()).flatten().tolist() == [1, 2]
    assert magnitude_masks(net, 1.0)["weight"].flatten().tolist() == [True] + [False] * 5


def test_global_pruning_uses_one_threshold():
    net = mlp()
    with torch.no_grad():
        net[0].weight.uniform_(1.0, 2.0)  # all larger than the second layer's (< 0.38): global pruning takes those
    masks = magnitude_masks(net, 0.3, "global")
    allw = torch.cat([w.detach().abs().flatten() for w in prunable_weights(net).values()])
    k = int(np.floor(0.3 * allw.numel() + 0.5))
    thresh = torch.sort(allw).values[k - 1]
    for name, w in prunable_weights(net).items():
        assert torch.equal(masks[name], w.detach().abs() > thresh)
    assert masks["0.weight"].all() and not masks["2.weight"].all()
    one_left = magnitude_masks(net, 1.0, "global")
    assert all(int(m.sum()) == 1 for m in one_left.values())


def test_masks_are_nested_and_never_regrow():
    net = mlp()
    m1 = magnitude_masks(net, 0.4)
    apply_masks_(net, m1)
    with torch.no_grad():  # weights move after pruning; removed ones stay removed
        for w in prunable_weights(net).values():
            w.add_(torch.randn_like(w))
    m2 = magnitude_masks(net, 0.6, masks=m1)
    m_lower = magnitude_masks(net, 0.1, masks=m1)
    for name in m1:
        assert not (m2[name] & ~m1[name]).any()
        assert torch.equal(m_lower[name], m1[name])
    assert masks_sparsity(m2) == pytest.approx(
        sum(n_pruned(m.numel(), 0.6) for m in m2.values()) / sum(m.numel() for m in m2.values()))


def test_sparsity_report_counts_zero_weights_only():
    net = mlp()
    rep = sparsity_report(net)
    assert rep["overall"] == 0.0 and rep["params"] == 5 * 7 + 7 * 3
    apply_masks_(net, magnitude_masks(net, 0.5))
    with torch.no_grad():
        net[0].bias.zero_()  # biases are not counted
    rep = sparsity_report(net)
    assert rep["layers"]["0.weight"] == pytest.approx(n_pruned(35, 0.5) / 35)
    assert rep["layers"]["2.weight"] == pytest.approx(n_pruned(21, 0.5) / 21)
    assert rep["nonzero"] == 56 - n_pruned(35, 0.5) - n_pruned(21, 0.5)


def test_masks_stay_enforced_through_adam_steps():
    net = mlp()
    masks = magnitude_masks(net, 0.7)
    apply_masks_(net, masks)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(32, 5)
    for _ in range(5):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
    regrown = sum(int(((w != 0) & ~masks[n]).sum()) for n, w in prunable_weights(net).items())
    assert regrown > 0  # Adam alone moves pruned weights
    agent = make_agent(agent_cfg(n_networks=3, max_speed=0.5, target_update_period=1000), OBS, ACT)
    for s in range(20):
        agent.update(batch(seed=s))
    for net, masks in zip(agent.nets, agent.masks):
        assert masks_sparsity(masks) > 0 or net is agent.nets[0]
        for name, w in prunable_weights(net).items():
            assert (w[~masks[name]] == 0).all()


# -- the agent ----------------------------------------------------------------------------------------------
def test_initial_networks_are_pruned_copies_of_one():
    agent = make_agent(agent_cfg(max_speed=0.4), OBS, ACT)
    assert agent.increments() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert agent.levels == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    dense = agent.nets[0]
    for i, net in enumerate(agent.nets):
        expected = magnitude_masks(dense, agent.levels[i], agent.prune_scope)
        for name, w in prunable_weights(net).items():
            assert torch.equal(agent.masks[i][name], expected[name])
            assert torch.equal(w, prunable_weights(dense)[name] * expected[name])
    for p, q in zip(agent.target.parameters(), dense.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_selection_picks_the_argmin_and_replaces_the_others_by_pruned_copies(scope):
    agent = make_agent(agent_cfg(max_speed=0.2, prune_scope=scope, target_update_period=1000), OBS, ACT)
    for s in range(10):
        agent.update(batch(seed=s))
    assert np.all(agent.acc_loss > 0)
    agent.acc_loss[:] = [3.0, 1.0, 2.0, 5.0, np.nan]  # a diverged network is never chosen
    chosen = {n: t.clone() for n, t in agent.nets[1].state_dict().items()}
    chosen_masks = {n: m.clone() for n, m in agent.masks[1].items()}
    base = agent.levels[1]
    assert agent.select() == 1
    assert agent.selected == 1 and agent.sparser_selections == 1
    assert np.all(agent.acc_loss == 0) and agent.last_acc_loss[1] == 1.0
    for name, t in agent.target.state_dict().items():
        assert torch.equal(t, chosen[name])
    for name, t in agent.nets[0].state_dict().items():  # slot 0: the chosen network itself
        assert torch.equal(t, chosen[name])
    for i in range(1, 5):
        assert agent.levels[i] == pytest.approx(base + 0.2 * i / 4)
        ref = make_agent(agent_cfg(prune_scope=scope), OBS, ACT).nets[0]
        ref.load_state_dict(chosen)
        masks = magnitude_masks(ref, agent.levels[i], scope, chosen_masks)
        apply_masks_(ref, masks)
        for name, m in masks.items():
            assert torch.equal(agent.masks[i][name], m)
            assert not (m & ~chosen_masks[name]).any()
        for p, q in zip(agent.nets[i].state_dict().values(), ref.state_dict().values()):
            assert torch.equal(p, q)
    agent.acc_loss[:] = np.nan  # every network diverged: slot 0 is kept
    assert agent.select() == 0


def test_select_runs_every_target_update_period():
    agent = make_agent(agent_cfg(target_update_period=4, max_speed=0.1), OBS, ACT)
    picks = []
    orig = agent.select
    agent.select = lambda: picks.append(agent.updates) or orig()
    for s in range(12):
        agent.update(batch(seed=s))
    assert picks == [4, 8, 12]


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_state_at_selection(reset):
    agent = make_agent(agent_cfg(reset_optimizer=reset, target_update_period=1000), OBS, ACT)
    for s in range(5):
        agent.update(batch(seed=s))
    assert all(len(opt.state) > 0 for opt in agent.optimizers)
    agent.acc_loss[:] = [4.0, 3.0, 0.5, 2.0, 1.0]
    chosen_state = [{k: v.clone() for k, v in agent.optimizers[2].state[p].items()} for p in agent.net_params[2]]
    agent.select()
    for opt, params in zip(agent.optimizers, agent.net_params):
        if reset:
            assert len(opt.state) == 0
        else:
            for p, ref in zip(params, chosen_state):
                for k, v in ref.items():
                    assert torch.equal(opt.state[p][k], v)
    if not reset:  # copies, not tensors shared between the optimizers
        ptrs = [opt.state[params[0]]["exp_avg"].data_ptr() for opt, params in zip(agent.optimizers, agent.net_params)]
        assert len(set(ptrs)) == len(ptrs)
    agent.update(batch(seed=99))  # the optimizers still step (lazily re-initialised after a reset)
    assert all(len(opt.state) > 0 for opt in agent.optimizers)


def _states_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and np.isnan(a) and np.isnan(b))


@pytest.mark.parametrize("extra", [{}, {"distributional": True, "v_min": 0.0, "v_max": 10.0, "double": True}])
def test_checkpoint_round_trip_is_exact(extra):
    cfg = agent_cfg(target_update_period=3, max_speed=0.3, **extra)
    agent = make_agent(cfg, OBS, ACT, seed=3)
    for s in range(8):
        agent.update(batch(seed=s))
    buf = io.BytesIO()
    torch.save(agent.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = make_agent(cfg, OBS, ACT, seed=5)
    other.load_state_dict(state)
    assert _states_equal(agent.state_dict(), other.state_dict())
    for s in range(8, 14):  # and they go on identically (through a selection)
        a, b = agent.update(batch(seed=s)), other.update(batch(seed=s))
        assert a.metrics == b.metrics
    assert _states_equal(agent.state_dict(), other.state_dict())
    with pytest.raises(ValueError, match="checkpoint has 5 eaudeqn networks, this agent has n_networks=3"):
        make_agent(agent_cfg(n_networks=3, **extra), OBS, ACT).load_state_dict(state)


def test_sparsity_rises_and_metrics_are_logged():
    agent = make_agent(agent_cfg(target_update_period=2, max_speed=0.2), OBS, ACT)
    for s in range(40):
        agent.update(batch(seed=s))
    m = agent.schedule_metrics()
    assert m["sparsity"] == pytest.approx(sparsity_report(agent.policy_net())["overall"])
    assert m["sparsity"] > 0.0 and m["sparser_selections"] >= 1
    assert {"sparsity/encoder.net.0", "sparsity/encoder.net.2", "sparsity/head.q", "selected"} <= set(m)
    assert all(f"acc_loss/{i}" in m and f"net_sparsity/{i}" in m for i in range(5))
    assert agent.policy_net() is agent.target and agent.nets[0] is agent.online


def test_greedy_acting_and_the_policy_are_the_selected_network():
    """Exploration acts with slot 0; greedy acting, export and the reported sparsity use the target (the network
    the last selection chose), which slot 0 left when its window started; both carry the same masks."""
    agent = make_agent(agent_cfg(target_update_period=4, max_speed=0.2), OBS, ACT)
    for s in range(10):  # 2 selections, then 2 updates into the next window
        agent.update(batch(seed=s))
    obs = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    with torch.no_grad():
        q_target = agent.target(torch.as_tensor(obs))
        q_slot0 = agent.online(torch.as_tensor(obs))
    assert not torch.equal(q_target, q_slot0)  # slot 0 has moved on since the selection
    np.testing.assert_array_equal(agent.act(obs, explore=False), q_target.argmax(1).numpy())
    assert sparsity_report(agent.target)["overall"] == pytest.approx(sparsity_report(agent.online)["overall"])
    assert sparsity_report(agent.target)["overall"] > 0.0
    agent.use_acting_copies()  # overlap=true: greedy acting reads a frozen copy of the target
    assert set(agent._acting_copies) == {"online", "target"}
    before = {k: v.clone() for k, v in agent.target.state_dict().items()}
    for s in (11, 12):  # update 12 is a selection: the target changes, its acting copy waits for the sync
        agent.update(batch(seed=s))
    copy_state, now = agent._acting_copies["target"].state_dict(), agent.target.state_dict()
    assert all(torch.equal(copy_state[k], before[k]) for k in before)
    assert not all(torch.equal(now[k], before[k]) for k in before)
    agent.sync_acting_copies()
    assert all(torch.equal(agent._acting_copies["target"].state_dict()[k], now[k]) for k in now)


def test_nature_cnn_atari_shapes():
    obs = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    agent = make_agent(agent_cfg(n_networks=2, target_update_period=2, max_speed=0.5, hidden=[256, 256]), obs,
                       gym.spaces.Discrete(6))
    g = torch.Generator().manual_seed(0)
    b = Batch(obs=torch.randint(0, 255, (4, 4, 84, 84), generator=g, dtype=torch.uint8),
              action=torch.randint(0, 6, (4,), generator=g), reward=torch.zeros(4), discount=torch.full((4,), 0.99),
              next_obs=torch.randint(0, 255, (4, 4, 84, 84), generator=g, dtype=torch.uint8), idx=torch.arange(4),
              weights=torch.ones(4))
    for _ in range(2):
        agent.update(b)
    layers = sparsity_report(agent.policy_net())["layers"]
    assert set(layers) == {"encoder.convs.0.weight", "encoder.convs.2.weight", "encoder.convs.4.weight",
                           "encoder.fc.0.weight", "head.q.weight"}
    assert agent.act(np.zeros((2, 4, 84, 84), np.uint8), explore=False).shape == (2,)


def test_dense_masks_and_bad_agent_settings():
    assert masks_sparsity(dense_masks(mlp())) == 0.0
    for kw, msg in (({"n_networks": 1}, "at least 2 online networks"), ({"tau": 0.5}, "hard target copies"),
                    ({"noisy": True}, "use noisy=false"), ({"prune_scope": "row"}, "choose one of layer, global")):
        with pytest.raises(ValueError, match=msg):
            make_agent(agent_cfg(**kw), OBS, ACT)
    with pytest.raises(ValueError, match="unknown prune scope 'row'"):
        magnitude_masks(mlp(), 0.5, "row")


# -- the CLI path: train -> metrics -> evaluate -> export -----------------------------------------------------
def test_train_evaluate_export(cli, tmp_path, capsys):
    from rlq import evaluate, export

    run = tmp_path / "run"
    res = cli("rlq.train", "agent=eaudeqn", "total_steps=1500", "agent.learning_starts=300", "agent.hidden=[32,32]",
              "agent.target_update_period=10", "agent.max_speed=0.1", "eval.every=0", "eval.episodes=2",
              "log.every=500", "log.tensorboard=false", f"run_dir={run}", "checkpoint.every=0", "threads=1")
    assert res.returncode == 0, res.stderr[-2000:]
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in train if r["kind"] == "train"][-1]
    assert last["sparsity"] > 0.1 and "sparsity/encoder.net.2" in last and "acc_loss/4" in last
    assert evaluate.main([f"checkpoint={run}", "episodes=2", "json=true"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["sparsity"]["overall"] == pytest.approx(last["sparsity"])
    assert evaluate.main([f"checkpoint={run}", "episodes=2"]) == 0
    text = capsys.readouterr().out
    assert "policy sparsity" in text and "encoder.net.2" in text, text
    assert export.main([f"checkpoint={run}", f"out={tmp_path / 'p.rlqp'}", "calib_steps=200"]) == 0
    assert evaluate.main([f"policy={tmp_path / 'p.rlqp'}", "episodes=2"]) == 0
    assert "return" in capsys.readouterr().out


def test_dense_checkpoint_prints_no_sparsity(capsys):
    from rlq.evaluate import _print_run

    res = {"checkpoint": "x", "env": "CartPole", "epsilon": 0.0, "returns": [1.0], "lengths": [1], "mean": 1.0,
           "std": 0.0, "iqm": 1.0, "episodes": 1, "sparsity": {"overall": 0.0, "layers": {"a": 0.0}, "params": 4,
                                                              "nonzero": 4}}
    _print_run(res)
    assert "sparsity" not in capsys.readouterr().out


# -- SAC with EauDeQN critics (agent=eaudesac) -------------------------------------------------------------------
def sac_cfg(**kw):
    sac = OmegaConf.load(config_dir() / "agent" / "sac.yaml")
    own = OmegaConf.load(config_dir() / "agent" / "eaudesac.yaml")
    own.pop("defaults")
    cfg = OmegaConf.merge(sac, own)
    cfg.hidden = [16, 16]
    for k, v in kw.items():
        cfg[k] = v
    return cfg


SAC_OBS = gym.spaces.Box(-1, 1, (3,), np.float32)
SAC_ACT = gym.spaces.Box(-2, 2, (1,), np.float32)


def sac_batch(b=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(obs=torch.randn(b, 3, generator=g), action=torch.rand(b, 1, generator=g) * 4 - 2,
                 reward=torch.randn(b, generator=g), discount=torch.full((b,), 0.99),
                 next_obs=torch.randn(b, 3, generator=g), idx=torch.arange(b), weights=torch.ones(b))


def test_eaudesac_critic_sets_selection_and_pruning():
    agent = make_agent(sac_cfg(n_networks=3, max_speed=0.4, select_every=1000), SAC_OBS, SAC_ACT)
    cs = agent.critic_sets
    assert agent.critics.n == 6 and agent.critic_targets.n == 2 and cs.levels == pytest.approx([0.0, 0.2, 0.4])
    for s in range(8):
        agent.update(sac_batch(seed=s))
    for name, w in cs.weights.items():  # masks hold through Adam; set s has its sparsity in every member matrix
        assert (w[~cs.masks[name]] == 0).all()
        for s in range(3):
            for j in range(2):
                m = cs.masks[name][2 * s + j]
                assert int((~m).sum()) == n_pruned(m.numel(), cs.levels[s])
    assert np.all(cs.acc_loss > 0)
    before = [p.detach().clone() for p in agent.critic_targets.parameters()]
    agent.update(sac_batch(seed=50))  # the targets are Polyak-averaged toward set 0 (the first 2 members)
    for t, b, p in zip(agent.critic_targets.parameters(), before, agent.critics.parameters()):
        assert torch.allclose(t, b + agent.tau * (p[:2] - b), atol=1e-6)
    cs.acc_loss[:] = [2.0, 1.0, 3.0]
    chosen = {n: t[2:4].clone() for n, t in agent.critics.state_dict().items()}
    chosen_masks = {n: m[2:4].clone() for n, m in cs.masks.items()}
    assert cs.select(agent.critic_optimizer) == 1 and len(agent.critic_optimizer.state) == 0
    assert cs.levels == pytest.approx([0.2, 0.4, 0.6]) and np.all(cs.acc_loss == 0)
    state = agent.critics.state_dict()
    for n, t in chosen.items():
        assert torch.equal(state[n][0:2], t)  # set 0 is the chosen set
    for n, w in cs.weights.items():
        for s in (1, 2):
            ref = prune_tensors({j: chosen[n][j] for j in range(2)}, cs.levels[s], "layer",
                                {j: chosen_masks[n][j] for j in range(2)})
            for j in range(2):
                assert torch.equal(cs.masks[n][2 * s + j], ref[j])
                assert torch.equal(w[2 * s + j], chosen[n][j] * ref[j])
    m = agent.schedule_metrics()
    assert m["critic_sparsity"] == pytest.approx(cs.set_sparsity(0)["overall"]) and m["selected"] == 1.0
    assert "critic_sparsity/net.layers.1" in m and "acc_loss/2" in m
    assert sparsity_report(agent.policy_net())["overall"] == 0.0  # the actor stays dense


def test_eaudesac_keeps_moments_without_reset_and_round_trips():
    cfg = sac_cfg(n_networks=2, max_speed=0.3, select_every=3, reset_optimizer=False)
    agent = make_agent(cfg, SAC_OBS, SAC_ACT, seed=1)
    for s in range(2):
        agent.update(sac_batch(seed=s))
    agent.critic_sets.acc_loss[:] = [5.0, 1.0]
    p = agent.critic_sets.params[0]
    chosen = agent.critic_optimizer.state[p]["exp_avg"][2:4].clone()
    agent.critic_sets.select(agent.critic_optimizer)
    assert torch.equal(agent.critic_optimizer.state[p]["exp_avg"][0:2], chosen)
    assert torch.equal(agent.critic_optimizer.state[p]["exp_avg"][2:4], chosen)
    for s in range(2, 5):
        agent.update(sac_batch(seed=s))
    buf = io.BytesIO()
    torch.save(agent.state_dict(), buf)
    buf.seek(0)
    other = make_agent(cfg, SAC_OBS, SAC_ACT, seed=7)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert _states_equal(agent.state_dict(), other.state_dict())
    for s in range(5, 9):  # through a selection
        assert agent.update(sac_batch(seed=s)).metrics == other.update(sac_batch(seed=s)).metrics
    assert _states_equal(agent.state_dict(), other.state_dict())


def test_eaudesac_bad_settings():
    with pytest.raises(ValueError, match="at least 2 critic sets"):
        make_agent(sac_cfg(n_networks=1), SAC_OBS, SAC_ACT)
    plain = make_agent(sac_cfg(critic_sparsity="none"), SAC_OBS, SAC_ACT)
    assert plain.critic_sets is None and plain.critics.n == 2


# -- learning bar (slow) ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eaudeqn_cartpole_is_80_percent_sparse_at_95_percent_of_dense_dqn(tmp_path):
    """Issue 7's bar on seeds 0-2 at 50k env steps (experiments/results/cartpole_eaudeqn.md): every EauDeQN policy
    >= 80% sparse, and its mean final greedy return (30 episodes, rlq.evaluate's protocol) >= 95% of dense DQN's
    trained the same way. When it was added: 500 / 500 / 500 at 81.7-85.3% sparsity against DQN's 97.3 / 192.5 /
    500."""
    from rlq.evaluate import evaluate_checkpoint
    from rlq.train import _compose, build_config, run

    def final(agent, seed):
        ov = [f"agent={agent}", f"seed={seed}", "total_steps=50000", "eval.every=5000", "eval.episodes=10",
              "checkpoint.every=0", "log.progress=false", "log.tensorboard=false", "threads=1"]
        run(build_config(_compose(ov), ov), tmp_path / f"{agent}-{seed}")
        return evaluate_checkpoint(str(tmp_path / f"{agent}-{seed}"), episodes=30, seed=0)

    eau = [final("eaudeqn", s) for s in range(3)]
    dqn = [final("dqn", s) for s in range(3)]
    assert all(r["sparsity"]["overall"] >= 0.80 for r in eau), [r["sparsity"]["overall"] for r in eau]
    assert np.mean([r["mean"] for r in eau]) >= 0.95 * np.mean([r["mean"] for r in dqn]), \
        ([r["mean"] for r in eau], [r["mean"] for r in dqn])
