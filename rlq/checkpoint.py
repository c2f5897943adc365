"""Atomic checkpoints, resume, and ``load_agent``.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python containers, loaded back
with ``torch.load(weights_only=True)``: loading never unpickles arbitrary objects, so a planted pickle
payload cannot run. Files are written to a temporary name in the same directory, flushed and fsynced,
then renamed over the final name, so a crash mid-write never leaves a torn checkpoint behind.
"""
from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

FORMAT = "rlq-checkpoint"
VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or written; the message says which file and why."""


# -- spaces ---------------------------------------------------------------------------------------------
def space_to_dict(space: gym.Space) -> dict[str, Any]:
    """Describe a single-env space with plain types (saved in checkpoints so agents can be rebuilt
    without creating an environment)."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.Box):
        return {"type": "box", "shape": list(space.shape), "dtype": str(space.dtype),
                "low": torch.from_numpy(np.array(space.low)), "high": torch.from_numpy(np.array(space.high))}
    raise ValueError(f"unsupported space {space}: rlq handles Discrete and Box spaces")


def space_from_dict(d: dict[str, Any]) -> gym.Space:
    if d["type"] == "discrete":
        return gym.spaces.Discrete(int(d["n"]))
    if d["type"] == "box":
        return gym.spaces.Box(low=d["low"].numpy(), high=d["high"].numpy(), shape=tuple(d["shape"]),
                              dtype=np.dtype(d["dtype"]))
    raise CheckpointError(f"unknown space type {d['type']!r} in checkpoint")


# -- writing --------------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``.

    If anything fails (disk full, permissions) the temporary file is removed and the previous file at
    ``path`` is left untouched; the error names the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, (OSError, RuntimeError)):
            raise CheckpointError(f"could not write checkpoint {path}: {e} (the previous checkpoint is intact)") from e
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files of a run, oldest first (by step)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: str | os.PathLike, step: int, payload: dict[str, Any], keep: int = 3) -> Path:
    """Write ``checkpoints/step_<step>.pt`` atomically and keep the ``keep`` newest."""
    path = checkpoint_dir(run_dir) / f"step_{step:010d}.pt"
    atomic_save({"format": FORMAT, "version": VERSION, **payload}, path)
    for stale in path.parent.glob(".step_*.tmp"):  # left by a process killed mid-write (one writer per run)
        try:
            stale.unlink()
        except OSError:
            pass
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            try:
                old.unlink()
            except OSError:
                pass
    return path


def best_checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """``checkpoints/best.pt``: the policy of a run's best evaluation so far (``checkpoint.keep_best``)."""
    return checkpoint_dir(run_dir) / "best.pt"


def save_best_checkpoint(run_dir: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``checkpoints/best.pt`` atomically (a full checkpoint; never pruned, never the newest one)."""
    path = best_checkpoint_path(run_dir)
    atomic_save({"format": FORMAT, "version": VERSION, **payload}, path)
    return path


# -- reading --------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the newest checkpoint of a run directory."""
    p = Path(path)
    if p.is_dir():
        ckpts = list_checkpoints(p)
        if not ckpts:
            raise CheckpointError(f"no checkpoint found in run directory {p} (expected {checkpoint_dir(p)}/step_*.pt)")
        return ckpts[-1]
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (or a run directory's newest) without executing any code from it."""
    p = resolve_checkpoint(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {p}: {e.strerror}") from e
    if not data:
        raise CheckpointError(f"checkpoint {p} is empty")
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is reported the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p} is not a readable rlq checkpoint (truncated, corrupted or foreign file): "
                              f"{first[:200]}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not an rlq checkpoint (no '{FORMAT}' header)")
    if int(obj.get("version", -1)) > VERSION:
        raise CheckpointError(f"{p} was written by a newer rlq (format version {obj['version']} > {VERSION})")
    return obj


def checkpoint_config(ckpt: dict[str, Any]) -> DictConfig:
    return OmegaConf.create(ckpt["config"])


def load_agent(path: str | os.PathLike, device: str = "cpu"):
    """Rebuild a trained agent from a checkpoint file or run directory, ready to ``act``.

    >>> agent = rlq.load_agent("runs/dqn-CartPole-s0-...")
    >>> actions = agent.act(obs, explore=False)
    """
    from rlq.agents import make_agent

    ckpt = load_checkpoint(path, map_location=device)
    cfg = checkpoint_config(ckpt)
    spaces = ckpt["spaces"]
    agent = make_agent(cfg.agent, space_from_dict(spaces["observation"]), space_from_dict(spaces["action"]),
                       device=device, quant=cfg.get("quant"))
    agent.load_state_dict(ckpt["agent"])
    agent.config = cfg  # the run's resolved config (env settings for evaluation)
    return agent


def atomic_text(text: str, path: str | os.PathLike) -> None:
    """Write a small text file atomically (temporary name + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
