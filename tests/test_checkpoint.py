"""Checkpoint files: atomic writes, retention, and refusing bad or hostile files without running them."""
import os
import pickle

import pytest
import torch

from rlq.checkpoint import (CheckpointError, atomic_save, best_checkpoint_path, list_checkpoints, load_checkpoint,
                            resolve_checkpoint, save_checkpoint)


def test_save_keeps_newest_and_resolves_run_dir(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"x": torch.tensor([step])}, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_0000000030.pt", "step_0000000040.pt"]
    assert resolve_checkpoint(tmp_path).name == "step_0000000040.pt"
    assert int(load_checkpoint(tmp_path)["x"]) == 40
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    atomic_save({"format": "rlq-checkpoint", "v": 1}, path)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


@pytest.mark.parametrize("content, match", [
    (b"", "is empty"),
    (b"not a checkpoint at all", "not a readable rlq checkpoint"),
    (None, "not an rlq checkpoint"),  # a valid torch file without our header
])
def test_bad_files_get_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(tmp_path, 1, {"w": torch.randn(1000)})
    full = resolve_checkpoint(tmp_path).read_bytes()
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupted or foreign"):
        load_checkpoint(path)


def test_missing_checkpoint_and_empty_run_dir(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no checkpoint found in run directory"):
        load_checkpoint(tmp_path)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_pickle_payload_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"format": "rlq-checkpoint", "version": 1, "agent": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def _train_keep_best(run, overrides: list[str]):
    """Train a CartPole DQN run with checkpoint.keep_best=true: (config, trainer, [(step, mean eval return)])."""
    from rlq.logging import read_metrics
    from rlq.train import _compose, build_config
    from rlq.trainer import Trainer
    ov = ["agent=dqn", *overrides, "checkpoint.every=0", "checkpoint.keep_best=true", "log.progress=false",
          "log.tensorboard=false", "threads=1"]
    cfg = build_config(_compose(ov), ov)
    tr = Trainer(cfg, run)
    tr.train()
    tr.close()
    return cfg, tr, [(r["step"], r["return_mean"]) for r in read_metrics(run, "eval")]


def test_keep_best_with_delayed_qat_keeps_a_quantized_policy(tmp_path):
    """With quant.start_step part-way through, evaluations of the float network before it are not candidates:
    checkpoints/best.pt is a quantized policy from the first evaluation at or after the start."""
    from rlq.checkpoint import load_agent
    from rlq.quant import is_quantized
    run = tmp_path / "run"
    _, tr, evals = _train_keep_best(run, ["quant=w8a8", "quant.start_step=0.5", "total_steps=2000",
                                          "agent.learning_starts=200", "eval.every=250", "eval.episodes=2",
                                          "eval.num_envs=2"])
    late = [r for s, r in evals if s >= 1000]
    assert evals[0][0] < 1000 and late
    ckpt = load_checkpoint(best_checkpoint_path(run))
    assert ckpt["best_eval"]["step"] >= 1000 and ckpt["best_eval"]["return_mean"] == max(late) == tr.best_eval
    assert is_quantized(load_agent(best_checkpoint_path(run)).online)


def test_keep_best_saves_the_policy_of_the_best_evaluation(tmp_path):
    """checkpoint.keep_best: checkpoints/best.pt holds the agent of the first evaluation with the highest mean
    return; re-evaluating it on the same episodes gives that return; the newest step checkpoint is unchanged."""
    from rlq.checkpoint import load_agent
    from rlq.evaluation import run_episodes
    from rlq.trainer import make_env_from_cfg
    run = tmp_path / "run"
    cfg, tr, evals = _train_keep_best(run, ["total_steps=4000", "agent.learning_starts=500",
                                            "agent.eps_decay_steps=2000", "eval.every=500", "eval.episodes=3",
                                            "eval.num_envs=3"])
    best = max(r for _, r in evals)
    assert len({r for _, r in evals}) > 1 and evals[-1][1] != best  # (the selection matters in this run)
    first = next(s for s, r in evals if r == best)
    ckpt = load_checkpoint(best_checkpoint_path(run))
    assert ckpt["best_eval"]["step"] == first and ckpt["best_eval"]["return_mean"] == best
    assert resolve_checkpoint(run).name == "step_0000004000.pt" and tr.best_eval == best
    agent = load_agent(best_checkpoint_path(run))
    env = make_env_from_cfg(cfg.env, 3, 10_000)
    returns, _ = run_episodes(lambda o: agent.act(o, explore=False), env, 3, seed=10_000)
    env.close()
    assert float(returns.mean()) == best
