"""Crash safety: a training run killed with SIGKILL at random moments, and while it writes a checkpoint, always
resumes from its last checkpoint and reaches its final step; no checkpoint is ever unreadable.

The fast test runs 4 trials; ``pytest -m slow tests/test_crash.py`` runs 24 (12 at random moments, 12 during
checkpoint writes)."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlq.checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint
from rlq.logging import read_metrics

COMMON = ["checkpoint.every=300", "checkpoint.keep=2", "checkpoint.save_replay=true", "eval.every=0", "eval.final=false",
          "log.every=100", "log.progress=false", "log.tensorboard=false", "agent.learning_starts=200", "threads=1"]


def _writing(run: Path) -> bool:
    d = checkpoint_dir(run)
    try:
        return any(e.name.endswith(".tmp") for e in os.scandir(d))
    except FileNotFoundError:
        return False


def _check_checkpoints(run: Path) -> int:
    """Every checkpoint file loads; returns the newest step (0 if none)."""
    step = 0
    for path in list_checkpoints(run):
        ck = load_checkpoint(path)  # raises on an unreadable file
        assert ck["trainer"]["step"] == int(path.stem.split("_")[1])
        assert ck["replay"]["t"] > 0 and ck["env"]["actions"].shape[0] == ck["trainer"]["vector_steps"]
        step = max(step, ck["trainer"]["step"])
    return step


def crash_trials(root: Path, trials: int, total: int, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    run = root / "run"
    stats = {"trials": 0, "killed_during_write": 0, "killed_at_random": 0, "restarted_fresh": 0}
    last = 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for i in range(trials):
        if list_checkpoints(run):
            cmd = [sys.executable, "-m", "rlq.train", f"resume={run}"]
        else:  # killed before its first checkpoint: nothing to resume, start again
            stats["restarted_fresh"] += i > 0
            shutil.rmtree(run, ignore_errors=True)
            cmd = [sys.executable, "-m", "rlq.train", f"run_dir={run}", f"total_steps={total}", f"seed={seed}", *COMMON]
        proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        during_write = i % 2 == 1
        deadline = time.time() + 120
        if during_write:  # wait for a checkpoint write to begin (its temporary file), kill at once
            while time.time() < deadline and proc.poll() is None and not _writing(run):
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(2.0, 6.0))
        in_write = _writing(run)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (-signal.SIGKILL, 0), err.decode()[-2000:]
        stats["trials"] += 1
        stats["killed_during_write" if in_write else "killed_at_random"] += 1
        step = _check_checkpoints(run)
        assert step >= last, f"trial {i}: newest checkpoint went back from {last} to {step}"
        last = step
    # the last resume runs to the end
    if list_checkpoints(run):
        res = subprocess.run([sys.executable, "-m", "rlq.train", f"resume={run}"], cwd=root, capture_output=True,
                             text=True, env=env, timeout=900)
    else:
        shutil.rmtree(run, ignore_errors=True)
        res = subprocess.run([sys.executable, "-m", "rlq.train", f"run_dir={run}", f"total_steps={total}", *COMMON],
                             cwd=root, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _check_checkpoints(run) == total
    assert not any(p.name.endswith(".tmp") for p in checkpoint_dir(run).iterdir())  # stale temporaries removed
    steps = [r["step"] for r in read_metrics(run, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == total  # one record per step: the lost timelines dropped
    return stats


def test_sigkill_trials_resume_and_finish(tmp_path):
    stats = crash_trials(tmp_path, trials=4, total=6000)
    assert stats["trials"] == 4 and stats["killed_during_write"] >= 1, stats


@pytest.mark.slow
def test_sigkill_24_trials(tmp_path):
    stats = crash_trials(tmp_path, trials=24, total=60000, seed=1)
    print(stats)
    assert stats["trials"] == 24 and stats["killed_during_write"] >= 6, stats
