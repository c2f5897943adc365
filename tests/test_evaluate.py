"""`python -m rlq.evaluate` on every kind of input: a run directory, a checkpoint file, a glob of runs (with
the aggregate over runs), a sweep directory, a policy file; video recording; bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rlq.deploy
from rlq import evaluate
from rlq.checkpoint import list_checkpoints
from rlq.evaluation import iqm

TINY = ["total_steps=600", "agent.learning_starts=200", "eval.every=300", "eval.episodes=2", "checkpoint.every=300",
        "log.progress=false", "log.tensorboard=false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two short DQN runs on CartPole (seeds 0 and 1), trained by one basic-launcher sweep."""
    root = tmp_path_factory.mktemp("evaluate")
    res = subprocess.run([sys.executable, "-m", "rlq.train", "-m", "seed=0,1", *TINY, "hydra.sweep.dir=sweep"],
                         cwd=root, capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted((root / "sweep").glob("*-dqn-CartPole-s*"))
    assert [r.name for r in runs] == ["0-dqn-CartPole-s0", "1-dqn-CartPole-s1"]
    return root / "sweep"


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    rc = evaluate.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_run_directory_and_checkpoint_file(sweep, capsys):
    run = sweep / "0-dqn-CartPole-s0"
    rc, out, err = run_main(capsys, f"checkpoint={run}", "episodes=3", "json=true")
    assert rc == 0, err
    res = json.loads(out)
    assert len(res["returns"]) == 3 and res["env"] == "CartPole" and res["agent"] == "dqn"
    assert res["checkpoint"].endswith("step_0000000600.pt") and res["epsilon"] == 0.0  # CartPole's eval_epsilon
    assert res["iqm"] == pytest.approx(iqm(np.array(res["returns"])))

    first = list_checkpoints(run)[0]
    rc, out, err = run_main(capsys, f"checkpoint={first}", "episodes=2")
    assert rc == 0, err
    assert str(first) in out and "IQM" in out and "aggregate" not in out  # one run: no aggregate


def test_glob_of_two_runs_aggregates_over_runs(sweep, capsys):
    rc, out, err = run_main(capsys, f"checkpoint={sweep}/*-dqn-CartPole-s*", "episodes=3", "json=true", "reps=500")
    assert rc == 0, err
    res = json.loads(out)
    assert [Path(r["checkpoint"]).parents[1].name for r in res["runs"]] == ["0-dqn-CartPole-s0", "1-dqn-CartPole-s1"]
    (label,) = res["aggregate"]
    agg = res["aggregate"][label]
    assert label == "dqn on CartPole" and agg["runs"] == 2 and agg["episodes_per_run"] == [3, 3]
    scores = [r["mean"] for r in res["runs"]]  # a run's score is its mean return: runs are the replicates
    assert agg["scores"] == pytest.approx(scores)
    assert agg["mean"]["point"] == pytest.approx(np.mean(scores))
    assert agg["iqm"]["point"] == pytest.approx(np.mean(scores))  # IQM of 2 values cuts nothing
    assert agg["median"]["point"] == pytest.approx(np.median(scores))
    for key in ("iqm", "mean", "median", "optimality_gap"):
        iv = agg[key]
        assert iv["low"] <= iv["point"] + 1e-9 and iv["point"] <= iv["high"] + 1e-9, key
    # bootstrap over 2 runs: the 95% interval of the mean spans the two run scores (exactly when they differ)
    assert agg["mean"]["low"] == pytest.approx(min(scores)) and agg["mean"]["high"] == pytest.approx(max(scores))
    assert agg["target"] == 475.0 and "reward threshold" in agg["target_source"]
    assert agg["optimality_gap"]["point"] == pytest.approx(np.mean(np.maximum(475.0 - np.array(scores), 0)))

    # a sweep directory means its job directories; text output ends with the aggregate
    rc, out, err = run_main(capsys, f"checkpoint={sweep}", "episodes=2", "target=100", "reps=200")
    assert rc == 0, err
    assert "aggregate over runs" in out and "dqn on CartPole: 2 runs" in out and "(target 100: target=)" in out
    for name in ("IQM", "mean", "median", "optimality gap"):
        assert f"    {name}" in out


def test_glob_from_the_command_line(sweep, cli, capsys):
    res = cli("rlq.evaluate", f"checkpoint={sweep}/*-s1", "episodes=1", "json=true")  # one match: one run's result
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["checkpoint"].startswith(str(sweep / "1-dqn-CartPole-s1"))
    rc, _, err = run_main(capsys, f"checkpoint={sweep}/nothing-*")
    assert rc == 2
    expected = (f"error: checkpoint='{sweep}/nothing-*' matches no run directory with checkpoints and no "
                f"checkpoint file (0 paths matched)")
    assert err.strip().splitlines() == [expected]


def test_record_video_cartpole(sweep, capsys, tmp_path):
    cv2 = pytest.importorskip("cv2")
    run = sweep / "1-dqn-CartPole-s1"
    rc, out, err = run_main(capsys, f"checkpoint={run}", "episodes=3", "num_envs=2", "record_video=true",
                            "video_episodes=2", "json=true")
    assert rc == 0, err
    res = json.loads(out)
    videos = [Path(v) for v in res["videos"]]
    assert len(videos) == 2 and all(v.parent == run / "videos" for v in videos)
    assert sorted(p.name for p in (run / "videos").iterdir()) == sorted(v.name for v in videos)  # no leftovers
    for k, v in enumerate(videos):
        assert v.stat().st_size > 1000 and v.name.startswith(f"step_0000000600-ep{k:03d}-return")
        cap = cv2.VideoCapture(str(v))
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (600, 400)
        cap.release()
        # the first two episodes the evaluation counted: the reset frame + one frame per step
        assert frames == res["lengths"][k] + 1
        assert v.name.endswith(f"-return{res['returns'][k]:g}.mp4")
    # recording does not change what is evaluated
    rc, out, _ = run_main(capsys, f"checkpoint={run}", "episodes=3", "num_envs=2", "json=true")
    assert json.loads(out)["returns"] == res["returns"]
    # video_dir= puts them elsewhere
    rc, _, err = run_main(capsys, f"checkpoint={run}", "episodes=1", "record_video=true", f"video_dir={tmp_path / 'v'}")
    assert rc == 0, err
    assert len(list((tmp_path / "v").glob("*.mp4"))) == 1


class _AgentPolicy:
    """A stand-in for a loaded low-bit policy with the deploy runtime's API (act, graph)."""

    def __init__(self, run: Path):
        import rlq

        self.agent = rlq.load_agent(run)
        self.graph = {"observation": {"shape": [4], "dtype": "float32"},
                      "meta": {"agent": "dqn", "env": "CartPole", "quant": "w8a8"}}
        self.backend = "stub"

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.agent.act(obs, explore=False)


def test_policy_file_code_path_with_a_stub_runtime(sweep, tmp_path, monkeypatch):
    run = sweep / "0-dqn-CartPole-s0"
    policy = tmp_path / "cartpole.rlqp"
    policy.write_bytes(b"stub")
    calls = []

    def load_policy(path, backend="auto"):
        calls.append((path, backend))
        return _AgentPolicy(run)

    monkeypatch.setattr(rlq.deploy, "load_policy", load_policy, raising=False)
    res = evaluate.evaluate_policy_file(str(policy), episodes=4, seed=3)
    assert calls == [(str(policy), "auto")]
    assert res["env"] == "CartPole" and res["agent"] == "dqn" and res["quant"] == "w8a8" and res["policy"] == str(policy)
    # the same greedy policy on the same protocol and seeds plays the same episodes as the checkpoint
    ref = evaluate.evaluate_checkpoint(str(run), episodes=4, seed=3)
    assert res["returns"] == ref["returns"] and res["epsilon"] == ref["epsilon"] == 0.0
    with pytest.raises(ValueError, match=r"expects observations of shape \[4\], but env Acrobot gives \[6\]"):
        evaluate.evaluate_policy_file(str(policy), env="Acrobot", episodes=1)
    with pytest.raises(ValueError, match="policy file not found"):
        evaluate.evaluate_policy_file(str(tmp_path / "missing.rlqp"), episodes=1)


def test_policy_file_exported(sweep, tmp_path, cli):
    if not hasattr(rlq.deploy, "load_policy"):
        pytest.skip("rlq.deploy.load_policy (the low-bit policy runtime) is not available yet")
    run = sweep / "0-dqn-CartPole-s0"
    out = tmp_path / "cartpole.rlqp"
    res = cli("rlq.export", f"checkpoint={run}", f"out={out}", "calib=rollout", "calib_steps=200")
    assert res.returncode == 0, res.stderr[-2000:]
    res = cli("rlq.evaluate", f"policy={out}", "episodes=2", "json=true")  # env from the file's meta
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["env"] == "CartPole" and len(got["returns"]) == 2 and got["policy"] == str(out)
    res = cli("rlq.evaluate", f"policy={out}", "env=CartPole", "episodes=1", "record_video=true")
    assert res.returncode == 0, res.stderr
    assert list((tmp_path / "videos").glob("cartpole-ep000-return*.mp4"))


@pytest.mark.parametrize("args, message", [
    (["checkpoint=a", "policy=b"], "give one of checkpoint="),
    ([], "give one of checkpoint="),
    (["checkpoint=a", "env=Pong"], "env=<name> selects the env of a policy file"),
    (["checkpoint=a", "video_episodes=0"], "video_episodes=0 must be >= 1"),
    (["checkpoint=a", "record_video=maybe"], "record_video='maybe' is not a bool"),
    (["policy=/no/such/file.rlqp"], None),
])
def test_bad_input_one_line(capsys, args, message):
    rc, out, err = run_main(capsys, *args)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    if message is not None:
        assert message in lines[0]
