"""End-to-end: `python -m rlq.train` / `rlq.evaluate`, run directories, resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rlq
from rlq.checkpoint import list_checkpoints, load_checkpoint
from rlq.logging import read_metrics

FAST = ["total_steps=3000", "agent.learning_starts=500", "agent.train_freq=4", "eval.every=1500", "eval.episodes=2",
        "checkpoint.every=1000", "log.every=500", "log.progress=false"]


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "runs").iterdir()) if (root / "runs").exists() else []


def test_train_run_directory_resume_and_evaluate(cli, tmp_path):
    res = cli("rlq.train", *FAST)
    assert res.returncode == 0, res.stderr[-2000:]
    (run,) = run_dirs(tmp_path)
    assert run.name.startswith("dqn-CartPole-s0-")
    assert (run / "config.yaml").is_file() and (run / ".hydra").is_dir()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    kinds = {r["kind"] for r in read_metrics(run)}
    assert kinds == {"train", "episode", "eval"}
    train = read_metrics(run, "train")
    assert {"sps", "updates_per_s", "epsilon", "loss", "q_mean", "return_recent"} <= set(train[-1])
    assert [p.name for p in list_checkpoints(run)] == [f"step_{s:010d}.pt" for s in (1000, 2000, 3000)]
    ck = load_checkpoint(run)
    assert ck["trainer"]["step"] == 3000 and "replay" not in ck

    # resume and extend; the run directory and its metrics continue
    res = cli("rlq.train", f"resume={run}", "total_steps=4000")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stdout and run_dirs(tmp_path) == [run]
    assert load_checkpoint(run)["trainer"]["step"] == 4000
    assert max(r["step"] for r in read_metrics(run, "train")) == 4000

    # evaluate a run directory and a checkpoint file
    res = cli("rlq.evaluate", f"checkpoint={run}", "episodes=3", "json=true")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["returns"]) == 3 and out["env"] == "CartPole"
    res = cli("rlq.evaluate", f"checkpoint={list_checkpoints(run)[0]}", "episodes=2")
    assert res.returncode == 0 and "IQM" in res.stdout

    # load_agent in a user's script
    agent = rlq.load_agent(run)
    env = rlq.make_env("CartPole", num_envs=2, seed=0)
    obs, _ = env.reset(seed=0)
    assert agent.act(obs, explore=False).shape == (2,)


def test_resume_with_replay_and_other_options(cli, tmp_path):
    res = cli("rlq.train", "agent=dueling_dqn", "agent.n_step=3", "env.num_envs=3", "checkpoint.save_replay=true",
              "run_dir=myrun", *FAST)
    assert res.returncode == 0, res.stderr[-2000:]
    ck = load_checkpoint(tmp_path / "myrun")
    assert "replay" in ck and ck["config"]["agent"]["n_step"] == 3 and ck["config"]["agent"]["dueling"]
    res = cli("rlq.train", "resume=myrun", "total_steps=4500")
    assert res.returncode == 0, res.stderr[-2000:]
    # 3 envs: steps advance by 3, so the run stops at the first multiple of 3 >= 4500
    assert load_checkpoint(tmp_path / "myrun")["trainer"]["step"] == 4500


def test_killed_run_resumes_from_last_checkpoint(cli, tmp_path):
    args = [sys.executable, "-m", "rlq.train", "total_steps=1000000", "checkpoint.every=500", "eval.every=0",
            "agent.learning_starts=200", "log.progress=false", "run_dir=killed"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(tmp_path / "killed")) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(tmp_path / "killed")
    step = load_checkpoint(tmp_path / "killed")["trainer"]["step"]
    res = cli("rlq.train", "resume=killed", f"total_steps={step + 1000}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_checkpoint(tmp_path / "killed")["trainer"]["step"] == step + 1000


def test_sigint_saves_checkpoint_and_explains_resume(tmp_path):
    args = [sys.executable, "-m", "rlq.train", "total_steps=1000000", "checkpoint.every=0", "eval.every=0",
            "log.progress=false", "run_dir=interrupted"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "interrupted" / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "stopped by SIGINT" in err and f"python -m rlq.train resume={tmp_path / 'interrupted'}" in err
    assert list_checkpoints(tmp_path / "interrupted")


BAD_INPUTS = [
    (["agent=nope"], "unknown agent 'nope': choose one of"),
    (["env=NoSuchEnv"], "unknown env 'NoSuchEnv'"),
    (["quant=int3"], "unknown quant 'int3': choose one of"),
    (["agent.nope=1"], "unknown config key 'agent.nope': valid keys under 'agent' are"),
    (["total_steps=-5"], "total_steps=-5 is out of range"),
    (["total_steps=abc"], "total_steps='abc' is not an integer"),
    (["env.num_envs=0"], "env.num_envs=0 is out of range"),
    (["agent.lr=0"], "agent.lr=0"),
    (["agent.gamma=1.5"], "agent.gamma=1.5 is out of range"),
    (["agent.batch_size=2.5"], "agent.batch_size=2.5 is not an integer"),
    (["agent.encoder=cnn"], "encoder 'cnn' needs image observations"),
    (["resume=does/not/exist"], "resume='does/not/exist' is not an rlq run directory"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_bad_input_one_line_no_run_dir(cli, tmp_path, args, message):
    extra = [] if any(a.startswith("total_steps") for a in args) else ["total_steps=100"]
    res = cli("rlq.train", *args, *extra)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resume_cannot_change_agent(cli, tmp_path):
    res = cli("rlq.train", "total_steps=600", "agent.learning_starts=100", "eval.every=0", "run_dir=r")
    assert res.returncode == 0, res.stderr[-2000:]
    res = cli("rlq.train", "resume=r", "agent=double_dqn")
    assert res.returncode == 2 and "resume cannot change 'agent=double_dqn'" in res.stderr


def test_evaluate_bad_input(cli, tmp_path):
    res = cli("rlq.evaluate", "checkpoint=nowhere")
    assert res.returncode == 2 and res.stderr.strip() == "error: checkpoint not found: nowhere"
    res = cli("rlq.evaluate", "checkpoint=x", "episodes=0")
    assert res.returncode == 2 and "episodes=0 must be >= 1" in res.stderr
    res = cli("rlq.evaluate", "checkpoint=x", "bogus=1")
    assert res.returncode == 2 and "unknown argument 'bogus'" in res.stderr


def test_works_from_any_directory_and_gym_ids(cli, tmp_path):
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    res = cli("rlq.train", "env=MountainCar-v0", "total_steps=400", "agent.learning_starts=100", "eval.every=0",
              "log.progress=false", cwd=sub)
    assert res.returncode == 0, res.stderr[-2000:]
    (run,) = run_dirs(sub)
    assert load_checkpoint(run)["config"]["env"]["name"] == "MountainCar-v0"


def test_target_return_stops_training_early(tmp_path):
    from rlq.train import _compose, build_config
    from rlq.trainer import Trainer
    ov = ["total_steps=5000", "agent.learning_starts=200", "eval.every=500", "eval.episodes=2",
          "eval.target_return=1", "checkpoint.every=0", "log.progress=false", "log.tensorboard=false"]
    tr = Trainer(build_config(_compose(ov), ov), tmp_path / "run")
    summary = tr.train()
    tr.close()
    assert summary["step"] == 500 and summary["best_eval"] >= 1
    assert [r["step"] for r in read_metrics(tmp_path / "run", "event")] == [500]
    assert list_checkpoints(tmp_path / "run")  # the stopped run is saved (and resumable)
