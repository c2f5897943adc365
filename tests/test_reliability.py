"""Reliability: exact resume, crash safety under SIGKILL, numerical faults, unwritable run directories."""
from __future__ import annotations

import math

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


@pytest.mark.parametrize("agent", ["dqn", "rainbow"])
def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, agent):
    """With the replay buffer saved, a run stopped half-way and resumed ends with the same parameters,
    optimizer state, counters and logged metrics as a run that was never stopped."""
    cfg = _config(f"agent={agent}", "env.num_envs=2")
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
