"""Offline RL: rlq.collect writes a safe dataset file with its metadata; offline training from it (no env steps),
its checkpoints, evaluation, exact resume and Ctrl-C; bad datasets and arguments in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlq.checkpoint import list_checkpoints, load_agent, load_checkpoint
from rlq.config import ConfigError
from rlq.logging import read_metrics
from rlq.offline import DATASET_FORMAT, OfflineTrainer, dataset_meta, load_dataset, save_dataset
from rlq.train import _compose, build_config, run
from rlq.trainer import Trainer, TrainingStopped

QUIET = ["log.progress=false", "log.tensorboard=false", "threads=1"]
TIMING = {"time", "updates_per_s", "sps", "wall_s"}


def _cfg(*ov):
    ov = list(ov)
    return build_config(_compose(ov), ov)


def _train_online(run_dir, *ov):
    cfg = _cfg(*QUIET, "eval.every=0", "eval.final=false", "checkpoint.every=0", *ov)
    t = Trainer(cfg, run_dir)
    try:
        t.train()
    finally:
        t.close()
    return run_dir


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    """A briefly trained CartPole Q-ensemble (a poor behaviour policy)."""
    return _train_online(tmp_path_factory.mktemp("behaviour") / "run", "agent=qensemble", "agent.n_members=2",
                         "total_steps=1200", "agent.learning_starts=500")


@pytest.fixture(scope="module")
def cartpole_data(cartpole_run, tmp_path_factory):
    from rlq.collect import main
    out = tmp_path_factory.mktemp("data") / "cartpole.safetensors"
    assert main([f"checkpoint={cartpole_run}", "steps=1500", "noise=0.2", f"out={out}", "seed=3"]) == 0
    return out


def test_collect_writes_a_dataset_with_its_metadata(cartpole_run, cartpole_data):
    from safetensors import safe_open
    with safe_open(str(cartpole_data), framework="numpy") as f:  # plain safetensors: nothing to unpickle
        assert f.metadata()["format"] == DATASET_FORMAT
    data, meta = load_dataset(cartpole_data)
    n = 1500
    assert data["obs"].shape == data["next_obs"].shape == (n, 4) and data["obs"].dtype == np.float32
    assert data["action"].shape == (n,) and data["action"].dtype == np.int64 and set(np.unique(data["action"])) <= {0, 1}
    assert data["reward"].dtype == np.float32 and data["terminated"].dtype == bool and "life_loss" not in data
    assert meta["env"]["name"] == "CartPole" and meta["transitions"] == n and meta["noise"] == 0.2
    assert meta["noise_kind"] == "epsilon" and meta["spaces"]["action"] == {"type": "discrete", "n": 2}
    assert meta["policy"]["agent"] == "qensemble" and meta["policy"]["trained_step"] == 1200
    assert str(cartpole_run) in meta["policy"]["checkpoint"]
    # one env: the stream is contiguous, next_obs[t] = obs[t + 1] within an episode; episodes add up
    ends = data["terminated"] | data["truncated"]
    inside = ~ends[:-1]
    np.testing.assert_array_equal(data["next_obs"][:-1][inside], data["obs"][1:][inside])
    bounds = np.flatnonzero(ends)
    sums = [data["reward"][a + 1:b + 1].sum() for a, b in zip(np.r_[-1, bounds[:-1]], bounds)]
    np.testing.assert_allclose(sums, data["episode_returns"][:len(sums)])
    assert meta["episodes"] == len(data["episode_returns"]) >= len(sums)
    assert meta["return_mean"] == pytest.approx(float(np.mean(data["episode_returns"])))


def test_offline_training_end_to_end(cartpole_data, tmp_path):
    """collect -> dataset -> offline train: evaluation, logging and checkpoints count updates, no env steps; the
    run loads with load_agent and plays with rlq.evaluate."""
    cfg = _cfg("agent=qensemble", "agent.n_members=3", f"offline.dataset={cartpole_data}", "total_steps=400",
               "eval.every=200", "eval.episodes=2", "checkpoint.every=200", "log.every=100", *QUIET)
    run_dir = tmp_path / "off"
    summary = run(cfg, run_dir)
    assert summary["updates"] == summary["step"] == 400
    evals = read_metrics(run_dir, "eval")
    assert [e["step"] for e in evals] == [200, 400]
    train = read_metrics(run_dir, "train")
    assert [r["step"] for r in train] == [100, 200, 300, 400] and all("sps" not in r for r in train)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000000200.pt", "step_0000000400.pt"]
    ck = load_checkpoint(run_dir)
    assert ck["trainer"]["offline"] and ck["offline"]["dataset"] == str(cartpole_data)
    agent = load_agent(run_dir)
    assert agent.act(np.zeros((3, 4), np.float32), explore=False).shape == (3,)
    from rlq.evaluate import main as evaluate
    assert evaluate([f"checkpoint={run_dir}", "episodes=2", "json=true"]) == 0


def _offline_trainer(data, run_dir, total=300, resume=None, *ov):
    cfg = _cfg("agent=qensemble", "agent.n_members=2", "agent.target_reduction=redq", f"offline.dataset={data}",
               f"total_steps={total}", "eval.every=100", "eval.episodes=2", "checkpoint.every=0", "log.every=50",
               *QUIET, *ov)
    return OfflineTrainer(cfg, run_dir, resume_from=resume)


def test_offline_stop_and_resume_equals_an_uninterrupted_run(cartpole_data, tmp_path):
    straight = _offline_trainer(cartpole_data, tmp_path / "a")
    straight.train()
    straight.close()
    torch.manual_seed(7)
    np.random.seed(7)
    first = _offline_trainer(cartpole_data, tmp_path / "b")
    set_step = first.agent.set_step

    def stop_at_150(s):  # as Ctrl-C after update 150
        if s >= 150:
            first._stop_reason = "SIGINT"
        set_step(s)
    first.agent.set_step = stop_at_150
    with pytest.raises(TrainingStopped, match="stopped by SIGINT"):
        first.train()
    first.close()
    ck = load_checkpoint(tmp_path / "b")
    assert ck["trainer"]["updates"] == 151
    second = _offline_trainer(cartpole_data, tmp_path / "b", 300, ck)
    second.train()
    second.close()
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    for k, v in a["agent"]["online"].items():
        assert torch.equal(v, b["agent"]["online"][k]), k
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING} for r in recs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))


def test_continuous_collect_and_offline_sac(tmp_path):
    from rlq.collect import main
    run_dir = _train_online(tmp_path / "sac", "agent=sac", "env=Pendulum", "total_steps=300",
                            "agent.learning_starts=200", "agent.batch_size=32")
    out = tmp_path / "pendulum.safetensors"
    assert main([f"checkpoint={run_dir}", "steps=400", "noise=0.5", f"out={out}"]) == 0
    data, meta = load_dataset(out)
    assert data["action"].shape == (400, 1) and data["action"].dtype == np.float32
    assert np.abs(data["action"]).max() <= 2.0 and meta["noise_kind"] == "gaussian_std_half_range"
    assert data["truncated"].sum() == 2 and not data["terminated"].any()  # Pendulum: 200-step time limits
    cfg = _cfg("agent=lb_sac", "env=Pendulum", "agent.n_critics=3", "agent.batch_size=64", f"offline.dataset={out}",
               "total_steps=20", "eval.every=0", "eval.episodes=1", "checkpoint.every=0", *QUIET)
    summary = run(cfg, tmp_path / "off")
    assert summary["updates"] == 20 and np.isfinite(summary["eval"]["return_mean"])


# -- bad input -----------------------------------------------------------------------------------------------------
def test_bad_datasets_are_one_line(cartpole_data, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    foreign = tmp_path / "foreign.safetensors"
    import safetensors.numpy
    foreign.write_bytes(safetensors.numpy.save({"x": np.zeros(3, np.float32)}))
    cases = [
        ([f"offline.dataset={tmp_path / 'missing.safetensors'}"], "file not found (make one with python -m rlq.collect)"),
        ([f"offline.dataset={junk}"], "is not a readable dataset file (safetensors)"),
        ([f"offline.dataset={foreign}"], "is not an rlq dataset (no 'rlq-dataset' header"),
        ([f"offline.dataset={cartpole_data}", "env=Acrobot"], "was collected on CartPole, but env is Acrobot: pass env=CartPole"),
        ([f"offline.dataset={cartpole_data}", "agent=dqn", "agent.prioritized=true"],
         "agent.prioritized=true is not supported offline"),
        ([f"offline.dataset={cartpole_data}", "agent=dqn", "agent.n_step=3"], "agent.n_step=3: offline training uses"),
        ([f"offline.dataset={cartpole_data}", "agent.batch_size=5000"], "agent.batch_size=5000 is larger than the dataset"),
    ]
    for ov, msg in cases:
        with pytest.raises(ConfigError) as e:
            _cfg("agent=qensemble", *ov)
        assert msg in str(e.value) and "\n" not in str(e.value), (ov, str(e.value))


def test_cli_bad_offline_dataset_exits_2_and_writes_nothing(tmp_path, capsys):
    from rlq.train import main
    run_dir = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        main(["agent=qensemble", f"offline.dataset={tmp_path / 'nope.safetensors'}", f"run_dir={run_dir}"])
    assert e.value.code == 2 and not run_dir.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "file not found" in err[0]


def test_dataset_for_another_action_space_is_one_line(cartpole_data, tmp_path):
    data, meta = load_dataset(cartpole_data)
    bad = tmp_path / "bad.safetensors"
    save_dataset(bad, {**data, "obs": data["obs"][:, :3], "next_obs": data["next_obs"][:, :3]}, meta)
    cfg = _cfg("agent=qensemble", f"offline.dataset={bad}", *QUIET)
    with pytest.raises(ConfigError, match=r"^the dataset's observations have shape \(3,\), the env's \(4,\)$"):
        run(cfg, tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,msg", [
    (["steps=10", "out=x.safetensors"], "checkpoint= is required"),
    (["checkpoint=RUN", "out=x.safetensors"], "steps= is required"),
    (["checkpoint=RUN", "steps=10", "out=OUT", "noise=1.5"], "noise=1.5: for discrete actions noise is epsilon, in [0, 1]"),
    (["checkpoint=RUN", "steps=0", "out=OUT"], "steps=0 must be >= 1"),
    (["checkpoint=RUN", "steps=10", "out=OUT", "colour=red"], "unknown argument 'colour'"),
    (["checkpoint=/no/such/run", "steps=10", "out=OUT"], "checkpoint not found"),
])
def test_collect_bad_arguments_exit_2_in_one_line(cartpole_run, tmp_path, capsys, args, msg):
    from rlq.collect import main
    out = tmp_path / "d.safetensors"
    args = [a.replace("RUN", str(cartpole_run)).replace("OUT", str(out)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and not out.exists()


def test_dataset_meta_reads_the_header_only(cartpole_data):
    meta = dataset_meta(cartpole_data)
    assert meta["format"] == DATASET_FORMAT and meta["version"] == 1
    json.dumps(meta)  # plain JSON
