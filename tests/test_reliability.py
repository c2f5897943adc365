"""Reliability: exact resume, crash safety under SIGKILL, numerical faults, unwritable run directories."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from rlq.checkpoint import list_checkpoints, load_checkpoint
from rlq.logging import read_metrics
from rlq.train import _compose, build_config
from rlq.trainer import Trainer, TrainingStopped

TIMING_KEYS = {"sps", "updates_per_s", "time", "wall_s"}


def _config(*extra: str):
    ov = ["total_steps=2400", "agent.learning_starts=300", "eval.every=800", "eval.episodes=2", "checkpoint.every=0",
          "checkpoint.save_replay=true", "log.every=200", "log.progress=false", "log.tensorboard=false", "threads=1",
          *extra]
    return build_config(_compose(ov), ov)


def _metrics(run) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run)]


def _stop_at(trainer: Trainer, step: int) -> None:
    """Make ``trainer`` stop (as on SIGTERM) once it has passed ``step``."""
    set_step = trainer.agent.set_step

    def hook(s):
        if s >= step:
            trainer._stop_reason = "SIGTERM"
        set_step(s)
    trainer.agent.set_step = hook


@pytest.mark.parametrize("agent", ["dqn", "rainbow", "sac", "sac_discrete"])
def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, agent):
    """With the replay buffer saved, a run stopped half-way and resumed ends with the same parameters,
    optimizer state, counters and logged metrics as a run that was never stopped."""
    env = ["env=Pendulum", "agent.batch_size=64"] if agent == "sac" else []
    cfg = _config(f"agent={agent}", "env.num_envs=2", *env)
    straight = Trainer(cfg, tmp_path / "straight")
    straight.train()
    straight.close()

    torch.manual_seed(123)  # the process's RNGs are scrambled in between: the checkpoint restores them
    np.random.seed(123)
    first = Trainer(cfg, tmp_path / "resumed")
    _stop_at(first, 1111)
    with pytest.raises(TrainingStopped):
        first.train()
    first.close()
    ck = load_checkpoint(tmp_path / "resumed")
    assert 1111 <= ck["trainer"]["step"] < 1120 and ck["env"]["actions"].shape[1] == 2
    second = Trainer(cfg, tmp_path / "resumed", resume_from=ck)
    second.train()
    second.close()

    a, b = straight.agent.state_dict(), second.agent.state_dict()
    _assert_same(a, b)
    assert (straight.step, straight.updates, straight.episodes) == (second.step, second.updates, second.episodes)
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "resumed")


def _assert_same(a, b, path="agent"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


# -- numerical faults ------------------------------------------------------------------------------------------
def _poison_batches(trainer: Trainer, from_update: int, every: int = 1) -> None:
    """From the ``from_update``-th sampled batch on, every ``every``-th batch has a NaN reward."""
    sample = trainer.buffer.sample
    count = [0]

    def poisoned(n):
        batch = sample(n)
        count[0] += 1
        if count[0] >= from_update and (count[0] - from_update) % every == 0:
            batch.reward[0] = float("nan")
        return batch
    trainer.buffer.sample = poisoned


@pytest.mark.parametrize("agent", ["dqn", "rainbow"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, agent):
    cfg = _config(f"agent={agent}", "checkpoint.every=500", "checkpoint.save_replay=false")
    tr = Trainer(cfg, tmp_path / "run")
    _poison_batches(tr, from_update=300)
    with pytest.raises(TrainingStopped, match=r"non-finite loss or gradient \(nan\) at step \d+: training diverged; "
                                              r"the last good checkpoint in .* is kept") as e:
        tr.train()
    tr.close()
    stop = int(str(e.value).split(" at step ")[1].split(":")[0])
    ckpts = list_checkpoints(tmp_path / "run")
    assert ckpts and all(int(p.stem.split("_")[1]) < stop for p in ckpts)  # nothing written after the fault
    assert stop // 500 * 500 == int(ckpts[-1].stem.split("_")[1])
    for name, t in load_checkpoint(ckpts[-1])["agent"]["online"].items():
        assert torch.isfinite(t).all(), name
    for name, t in tr.agent.online.state_dict().items():  # the bad update was never applied
        assert torch.isfinite(t).all(), name


def test_nonfinite_skip_drops_bad_batches_and_finishes(tmp_path):
    cfg = _config("agent=rainbow", "nonfinite=skip", "eval.every=0")
    tr = Trainer(cfg, tmp_path / "run")
    _poison_batches(tr, from_update=10, every=7)
    summary = tr.train()
    tr.close()
    assert summary["step"] == 2400 and tr.skipped_updates == len(range(10, tr.updates + 1, 7)) > 50
    assert all(torch.isfinite(t).all() for t in tr.agent.online.state_dict().values())
    events = [r for r in read_metrics(tmp_path / "run", "event") if "nonfinite_loss_skipped" in r]
    assert len(events) == tr.skipped_updates


def test_nonfinite_gradient_is_not_applied():
    """A finite loss whose gradient is inf/NaN (an overflowing backward) changes nothing either."""
    import gymnasium as gym

    from rlq.agents import make_agent
    cfg = _config("agent=dqn")
    agent = make_agent(cfg.agent, gym.spaces.Box(-1, 1, (4,), np.float32), gym.spaces.Discrete(2))
    before = {k: v.clone() for k, v in agent.online.state_dict().items()}
    w = agent.online.encoder.net[0].weight
    loss = (w * torch.tensor(float("inf"))).sum() * 0 + 1.0  # finite value, NaN gradient
    assert math.isnan(agent.optimizer_step(loss, agent.optimizer, agent._params))
    assert all(torch.equal(before[k], v) for k, v in agent.online.state_dict().items())
    assert not agent.optimizer.state  # Adam's moments were not created either


# -- disk full -------------------------------------------------------------------------------------------------------
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A write that fails half-way (ENOSPC) leaves the previous checkpoint intact, no temporary file behind,
    and stops the run with a message that says so; the run resumes from that checkpoint."""
    import errno

    from rlq.checkpoint import CheckpointError
    cfg = _config("checkpoint.every=500", "eval.every=0")
    tr = Trainer(cfg, tmp_path / "run")
    real_save = torch.save
    calls = [0]

    def full_disk(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint: some bytes reach the file, then the disk is full
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step_0000001000\.pt: \[Errno 28\] No space "
                                              r"left on device \(the previous checkpoint is intact\)"):
        tr.train()
    tr.close()
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000000500.pt"]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    ck = load_checkpoint(tmp_path / "run")
    assert ck["trainer"]["step"] == 500
    again = Trainer(cfg, tmp_path / "run", resume_from=ck)
    assert again.train()["step"] == 2400
    again.close()


# -- long runs -------------------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.slow
def test_memory_stays_flat_over_a_long_run(tmp_path):
    """80k steps with the replay buffer full after 5k, evaluation, logging and checkpoints all along: the resident
    memory after warm-up grows by less than 25 MB (no growth in the trainer, logger or replay)."""
    cfg = _config("total_steps=80000", "agent.buffer_size=5000", "eval.every=5000", "checkpoint.every=5000",
                  "checkpoint.save_replay=false", "log.every=100", "log.tensorboard=true")
    tr = Trainer(cfg, tmp_path / "run")
    samples: list[tuple[int, float]] = []
    set_step = tr.agent.set_step

    def hook(s):
        if s % 2000 == 0:
            samples.append((s, _rss_mb()))
        set_step(s)
    tr.agent.set_step = hook
    tr.train()
    tr.close()
    after_warmup = [m for s, m in samples if s >= 20000]
    growth = after_warmup[-1] - after_warmup[0]
    print("RSS MB by step:", [(s, round(m, 1)) for s, m in samples])
    assert growth < 25, samples
