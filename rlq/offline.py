"""Offline RL: datasets of transitions (made by ``python -m rlq.collect``) and the training loop that learns from
one with no environment interaction except evaluation.

``python -m rlq.train agent=<name> env=<the dataset's env> offline.dataset=<file>`` trains any off-policy agent
(``qensemble``, ``dqn``, ``sac`` / ``sac_n`` / ``lb_sac``, ...) from the file: every update samples a batch
uniformly (with replacement) from the whole dataset. Public offline datasets (D4RL, RL Unplugged) cannot be
downloaded on the reference machine; datasets are made with ``rlq.collect`` from a (partly) trained run.

Counting. In offline mode **``total_steps`` counts gradient updates**, and so do ``eval.every``,
``checkpoint.every`` and ``log.every`` (there are no env steps); the ``step`` of every logged record and of
every checkpoint file is the number of updates so far. Evaluation (greedy, ``eval.*``), checkpoints, logging,
``resume=<run dir>``, Ctrl-C (checkpoint, then exit 130) and ``eval.target_return`` work as for online runs.

Dataset file (``DATASET_FORMAT``): a safetensors file (no pickle) with the tensors ``obs``, ``action``,
``reward`` (raw, unclipped), ``terminated``, ``truncated``, ``next_obs`` (the true last observation of an
episode), ``life_loss`` (Atari only) and ``episode_returns`` (of the behaviour episodes that finished), one
row per transition, and a JSON ``meta`` header: format version, env config, spaces, behaviour policy
(checkpoint, agent, its training step), noise, seed, transition and episode counts, returns. Observations are
stored in full (fine for vector observations; an Atari transition takes 2 x 28 KB).

Deviations: one-step targets only (``agent.n_step=1``; the dataset's ``discount`` is ``gamma (1 - terminated)``,
``truncated`` transitions bootstrap), uniform sampling (no prioritized replay), rewards clipped at sample time
when ``env.clip_rewards`` is set, like online training.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rlq.checkpoint import save_checkpoint, space_to_dict
from rlq.replay.base import Batch
from rlq.trainer import (Trainer, TrainingStopped, _np_global_state, _set_np_global_state, make_env_from_cfg,
                         tune_malloc)

DATASET_FORMAT = "rlq-dataset"
DATASET_VERSION = 1
REQUIRED = ("obs", "action", "reward", "terminated", "truncated", "next_obs")


class DatasetError(ValueError):
    """A dataset file that cannot be used (one-line message naming the file)."""


# -- files ----------------------------------------------------------------------------------------------------
def save_dataset(path: str | Path, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write a dataset file atomically (temporary name, then rename)."""
    import os
    import tempfile

    import safetensors.numpy

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    header = {"format": DATASET_FORMAT, "version": str(DATASET_VERSION),
              "meta": json.dumps({**meta, "format": DATASET_FORMAT, "version": DATASET_VERSION}, allow_nan=False)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(safetensors.numpy.save(arrays, metadata=header))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def dataset_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` header of a dataset file (reads the header only). Raises DatasetError."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"offline.dataset={str(path)!r}: file not found (make one with python -m rlq.collect)")
    try:
        with safe_open(str(p), framework="numpy") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
    except Exception as e:  # noqa: BLE001 - any parse failure is reported the same way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetError(f"offline.dataset={str(path)!r} is not a readable dataset file (safetensors): {first[:160]}") from None
    if header.get("format") != DATASET_FORMAT:
        raise DatasetError(f"offline.dataset={str(path)!r} is not an rlq dataset (no '{DATASET_FORMAT}' header; "
                           "make one with python -m rlq.collect)")
    if int(header.get("version", -1)) > DATASET_VERSION:
        raise DatasetError(f"offline.dataset={str(path)!r} was written by a newer rlq (dataset version "
                           f"{header['version']} > {DATASET_VERSION})")
    missing = [k for k in REQUIRED if k not in keys]
    if missing:
        raise DatasetError(f"offline.dataset={str(path)!r} lacks the tensors {missing}")
    return json.loads(header["meta"])


def load_dataset(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors as numpy arrays, meta) of a dataset file. Raises DatasetError."""
    import safetensors.numpy

    meta = dataset_meta(path)
    arrays = safetensors.numpy.load_file(str(path))
    n = len(arrays["reward"])
    bad = [k for k in REQUIRED if len(arrays[k]) != n]
    if bad or n == 0:
        raise DatasetError(f"offline.dataset={str(path)!r} is inconsistent: {n} rewards, tensors {bad} differ"
                           if bad else f"offline.dataset={str(path)!r} holds no transitions")
    return arrays, meta


def check_offline_config(cfg: DictConfig) -> None:
    """The offline part of ``rlq.config.validate``: the dataset exists, is one, matches the env; one line."""
    from rlq.config import ConfigError
    from rlq.envs import resolve_env

    path = str(cfg.offline.dataset)
    try:
        meta = dataset_meta(path)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    env = str(meta.get("env", {}).get("name", "?"))
    try:
        same = resolve_env(env).id == resolve_env(str(cfg.env.name)).id
    except ValueError:
        same = env == str(cfg.env.name)
    if not same:
        raise ConfigError(f"offline.dataset={path!r} was collected on {env}, but env is {cfg.env.name}: pass env={env}")
    a = cfg.agent
    if a.get("prioritized", False):
        raise ConfigError("agent.prioritized=true is not supported offline (batches are sampled uniformly from the "
                          "dataset): use agent.prioritized=false")
    if int(a.get("n_step", 1)) != 1:
        raise ConfigError(f"agent.n_step={a.n_step}: offline training uses one-step targets; use agent.n_step=1")
    if int(a.batch_size) > int(meta.get("transitions", 0)):
        raise ConfigError(f"agent.batch_size={a.batch_size} is larger than the dataset ({meta.get('transitions')} "
                          f"transitions in {path})")


# -- sampling -------------------------------------------------------------------------------------------------
class DatasetSampler:
    """Uniform batches (with replacement) from a loaded dataset, as the replay buffer's :class:`Batch`."""

    def __init__(self, arrays: dict[str, np.ndarray], gamma: float, clip_rewards: bool, seed: int,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.obs = torch.from_numpy(np.ascontiguousarray(arrays["obs"])).to(self.device)
        self.next_obs = torch.from_numpy(np.ascontiguousarray(arrays["next_obs"])).to(self.device)
        action = np.asarray(arrays["action"])
        self.action = torch.from_numpy(action.astype(np.int64 if action.dtype.kind in "iu" else np.float32)).to(self.device)
        reward = np.asarray(arrays["reward"], np.float32)
        self.reward = torch.from_numpy(np.clip(reward, -1.0, 1.0) if clip_rewards else reward).to(self.device)
        terminal = np.asarray(arrays["terminated"], bool)
        if "life_loss" in arrays:  # Atari: a life loss ends bootstrapping, as in online training
            terminal = terminal | np.asarray(arrays["life_loss"], bool)
        self.discount = torch.from_numpy((gamma * (1.0 - terminal)).astype(np.float32)).to(self.device)
        self.size = len(reward)
        self.rng = np.random.default_rng(seed)
        self._ones: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.size

    def sample(self, batch_size: int) -> Batch:
        idx = torch.from_numpy(self.rng.integers(self.size, size=batch_size)).to(self.device)
        if self._ones is None or len(self._ones) != batch_size:
            self._ones = torch.ones(batch_size, device=self.device)
        return Batch(obs=self.obs[idx], action=self.action[idx], reward=self.reward[idx], discount=self.discount[idx],
                     next_obs=self.next_obs[idx], idx=idx, weights=self._ones)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


def _fingerprint(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """A cheap identity of a dataset (its header and a digest of its rewards), checked on resume."""
    import hashlib

    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    h.update(np.ascontiguousarray(arrays["reward"]).tobytes())
    return h.hexdigest()


# -- the loop -------------------------------------------------------------------------------------------------
class OfflineTrainer(Trainer):
    """The offline counterpart of :class:`rlq.trainer.Trainer`: same agent, evaluation, checkpoint and logging
    pieces, batches from a dataset instead of a replay buffer fed by an env (module docstring)."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, resume_from: dict[str, Any] | None = None):
        from rlq.agents import make_agent

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        seed = int(cfg.seed)
        torch.manual_seed(seed)
        np.random.seed(seed)
        arrays, self.dataset_meta = load_dataset(str(cfg.offline.dataset))
        self.dataset_id = _fingerprint(self.dataset_meta, arrays)
        e = cfg.eval
        self._eval_env = make_env_from_cfg(cfg.env, min(int(e.num_envs), int(e.episodes)), seed + 10_000)
        obs_space = self._eval_env.single_observation_space
        act_space = self._eval_env.single_action_space
        self._check_spaces(arrays, obs_space, act_space)
        if cfg.get("malloc_tuning", True):
            tune_malloc()
        threads = int(cfg.threads) or (1 if len(obs_space.shape) < 3 else 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.spaces = {"observation": space_to_dict(obs_space), "action": space_to_dict(act_space)}
        self.agent = make_agent(cfg.agent, obs_space, act_space, device=cfg.device, seed=seed, quant=cfg.get("quant"))
        self.sampler = DatasetSampler(arrays, float(cfg.agent.gamma), bool(cfg.env.clip_rewards), seed, cfg.device)
        self.env = None
        self.num_envs = 0
        self.step = self.updates = self.vector_steps = self.episodes = 0
        self.skipped_updates = 0
        self.best_eval = -math.inf
        self._stop_reason: str | None = None
        self.resumed = resume_from is not None
        if resume_from is not None:
            self._restore(resume_from)
        self.logger = None

    @staticmethod
    def _check_spaces(arrays: dict[str, np.ndarray], obs_space, act_space) -> None:
        obs_shape = tuple(arrays["obs"].shape[1:])
        if obs_shape != tuple(obs_space.shape):
            raise DatasetError(f"the dataset's observations have shape {obs_shape}, the env's {tuple(obs_space.shape)}")
        discrete = hasattr(act_space, "n")
        if discrete != (arrays["action"].dtype.kind in "iu"):
            raise DatasetError(f"the dataset's actions ({arrays['action'].dtype}) do not fit the env's action space "
                               f"{act_space}")
        if not discrete and tuple(arrays["action"].shape[1:]) != tuple(act_space.shape):
            raise DatasetError(f"the dataset's actions have shape {tuple(arrays['action'].shape[1:])}, the env's "
                               f"{tuple(act_space.shape)}")

    # -- checkpoints --------------------------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        return {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "spaces": self.spaces,
            "agent": self.agent.state_dict(),
            "trainer": {"step": self.step, "vector_steps": 0, "updates": self.updates, "episodes": 0,
                        "best_eval": self.best_eval, "recent_returns": [], "offline": True,
                        "skipped_updates": self.skipped_updates},
            "offline": {"sampler": self.sampler.state_dict(), "dataset_id": self.dataset_id,
                        "dataset": str(self.cfg.offline.dataset)},
            "rng": {"torch": torch.get_rng_state(), "numpy": _np_global_state()},
        }

    def save(self) -> Path:
        path = save_checkpoint(self.run_dir, self.step, self.payload(), keep=int(self.cfg.checkpoint.keep))
        if self.logger is not None:
            self.logger.flush()
        return path

    def _restore(self, ckpt: dict[str, Any]) -> None:
        off = ckpt.get("offline")
        if off is None:
            raise DatasetError("resume: the checkpoint is from an online run; offline.dataset cannot be added to it")
        if off["dataset_id"] != self.dataset_id:
            raise DatasetError(f"resume: offline.dataset={off['dataset']!r} is not the dataset the run was trained "
                               "on (its contents changed)")
        self.agent.load_state_dict(ckpt["agent"])
        t = ckpt["trainer"]
        self.step = self.updates = int(t["updates"])
        self.best_eval = float(t["best_eval"])
        self.skipped_updates = int(t.get("skipped_updates", 0))
        self.sampler.load_state_dict(off["sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        _set_np_global_state(ckpt["rng"]["numpy"])

    # -- the loop -----------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run until ``total_steps`` updates; returns a summary. SIGINT/SIGTERM save a checkpoint and stop."""
        from rlq.logging import ProgressLine, RunLogger

        cfg, a = self.cfg, self.cfg.agent
        total, batch_size = int(cfg.total_steps), int(a.batch_size)
        eval_every, ckpt_every, log_every = int(cfg.eval.every), int(cfg.checkpoint.every), int(cfg.log.every)
        skip_nonfinite = cfg.get("nonfinite", "stop") == "skip"
        target = cfg.eval.get("target_return")
        target_return = None if target is None else float(target)
        self.logger = RunLogger(self.run_dir, tensorboard=bool(cfg.log.tensorboard),
                                resume_step=self.step if self.resumed else None)
        self.progress = ProgressLine(total, enabled=bool(cfg.log.progress))
        old_handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        quant_start = self.agent.quant.start_at(total) if self.agent.quant.enabled else None
        if not self.resumed:
            self.logger.log(0, {"dataset_transitions": float(len(self.sampler)),
                                "behaviour_return_mean": self.dataset_meta.get("return_mean")}, kind="event")
        t0, upd0 = time.perf_counter(), self.updates
        t_log, upd_log = t0, self.updates
        last_metrics: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        try:
            while self.updates < total:
                if quant_start is not None and self.updates >= quant_start:
                    if not self.agent.quant_active:
                        self.agent.start_quantization()
                        self.logger.log(self.step, {"quant_started": 1.0}, kind="event")
                    quant_start = None
                self.agent.set_step(self.updates)
                prev = self.updates
                out = self.agent.update(self.sampler.sample(batch_size))
                self.updates += 1
                self.step = self.updates
                self.agent.on_update_round(self.updates)
                loss = out.metrics.get("loss")
                if loss is not None and not math.isfinite(loss):  # the agent applied nothing
                    if not skip_nonfinite:
                        raise TrainingStopped(
                            f"non-finite loss or gradient ({loss}) at update {self.updates}: training diverged; the "
                            f"last good checkpoint in {self.run_dir / 'checkpoints'} is kept (lower the learning "
                            f"rate, or nonfinite=skip to drop such batches)")
                    self.skipped_updates += 1
                    self.logger.log(self.step, {"nonfinite_loss_skipped": float(self.skipped_updates)}, kind="event")
                else:
                    last_metrics = out.metrics

                if self.updates // log_every > prev // log_every or self.updates >= total:
                    now = time.perf_counter()
                    ups = (self.updates - upd_log) / max(now - t_log, 1e-9)
                    t_log, upd_log = now, self.updates
                    self.logger.log(self.step, {"updates_per_s": ups, "updates": float(self.updates),
                                                **self.agent.schedule_metrics(), **last_metrics})
                    self.progress.update(self.step, {"ups": round(ups), "eval": last_eval.get("return_mean")})

                if (eval_every > 0 and self.updates // eval_every > prev // eval_every) or \
                        (self.updates >= total and cfg.eval.final):
                    last_eval = self.evaluate()
                    self.logger.log(self.step, last_eval, kind="eval")
                    self.progress.update(self.step, {"eval": last_eval["return_mean"],
                                                     "iqm": last_eval["return_iqm"]}, force=True)
                    if target_return is not None and last_eval["return_mean"] >= target_return:
                        self.logger.log(self.step, {"target_return_reached": last_eval["return_mean"]}, kind="event")
                        break

                if ckpt_every > 0 and self.updates // ckpt_every > prev // ckpt_every:
                    self.save()
                if self._stop_reason is not None:
                    raise TrainingStopped(f"stopped by {self._stop_reason}")
        except TrainingStopped as stop:
            if self._stop_reason is not None:
                path = self.save()
                print(f"\n{stop} at update {self.updates}; checkpoint saved to {path}. Resume with:\n"
                      f"  python -m rlq.train resume={self.run_dir}", file=sys.stderr)
            raise
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.progress.close()
        path = self.save()
        elapsed = time.perf_counter() - t0
        summary = {"step": self.step, "updates": self.updates, "episodes": 0, "wall_s": elapsed, "sps": 0.0,
                   "updates_per_s": (self.updates - upd0) / max(elapsed, 1e-9), "eval": last_eval,
                   "best_eval": self.best_eval, "checkpoint": str(path),
                   "behaviour_return_mean": self.dataset_meta.get("return_mean")}
        self.logger.flush()
        return summary

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if self._eval_env is not None:
            self._eval_env.close()
