"""Sweeps (`python -m rlq.train -m ...`): the joblib, Ray, SLURM launchers and the Optuna sweeper presets,
experiment presets, preflight validation of sweeps, and the job's return value."""
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from rlq import train
from rlq.checkpoint import list_checkpoints
from rlq.config import ConfigError, group_options
from rlq.evaluate import evaluate_checkpoint
from rlq.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["total_steps=600", "agent.learning_starts=200", "eval.every=300", "eval.episodes=2", "log.progress=false",
        "log.tensorboard=false"]


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def load_aggregate():
    spec = importlib.util.spec_from_file_location("rlq_aggregate", ROOT / "experiments" / "aggregate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def sweep(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # Ray: a local instance, not a cluster
    return subprocess.run([sys.executable, "-m", "rlq.train", "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**env, "PYTHONUNBUFFERED": "1"}, check=False)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_run_dir(run: Path) -> None:
    """A complete, self-contained run directory that evaluates on its own."""
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [300, 600]
    assert list_checkpoints(run)[-1].name == "step_0000000600.pt"
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.total_steps == 600 and "hydra" not in cfg
    res = evaluate_checkpoint(str(run), episodes=1)
    assert len(res["returns"]) == 1


# ---------------------------------------------------------------------------------------------- joblib
@pytest.mark.skipif(not has("hydra_plugins.hydra_joblib_launcher"),
                    reason='hydra-joblib-launcher is not installed (pip install "rlq[sweep]")')
def test_joblib_sweep_runs_four_jobs_then_aggregate(tmp_path):
    res = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "agent=dqn,double_dqn", "seed=0,1",
                *TINY, "hydra.sweep.dir=sw")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "JoblibLauncher" in res.stdout or "Joblib" in res.stdout + res.stderr
    runs = job_dirs(tmp_path / "sw")
    assert [r.name for r in runs] == ["0-dqn-CartPole-s0", "1-dqn-CartPole-s1", "2-double_dqn-CartPole-s0",
                                      "3-double_dqn-CartPole-s1"]
    for run in runs:
        check_run_dir(run)
    assert (tmp_path / "sw" / "multirun.yaml").is_file()

    aggregate = load_aggregate()
    out = aggregate.aggregate([str(tmp_path / "sw")], str(tmp_path / "agg"), reps=300)
    summary = (out / "summary.md").read_text()
    assert "| dqn | 2 |" in summary and "| double_dqn | 2 |" in summary and "P(X > Y)" in summary
    rows = (out / "summary.csv").read_text().strip().splitlines()
    assert rows[0].startswith("env,group,runs,iqm,iqm_low,iqm_high") and len(rows) == 3
    assert len((out / "runs.csv").read_text().strip().splitlines()) == 5
    if not has("matplotlib"):
        pytest.skip("matplotlib is not installed: tables checked, plots not")
    for name in ("learning_curves", "final_scores", "performance_profile", "probability_of_improvement"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name


def test_job_threads_share_the_cpus():
    cpus = train._cpu_count()
    joblib = OmegaConf.create({"launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher."
                                                        "JoblibLauncher", "n_jobs": 2}})
    assert train.job_threads(joblib) == max(1, cpus // 2)
    joblib.launcher.n_jobs = -1  # joblib: every CPU runs a job
    assert train.job_threads(joblib) == 1
    basic = OmegaConf.create({"launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}})
    assert train.job_threads(basic) == cpus


def test_objective_is_the_final_eval_iqm():
    assert train.objective({"eval": {"return_mean": 10.0, "return_iqm": 12.5}}) == 12.5
    assert math.isnan(train.objective({"eval": {}}))


# ------------------------------------------------------------------------------------------ presets
def hydra_cfg(cli, *args: str) -> dict:
    res = cli("rlq.train", "--cfg", "hydra", *args)
    assert res.returncode == 0, res.stderr[-2000:]
    return yaml.safe_load(res.stdout)["hydra"]


@pytest.mark.skipif(not has("hydra_plugins.hydra_submitit_launcher"),
                    reason='hydra-submitit-launcher is not installed (pip install "rlq[cluster]")')
def test_slurm_preset_composes(cli):
    launcher = hydra_cfg(cli, "hydra/launcher=rlq_slurm", "hydra.launcher.partition=cpu")["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "cpu" and launcher["cpus_per_task"] == 2 and launcher["mem_gb"] == 8
    assert launcher["timeout_min"] == 240 and launcher["array_parallelism"] == 32
    res = cli("rlq.train", "--cfg", "job", "hydra/launcher=rlq_slurm", "+experiment=pong_rainbow")
    assert res.returncode == 0 and yaml.safe_load(res.stdout)["agent"]["name"] == "rainbow"
    if shutil.which("srun") is None:  # a sweep submitted from a machine without SLURM: one line, nothing written
        res = cli("rlq.train", "-m", "hydra/launcher=rlq_slurm", "seed=0,1")
        expected = ("error: hydra/launcher=rlq_slurm submits SLURM jobs, but this machine has no srun: launch the "
                    "sweep from a SLURM login node (hydra/launcher=joblib runs it here)")
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [expected]


@pytest.mark.skipif(not has("hydra_plugins.hydra_ray_launcher"),
                    reason='hydra-ray-launcher is not installed (pip install "rlq[cluster]")')
def test_ray_preset_composes(cli):
    launcher = hydra_cfg(cli, "hydra/launcher=rlq_ray")["launcher"]
    assert launcher["_target_"].endswith("ray_launcher.RayLauncher")
    assert launcher["ray"]["remote"]["num_cpus"] == 1 and launcher["ray"]["remote"]["max_calls"] == 1
    assert "address" in launcher["ray"]["init"]


@pytest.mark.skipif(not (has("ray") and has("hydra_plugins.hydra_ray_launcher")),
                    reason='ray / hydra-ray-launcher are not installed (pip install "rlq[cluster]")')
def test_ray_sweep_on_a_local_instance(tmp_path):
    res = sweep(tmp_path, "hydra/launcher=rlq_ray", "hydra.launcher.ray.init.num_cpus=2", "agent=dqn,double_dqn",
                *TINY, "hydra.sweep.dir=sw", timeout=400)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    runs = job_dirs(tmp_path / "sw")
    assert [r.name for r in runs] == ["0-dqn-CartPole-s0", "1-double_dqn-CartPole-s0"]
    for run in runs:
        check_run_dir(run)


@pytest.mark.skipif(not has("hydra_plugins.hydra_optuna_sweeper"),
                    reason='hydra-optuna-sweeper is not installed (pip install "rlq[sweep]")')
def test_optuna_preset_maximizes_the_final_eval_iqm(cli, tmp_path):
    sweeper = hydra_cfg(cli, "hydra/sweeper=rlq_optuna")["sweeper"]
    assert sweeper["_target_"].endswith("OptunaSweeper") and sweeper["direction"] == "maximize"
    assert sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler" and "agent.lr" in sweeper["params"]
    # the plugin's own preset minimizes: refused with one line
    res = cli("rlq.train", "-m", "hydra/sweeper=optuna", "total_steps=100")
    expected = ("error: hydra.sweeper.direction=minimize: a trial returns its final eval IQM return, to maximize: "
                "use hydra/sweeper=rlq_optuna or hydra.sweeper.direction=maximize")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [expected]
    # a 2-trial study: each trial's value is its run's final eval IQM, the best one is the largest
    res = sweep(tmp_path, "hydra/sweeper=rlq_optuna", "hydra.sweeper.n_trials=2", *TINY, "hydra.sweep.dir=opt")
    assert res.returncode == 0, res.stderr[-3000:]
    runs = job_dirs(tmp_path / "opt")
    assert len(runs) == 2
    finals = [read_metrics(r, "eval")[-1]["return_iqm"] for r in runs]
    best = yaml.safe_load((tmp_path / "opt" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(finals))
    assert set(best["best_params"]) == {"agent.lr", "agent.target_update_period", "agent.batch_size"}


def test_experiment_presets_compose():
    cfg = train.preflight(["+experiment=pong_rainbow"])
    assert (cfg.agent.name, cfg.env.name, cfg.total_steps) == ("rainbow", "Pong", 1_000_000)
    # preset values win over the `atari:` blocks (eval every 250k there), the command line over the preset
    assert (cfg.eval.every, cfg.eval.episodes, cfg.checkpoint.every) == (50_000, 5, 50_000)
    assert cfg.agent.lr == 6.25e-5 and cfg.agent.learning_starts == 20_000  # Rainbow's Atari values
    cfg = train.preflight(["+experiment=pong_rainbow", "eval.every=10000", "seed=4", "env=Breakout"])
    assert (cfg.eval.every, cfg.seed, cfg.env.name) == (10_000, 4, "Breakout")
    cfg = train.preflight(train.rewrite_env_args(["+experiment=pong_rainbow", "env=Seaquest", "agent=dqn"]))
    assert (cfg.agent.name, cfg.env.name, cfg.eval.every) == ("dqn", "Seaquest", 50_000)

    cfg = train.preflight(["+experiment=cartpole_dqn_family"])  # a sweep preset also composes as one run
    assert (cfg.agent.name, cfg.env.name, cfg.total_steps, cfg.threads) == ("dqn", "CartPole", 50_000, 1)
    cfg = train.preflight(["+experiment=qat_cartpole", "quant=w4a8"])
    assert cfg.quant.name == "w4a8" and cfg.quant.start_step == 0.5 and cfg.quant.weight_bits == 4

    # the sweep presets' jobs: hydra.sweeper.params, the command line replacing the same keys
    jobs = train.sweep_jobs(["+experiment=cartpole_dqn_family"],
                            {"agent": "dqn,double_dqn,dueling_dqn,rainbow", "seed": "range(5)"})
    assert len(jobs) == 20 and ["agent=rainbow", "seed=4", "+experiment=cartpole_dqn_family"] in jobs
    jobs = train.sweep_jobs(["+experiment=cartpole_dqn_family", "seed=0"], {"agent": "dqn,rainbow", "seed": "range(5)"})
    assert jobs == [["agent=dqn", "seed=0", "+experiment=cartpole_dqn_family"],
                    ["agent=rainbow", "seed=0", "+experiment=cartpole_dqn_family"]]
    assert train.preflight_sweep(["+experiment=qat_cartpole"]) == 5  # 4 quant x 5 seeds: 5 jobs cover every value


def test_halfcheetah_sac_preset():
    if "sac" not in group_options("agent"):
        pytest.skip("the sac agent (configs/agent/sac.yaml) is not there yet")
    cfg = train.preflight(["+experiment=halfcheetah_sac"])
    assert (cfg.agent.name, cfg.env.name, cfg.total_steps) == ("sac", "HalfCheetah", 200_000)


# --------------------------------------------------------------------------------------- bad input
def one_line_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(list(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["hydra/launcher=nope"], "error: unknown hydra/launcher 'nope': choose one of basic, "),
    (["-m", "hydra/launcher=nope", "seed=0,1"], "error: unknown hydra/launcher 'nope': choose one of basic, "),
    (["-m", "hydra/sweeper=nope"], "error: unknown hydra/sweeper 'nope': choose one of basic, "),
    (["+experiment=nope"], "error: unknown experiment 'nope': choose one of cartpole_dqn_family, "),
    (["experiment=pong_rainbow"], "error: use +experiment=pong_rainbow (with a '+'"),
    (["-m", "agent=dqn,nope"], "error: unknown agent 'nope': choose one of "),
    (["-m", "seed=0,-1"], "error: seed=-1 is out of range: must be >= 0"),
    (["-m", "+experiment=cartpole_dqn_family", "agent.lr=0,0.001"], "error: agent.lr=0"),
    (["-m", "agent.lr=interval(0.1,0.2)"], "the basic sweeper takes lists (a,b), range(...) or choice(...)"),
    (["-m", "env=Seaquest,Pong"], "'Seaquest' is not an env preset, and a sweep over env needs presets"),
])
def test_bad_sweep_input_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in one_line_error(capsys, *argv)
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "runs").exists()


def test_bad_launcher_from_the_command_line(cli, tmp_path):
    res = cli("rlq.train", "-m", "hydra/launcher=nope", "agent=dqn,double_dqn")
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: unknown hydra/launcher 'nope': choose one of basic") and "rlq_slurm" in line
    assert not (tmp_path / "multirun").exists()


def test_missing_plugin_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_joblib") else real(name, *a))
    launcher = OmegaConf.create({"launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher."
                                                          "JoblibLauncher"}, "sweeper": {}})
    with pytest.raises(ConfigError, match=r'needs hydra_plugins.hydra_joblib_launcher.joblib_launcher, which is not '
                                          r'installed: pip install "rlq\[sweep\]"'):
        train._check_plugin_targets(launcher)
