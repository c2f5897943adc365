"""experiments/aggregate.py on synthetic run directories with hand-computed values."""
import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def agg():
    spec = importlib.util.spec_from_file_location("rlq_aggregate_under_test", ROOT / "experiments" / "aggregate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_run(root: Path, name: str, evals: list[tuple[int, float]], agent: str = "dqn", seed: int = 0,
             env: str = "CartPole", quant: str = "none", lr: float = 1e-3, extra: dict | None = None) -> Path:
    """A run directory as rlq.train writes it: config.yaml and metrics.jsonl (train, episode, eval records)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"seed": seed, "total_steps": evals[-1][0], "run_dir": None, "threads": 0,
           "agent": {"name": agent, "lr": lr, "hidden": [64, 64]}, "env": {"name": env, "num_envs": 1},
           "quant": {"name": quant}, "eval": {"every": 100, "episodes": 10}, "log": {"progress": False},
           **(extra or {})}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    t0 = 1_800_000_000.0
    lines = []
    for i, (step, value) in enumerate(evals):
        lines.append({"step": step, "kind": "train", "time": t0 + step / 100, "return_recent": value / 2})
        lines.append({"step": step, "kind": "episode", "time": t0 + step / 100, "episode_return": value / 4})
        lines.append({"step": step, "kind": "eval", "time": t0 + step / 100, "return_mean": value,
                      "return_iqm": value + 1, "return_std": 0.0})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return run


def curve(final: float, steps=(100, 200, 300, 400)) -> list[tuple[int, float]]:
    return [(s, final * s / steps[-1]) for s in steps]


def test_groups_tables_and_hand_computed_statistics(agg, tmp_path):
    for seed, final in enumerate([1.0, 2.0, 3.0, 10.0]):
        make_run(tmp_path / "sw", f"{seed}-dqn-s{seed}", curve(final), seed=seed)
    for seed, final in enumerate([20.0, 30.0, 40.0]):
        make_run(tmp_path / "sw", f"{4 + seed}-rainbow-s{seed}", curve(final), agent="rainbow", seed=seed)
    (tmp_path / "sw" / "multirun.yaml").write_text("{}")
    out = agg.aggregate([str(tmp_path / "sw")], str(tmp_path / "out"), reps=500)
    with open(out / "summary.csv") as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dqn", "rainbow"}  # seeds never split groups
    dqn, rainbow = rows["dqn"], rows["rainbow"]
    assert int(dqn["runs"]) == 4 and int(rainbow["runs"]) == 3
    # finals 1, 2, 3, 10: IQM cuts one each side -> 2.5; mean 4; median (of the runs) 2.5
    assert float(dqn["iqm"]) == pytest.approx(2.5)
    assert float(dqn["mean"]) == pytest.approx(4.0)
    assert float(dqn["median"]) == pytest.approx(2.5)
    assert float(dqn["mean_low"]) <= 4.0 <= float(dqn["mean_high"]) and float(dqn["mean_high"]) <= 10.0
    assert float(rainbow["iqm"]) == pytest.approx(30.0)  # n=3: nothing cut
    assert float(dqn["best_mean"]) == pytest.approx(4.0) and int(dqn["steps_max"]) == 400
    assert float(dqn["wall_s_mean"]) >= 3.0  # from the first record (step 100) to the last (step 400)
    summary = (out / "summary.md").read_text()
    assert "| dqn | 4 | 2.50 [" in summary and "| rainbow | 3 | 30.00 [" in summary
    # every rainbow run beats every dqn run: P(dqn > rainbow) = 0, with a degenerate interval
    assert "| dqn | rainbow | 0.00 [0.00, 0.00] |" in summary
    assert len((out / "runs.csv").read_text().strip().splitlines()) == 8


def test_labels_from_differing_overrides_and_name_by(agg, tmp_path):
    make_run(tmp_path, "a0", curve(1), lr=1e-3, seed=0)
    make_run(tmp_path, "a1", curve(2), lr=1e-3, seed=1)
    make_run(tmp_path, "b0", curve(3), lr=5e-4, seed=0)
    make_run(tmp_path, "q0", curve(4), quant="w8a8", seed=0)
    make_run(tmp_path, "d0", curve(5), agent="double_dqn", seed=0, extra={"threads": 1})
    runs = [agg.load_run(p, "eval", "return_mean") for p in agg.find_runs([str(tmp_path / "*")])]
    agg.label_runs(runs)
    labels = {r.path.name: r.label for r in runs}
    # lr differs among the fp32 dqn runs: it names their groups; quant and agent name theirs; threads never does
    assert labels == {"a0": "dqn agent.lr=0.001", "a1": "dqn agent.lr=0.001", "b0": "dqn agent.lr=0.0005",
                      "q0": "dqn+w8a8 agent.lr=0.001", "d0": "double_dqn agent.lr=0.001"}
    agg.label_runs(runs, ["quant"])
    assert {r.path.name: r.label for r in runs}["q0"] == "w8a8" and labels["a0"] != "none"
    agg.label_runs(runs, ["agent", "agent.lr"])
    assert {r.path.name: r.label for r in runs}["b0"] == "dqn agent.lr=0.0005"
    with pytest.raises(agg.AggregateError, match="--name-by 'nope': no such config key"):
        agg.label_runs(runs, ["nope"])


def test_learning_curves_interpolate_onto_common_steps(agg, tmp_path):
    a = make_run(tmp_path, "a", [(0, 0.0), (100, 10.0), (200, 20.0), (300, 30.0)])
    b = make_run(tmp_path, "b", [(0, 0.0), (150, 30.0), (250, 50.0)], seed=1)
    c = make_run(tmp_path, "c", [(50, 5.0), (250, 25.0), (400, 40.0)], seed=2)
    runs = [agg.load_run(p, "eval", "return_mean") for p in (a, b, c)]
    steps = agg.common_steps(runs)
    np.testing.assert_array_equal(steps, [50, 100, 150, 200, 250])  # within [max first, min last]
    got, point, low, high = agg.curves(runs, reps=300, seed=0)
    np.testing.assert_array_equal(got, steps)
    expected = np.stack([np.interp(steps, r.steps, r.values) for r in runs])
    # at step 150: a = 15, b = 30, c = 15 (5 + 100 * 20 / 200) -> IQM of 3 values = their mean
    assert expected[:, 2] == pytest.approx([15.0, 30.0, 15.0])
    np.testing.assert_allclose(point, expected.mean(axis=0))
    assert np.all(low <= point + 1e-9) and np.all(point <= high + 1e-9)
    assert np.all(low >= expected.min(axis=0) - 1e-9) and np.all(high <= expected.max(axis=0) + 1e-9)


def test_metrics_multiple_envs_and_plots(agg, tmp_path):
    for seed in range(3):
        make_run(tmp_path, f"cp{seed}", curve(100 + seed), seed=seed)
        make_run(tmp_path, f"pong{seed}", curve(-20 + seed), seed=seed, env="Pong")
    out = agg.aggregate([str(tmp_path / "cp*"), str(tmp_path / "pong*")], str(tmp_path / "o1"), metric="eval.return_iqm",
                        reps=200, title="two envs")
    with open(out / "summary.csv") as f:
        rows = {r["env"]: r for r in csv.DictReader(f)}
    assert float(rows["CartPole"]["mean"]) == pytest.approx(102.0) and float(rows["Pong"]["mean"]) == pytest.approx(-18.0)
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# two envs") and "## CartPole" in summary and "## Pong" in summary
    # non-eval metrics: the final score is the mean of the last 10 records (here all 4)
    out = agg.aggregate([str(tmp_path / "cp*")], str(tmp_path / "o2"), metric="episode", reps=50)
    with open(out / "summary.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["mean"]) == pytest.approx(np.mean([np.mean([v / 4 for _, v in curve(100 + s)]) for s in range(3)]))
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    names = sorted(p.name for p in (tmp_path / "o1").glob("*.png"))
    assert names == ["final_scores.png", "learning_curves.png", "performance_profile.png"]  # 1 group: no P(X > Y)
    assert "![learning_curves](learning_curves.png)" in (tmp_path / "o1" / "summary.md").read_text()


def test_cli_errors_and_default_output(agg, tmp_path, capsys):
    assert agg.main([str(tmp_path / "nothing-*")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {str(tmp_path / 'nothing-*')!r} matches no file or directory"
    (tmp_path / "empty").mkdir()
    assert agg.main([str(tmp_path / "empty")]) == 2
    assert "no run directories" in capsys.readouterr().err
    run = make_run(tmp_path / "runs", "r0", curve(7))
    assert agg.main([str(run), "--metric", "bogus"]) == 2
    assert "--metric 'bogus': give <kind>.<field>" in capsys.readouterr().err
    assert agg.main([str(run), "--metric", "eval.nope"]) == 2
    err = capsys.readouterr().err
    assert "skipping" in err and "none of the 1 runs has 'eval' records with 'nope'" in err
    assert agg.main([str(run), "--reps", "100"]) == 0
    assert (tmp_path / "runs" / "aggregate" / "summary.md").is_file()  # default: beside the runs
    assert "| dqn | 1 | 7.00 [7.00, 7.00] |" in capsys.readouterr().out
