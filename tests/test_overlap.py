"""The learner fast paths of issue 9: the trainer's ``overlap=true`` (updates in a worker thread while the envs
keep stepping, acting on a copy of the policy one update round behind) and the DQN family's
``agent.amp=bf16``. Each is checked against what it must preserve: the same batches and updates as the
synchronous loop, determinism, exact resume, the non-finite policy; the same losses up to bf16 rounding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rlq.agents import make_agent
from rlq.checkpoint import load_checkpoint
from rlq.envs import make_env
from rlq.replay.base import Batch
from rlq.train import _compose, build_config
from rlq.trainer import Trainer, TrainingStopped
from tests.test_reliability import _assert_same, _metrics, _poison_batches, _stop_at


def _config(*extra: str):
    ov = ["total_steps=1200", "agent.learning_starts=200", "eval.every=500", "eval.episodes=2", "checkpoint.every=0",
          "log.every=200", "log.progress=false", "log.tensorboard=false", "threads=1", "env.num_envs=2", *extra]
    return build_config(_compose(ov), ov)


def _train(cfg, path) -> Trainer:
    tr = Trainer(cfg, path)
    tr.train()
    tr.close()
    return tr


RANDOM_ACTING = ["agent.eps_start=1.0", "agent.eps_end=1.0"]  # act() never reads the weights


@pytest.mark.parametrize("agent", [
    ["agent=dqn", "agent.gradient_steps=2"],
    ["agent=double_dqn", "agent.n_step=3", "agent.dueling=true"],
])
def test_overlap_with_weight_free_acting_equals_the_synchronous_loop(tmp_path, agent):
    """When acting does not depend on the weights, overlap mode must sample the same batches at the same
    steps and apply the same updates: identical parameters, optimizer state, counters and metrics."""
    sync = _train(_config(*agent, *RANDOM_ACTING), tmp_path / "sync")
    over = _train(_config(*agent, *RANDOM_ACTING, "overlap=true"), tmp_path / "over")
    assert sync.updates == over.updates > 200
    _assert_same(sync.agent.state_dict(), over.agent.state_dict())
    assert _metrics(tmp_path / "sync") == _metrics(tmp_path / "over")


def test_overlap_runs_are_deterministic_and_act_one_round_behind(tmp_path):
    cfg = _config("agent=dqn", "overlap=true")
    a, b = _train(cfg, tmp_path / "a"), _train(cfg, tmp_path / "b")
    _assert_same(a.agent.state_dict(), b.agent.state_dict())
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    # acting lags: the synchronous run with the same seed acts differently once learning starts
    sync = _train(_config("agent=dqn"), tmp_path / "sync")
    assert not torch.equal(sync.agent.online.head.q.weight, a.agent.online.head.q.weight)


def test_overlap_with_prioritized_replay_is_deterministic(tmp_path):
    """PER + C51 + n-step (Rainbow without noisy nets, whose noise would interleave by timing). Transitions
    added while a round is in flight get the largest priority known before that round."""
    cfg = _config("agent=rainbow", "agent.noisy=false", "overlap=true")
    a, b = _train(cfg, tmp_path / "a"), _train(cfg, tmp_path / "b")
    _assert_same(a.agent.state_dict(), b.agent.state_dict())
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


def test_acting_copy_lags_the_update_round_in_flight(tmp_path):
    """Every act() during a round reads exactly the weights the online net had before that round started."""
    tr = Trainer(_config("agent=dqn", "overlap=true", "total_steps=900", "eval.every=0", "eval.final=false"),
                 tmp_path / "run")
    agent = tr.agent
    seen, before = [], {}
    update = agent.update

    def recording_update(batch):
        if agent.updates not in before:  # first update of a round: the weights the round starts from
            before[agent.updates] = agent.online.head.q.weight.detach().clone()
        return update(batch)

    act = agent.act

    def recording_act(obs, explore):
        seen.append(agent.acting_net("online").head.q.weight.detach().clone())
        return act(obs, explore)
    agent.update, agent.act = recording_update, recording_act
    tr.train()
    tr.close()
    starts = list(before.values())
    late = seen[-50:]  # well after learning started: each is the start of some round, never a mid-round state
    assert all(any(torch.equal(w, s) for s in starts) for w in late)
    assert not torch.equal(late[-1], agent.online.head.q.weight)  # the final round was applied after acting


def test_overlap_resume_is_exact(tmp_path):
    cfg = _config("agent=dqn", "overlap=true", "checkpoint.save_replay=true")
    straight = _train(cfg, tmp_path / "straight")
    first = Trainer(cfg, tmp_path / "resumed")
    _stop_at(first, 611)
    with pytest.raises(TrainingStopped):
        first.train()
    first.close()
    ck = load_checkpoint(tmp_path / "resumed")
    assert set(ck["acting"]) == {"online"}
    second = Trainer(cfg, tmp_path / "resumed", resume_from=ck)
    second.train()
    second.close()
    _assert_same(straight.agent.state_dict(), second.agent.state_dict())
    _assert_same(straight.agent.acting_state(), second.agent.acting_state())
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "resumed")


def test_overlap_nonfinite_loss_stops_or_skips(tmp_path):
    tr = Trainer(_config("agent=dqn", "overlap=true"), tmp_path / "stop")
    _poison_batches(tr, from_update=100)
    with pytest.raises(TrainingStopped, match=r"non-finite loss or gradient \(nan\) at step \d+"):
        tr.train()
    tr.close()
    for name, t in tr.agent.online.state_dict().items():
        assert torch.isfinite(t).all(), name
    tr = Trainer(_config("agent=dqn", "overlap=true", "nonfinite=skip"), tmp_path / "skip")
    _poison_batches(tr, from_update=100, every=3)
    tr.train()
    tr.close()
    assert tr.step == 1200 and tr.skipped_updates == (tr.updates - 100) // 3 + 1


def test_evaluation_in_overlap_mode_uses_the_newest_weights():
    env = make_env("CartPole", num_envs=1, seed=0)
    cfg = _config("agent=dqn").agent
    agent = make_agent(cfg, env.single_observation_space, env.single_action_space, seed=0)
    agent.use_acting_copies()
    with torch.no_grad():
        agent.online.head.q.bias.copy_(torch.tensor([0.0, 1e6]))  # online now always picks action 1
        agent.acting_net("online").head.q.bias.copy_(torch.tensor([1e6, 0.0]))
    obs = np.zeros((3, 4), np.float32)
    assert agent.act(obs, explore=False).tolist() == [0, 0, 0]
    with agent.acting_originals():
        assert agent.act(obs, explore=False).tolist() == [1, 1, 1]
    agent.sync_acting_copies()
    assert agent.act(obs, explore=False).tolist() == [1, 1, 1]
    env.close()


# -- agent.amp=bf16 ----------------------------------------------------------------------------------------------
def _pong_agent(*extra: str):
    ov = ["agent=double_dqn", "env=Pong", *extra]
    cfg = build_config(_compose(ov), ov)
    env = make_env("Pong", num_envs=1, seed=0)
    agent = make_agent(cfg.agent, env.single_observation_space, env.single_action_space, seed=0)
    env.close()
    return agent


def _batch(n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(0)
    obs = lambda: torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g)  # noqa: E731
    return Batch(obs=obs(), action=torch.randint(0, 6, (n,), generator=g), reward=torch.randn(n, generator=g),
                 discount=torch.full((n,), 0.99), next_obs=obs(), idx=torch.arange(n), weights=torch.ones(n))


def test_bf16_update_matches_fp32_up_to_bf16_rounding():
    torch.manual_seed(0)
    fp32 = _pong_agent()
    torch.manual_seed(0)
    bf16 = _pong_agent("agent.amp=bf16")
    _assert_same(fp32.state_dict()["online"], bf16.state_dict()["online"])  # the same start
    batch = _batch()
    out32, out16 = fp32.update(batch), bf16.update(batch)
    assert out16.metrics["loss"] == pytest.approx(out32.metrics["loss"], rel=0.05)
    assert out16.metrics["q_mean"] == pytest.approx(out32.metrics["q_mean"], rel=0.05, abs=1e-3)
    assert bf16.online.head.q.weight.dtype == torch.float32  # parameters and optimizer state stay fp32
    # the target nets still hold the starting weights: both updates move the weights the same way
    moved = [(a.online.head.q.weight - a.target.head.q.weight).flatten() for a in (fp32, bf16)]
    assert (torch.sign(moved[0]) == torch.sign(moved[1])).float().mean().item() > 0.9
    # acting stays fp32: identical weights act identically
    bf16.online.load_state_dict(fp32.online.state_dict())
    obs = batch.obs[:4].numpy()
    assert np.array_equal(bf16.greedy(obs), fp32.greedy(obs))


# -- thread counts --------------------------------------------------------------------------------------------
def test_small_acting_batches_run_on_one_thread():
    from rlq.agents.base import SMALL_BATCH, acting_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with acting_threads(SMALL_BATCH):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with acting_threads(SMALL_BATCH + 1):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), acting_threads(1):
            raise RuntimeError
        assert torch.get_num_threads() == 2  # restored on errors too
    finally:
        torch.set_num_threads(before)


# -- malloc tuning --------------------------------------------------------------------------------------------
def test_trainer_tunes_malloc_unless_disabled(tmp_path, monkeypatch):
    import rlq.trainer as trainer_mod

    calls = []
    monkeypatch.setattr(trainer_mod, "tune_malloc", lambda: calls.append(1) or True)
    Trainer(_config("agent=dqn"), tmp_path / "on").close()
    assert calls == [1]
    Trainer(_config("agent=dqn", "malloc_tuning=false"), tmp_path / "off").close()
    assert calls == [1]


def test_tune_malloc_applies_on_glibc_and_is_idempotent():
    import platform

    from rlq.trainer import tune_malloc

    applied = tune_malloc()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied is True
    assert tune_malloc() is applied
    x = torch.randn(1 << 20)  # allocations work as before
    assert torch.isfinite(x.sum())
