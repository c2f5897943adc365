"""The training loop shared by every off-policy agent (see DESIGN.md, "One training step, as data").

The Trainer is the only place that knows about time: env steps, ``learning_starts``, ``train_freq``,
evaluation and checkpoint schedules, logging. Steps are counted in env steps summed over the vector
envs (``total_steps``, ``eval.every``, ``checkpoint.every``, ``learning_starts``, ε schedule);
``train_freq`` counts vector steps, so with ``num_envs=N`` one update round happens every
``N * train_freq`` env steps and ``gradient_steps`` sets the updates per round.

``overlap=true`` runs each update round in a worker thread while the loop keeps acting and stepping the
envs (torch ops and ale-py's vector env release the GIL, so on 2 cores the learner and the actor each get
one). The batches are sampled in the loop exactly when the synchronous loop samples them, and ``act`` reads
a copy of the policy refreshed when the next round is submitted: the only difference from the synchronous
loop is that acting lags by one update round (``train_freq`` vector steps act with the weights from before
the round in flight). Everything that reads the agent (evaluation, checkpoints, metric records, the QAT
switch, stopping) first waits for the round in flight; evaluation uses the newest weights. A run is as
deterministic as the synchronous one for agents whose ``update`` draws no random numbers from the global
torch generator that ``act`` also uses (true for ε-greedy DQN agents; noisy nets interleave their noise by
timing), and checkpoints hold the acting copy, so an exact resume stays exact. With prioritized replay,
the transitions added while a round is in flight get the largest priority known before that round.
"""
from __future__ import annotations

import hashlib
import math
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rlq.agents import Agent, make_agent
from rlq.checkpoint import save_best_checkpoint, save_checkpoint, space_to_dict
from rlq.envs import make_env
from rlq.evaluation import iqm, run_episodes
from rlq.logging import ProgressLine, RunLogger
from rlq.replay import PrioritizedSampler, ReplayBuffer
from rlq.replay.base import Batch

# env config keys that belong to the trainer, not to make_env
TRAINER_ENV_KEYS = ("name", "num_envs", "clip_rewards", "eval_epsilon")


class TrainingStopped(Exception):
    """Raised inside the loop when a stop was requested (signal) or training diverged."""


def env_kwargs(env_cfg: DictConfig | dict) -> dict[str, Any]:
    d = OmegaConf.to_container(env_cfg, resolve=True) if isinstance(env_cfg, DictConfig) else dict(env_cfg)
    return {k: v for k, v in d.items() if k not in TRAINER_ENV_KEYS}


def make_env_from_cfg(env_cfg: DictConfig, num_envs: int, seed: int):
    return make_env(env_cfg.name, num_envs=num_envs, seed=seed, **env_kwargs(env_cfg))


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_tuned = False


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (``malloc_tuning: true``).

    Every update allocates and frees the same tens of MB (activations, gradients, Adam's temporaries). glibc
    serves blocks above its mmap threshold (128 kB at first, adapting up to 32 MB) with fresh mmap'd pages
    and unmaps them on free, and trims the heap top above 128 kB, so each update pays the page faults and the
    zeroing of those pages again. The mmap threshold at its maximum (32 MB) and a 1 GB trim threshold let the
    heap reuse the blocks: a 1-env Pong DQN loop ran 1.09x faster in fp32 and 1.22x with bf16
    (experiments/results/bench_throughput.md, ``malloc_tuning=false`` rows). Larger blocks (the replay
    buffer) are still mmap'd. Process-wide and applied once; a no-op where the C library is not glibc.
    Returns whether it applied the settings."""
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: leave them alone
            return False
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    _malloc_tuned = ok
    return ok


class Trainer:
    """Runs one training job in ``run_dir`` from a resolved config (see ``configs/config.yaml``)."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, resume_from: dict[str, Any] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        seed = int(cfg.seed)
        torch.manual_seed(seed)
        np.random.seed(seed)

        self.env = make_env_from_cfg(cfg.env, int(cfg.env.num_envs), seed)
        self.num_envs = int(cfg.env.num_envs)
        obs_space, act_space = self.env.single_observation_space, self.env.single_action_space
        if cfg.get("malloc_tuning", True):
            tune_malloc()
        # threads=0: one thread for small vector-observation nets (a second thread only adds sync
        # overhead there, and leaves a core to the env / other runs), torch's default for pixels; with
        # overlap=true all but one core (the actor's) for pixels
        self.overlap = bool(cfg.get("overlap", False))
        threads = int(cfg.threads) or (1 if len(obs_space.shape) < 3 else
                                       max(1, (os.cpu_count() or 2) - 1) if self.overlap else 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.spaces = {"observation": space_to_dict(obs_space), "action": space_to_dict(act_space)}
        self.agent: Agent = make_agent(cfg.agent, obs_space, act_space, device=cfg.device, seed=seed,
                                       quant=cfg.get("quant"))
        a = cfg.agent
        capacity = (int(a.buffer_size) // self.num_envs) * self.num_envs
        self.per = bool(a.get("prioritized", False))
        sampler = PrioritizedSampler(capacity, alpha=float(a.per_alpha), beta0=float(a.per_beta0),
                                     eps=float(a.per_eps), seed=seed) if self.per else None
        self.buffer = ReplayBuffer(
            capacity=capacity, num_envs=self.num_envs, obs_shape=obs_space.shape,
            obs_dtype=obs_space.dtype, action_shape=() if act_space.shape is None else act_space.shape,
            action_dtype=np.int64 if act_space.shape == () else np.float32,
            n_step=int(a.get("n_step", 1)), gamma=float(a.gamma),
            frame_stack=int(cfg.env.frame_stack) if getattr(self.env, "is_atari", False) else 0,
            sampler=sampler, seed=seed,
        )
        self.step = 0            # env steps, summed over envs
        self.vector_steps = 0
        self.updates = 0
        self.episodes = 0
        self.skipped_updates = 0  # batches dropped for a non-finite loss (nonfinite=skip)
        self.best_eval = -math.inf
        self.recent_returns: deque[float] = deque(maxlen=20)
        self._stop_reason: str | None = None
        # exact resume (checkpoint.save_replay): the env's state is its first reset's seed plus every action
        # since; a resume replays them (envs are deterministic given both), so nothing unpicklable is saved
        self.env_seed = seed
        self._actions = _Growing()
        self._env_replay: dict[str, Any] | None = None
        self._obs: np.ndarray | None = None
        self.resumed = resume_from is not None
        self._pending: tuple[list[Batch], Future] | None = None  # overlap: the update round in flight
        if resume_from is not None:
            self._restore(resume_from)
        if self.overlap:  # act() reads copies of the policy (what it read at the checkpoint, on a resume)
            self.agent.use_acting_copies()
            if resume_from is not None and "acting" in resume_from:
                self.agent.load_acting_state(resume_from["acting"])
        self.logger: RunLogger | None = None  # created by train(): building a Trainer writes nothing
        self._eval_env = None

    # -- checkpoints --------------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "spaces": self.spaces,
            "agent": self.agent.state_dict(),
            "trainer": {"step": self.step, "vector_steps": self.vector_steps, "updates": self.updates,
                        "episodes": self.episodes, "best_eval": self.best_eval,
                        "recent_returns": list(self.recent_returns)},
            "rng": {"torch": torch.get_rng_state(), "numpy": _np_global_state()},
        }
        if self.overlap:  # what act() reads until the next update round (exact resume)
            state["acting"] = self.agent.acting_state()
        if self.cfg.checkpoint.save_replay:
            state["replay"] = self.buffer.state_dict()
            state["env"] = {"reset_seed": self.env_seed, "actions": torch.from_numpy(self._action_history()),
                            "obs_sha256": _sha(self._obs)}
        return state

    def save(self) -> Path:
        path = save_checkpoint(self.run_dir, self.step, self.payload(), keep=int(self.cfg.checkpoint.keep))
        if self.logger is not None:
            self.logger.flush()
        return path

    def _action_history(self) -> np.ndarray:
        """Every action since the env's first reset, (vector steps, num_envs, *action shape), compact dtype."""
        space = self.env.single_action_space
        dtype = np.float32 if space.shape else (np.uint8 if int(space.n) <= 256 else np.int64)
        hist = self._actions.view()
        if hist is None:
            return np.zeros((0, self.num_envs, *space.shape), dtype)
        return hist.astype(dtype)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.agent.load_state_dict(ckpt["agent"])
        t = ckpt["trainer"]
        self.step, self.vector_steps, self.updates = int(t["step"]), int(t["vector_steps"]), int(t["updates"])
        self.episodes, self.best_eval = int(t["episodes"]), float(t["best_eval"])
        self.recent_returns.extend(t["recent_returns"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        _set_np_global_state(ckpt["rng"]["numpy"])
        if "replay" in ckpt:
            self.buffer.load_state_dict(ckpt["replay"])
            if "env" in ckpt and ckpt["env"]["actions"].shape[1:2] == (self.num_envs,):
                self._env_replay = ckpt["env"]

    def _replay_env(self) -> np.ndarray:
        """Bring the env to its checkpointed state: reset with the saved seed, step the saved actions."""
        r = self._env_replay
        self._env_replay = None
        actions = r["actions"].numpy()
        space = self.env.single_action_space
        cast = np.float32 if space.shape else np.int64
        self.env_seed = int(r["reset_seed"])
        obs, _ = self.env.reset(seed=self.env_seed)
        for a in actions:
            obs = self.env.step(a.astype(cast))[0]
        self._actions = _Growing()
        self._actions.extend(actions.astype(cast))
        if not r.get("obs_sha256") or _sha(obs) == r["obs_sha256"]:
            self.buffer.continue_stream()  # the transitions go on from the saved last row
        else:
            print(f"warning: replaying {len(actions)} recorded env steps did not reproduce the checkpoint's "
                  f"observation (env {self.cfg.env.name} is not deterministic); the run continues from the "
                  "replayed state, so it is not an exact resume", file=sys.stderr)
        return obs

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        e = self.cfg.eval
        episodes = int(e.episodes)
        if self._eval_env is None:
            self._eval_env = make_env_from_cfg(self.cfg.env, min(int(e.num_envs), episodes), int(self.cfg.seed) + 10_000)
        with self.agent.acting_originals():  # overlap mode: the newest weights, not the actor's copy
            returns, lengths = run_episodes(lambda o: self.agent.act(o, explore=False), self._eval_env, episodes,
                                            seed=int(self.cfg.seed) + 10_000,
                                            epsilon=float(self.cfg.env.eval_epsilon))
        out = {"return_mean": float(returns.mean()), "return_std": float(returns.std()),
               "return_iqm": iqm(returns), "length_mean": float(lengths.mean())}
        # with QAT configured, the policy to keep is a quantized one: evaluations before quant.start_step
        # (a float network) are not candidates for the best checkpoint
        candidate = not (self.agent.quant.enabled and not self.agent.quant_active)
        improved = candidate and out["return_mean"] > self.best_eval
        if candidate:
            self.best_eval = max(self.best_eval, out["return_mean"])
        if improved and self.cfg.checkpoint.get("keep_best", False):  # (SB3 EvalCallback's best model)
            save_best_checkpoint(self.run_dir, {**self.payload(), "best_eval": {"step": self.step, **out}})
        return out

    # -- the loop -----------------------------------------------------------------------------------
    def _request_stop(self, signum, _frame) -> None:
        self._stop_reason = signal.Signals(signum).name

    def train(self) -> dict[str, Any]:
        """Run until ``total_steps``; returns a summary. SIGINT/SIGTERM save a checkpoint and stop."""
        cfg, a = self.cfg, self.cfg.agent
        total = int(cfg.total_steps)
        n = self.num_envs
        train_freq = int(a.train_freq)
        # a resumed run without saved replay refills the buffer before updating again
        min_fill = max(int(a.batch_size), min(int(a.learning_starts), int(a.buffer_size)))
        gradient_steps, batch_size = int(a.gradient_steps), int(a.batch_size)
        eval_every, ckpt_every, log_every = int(cfg.eval.every), int(cfg.checkpoint.every), int(cfg.log.every)
        clip = bool(cfg.env.clip_rewards)
        skip_nonfinite = cfg.get("nonfinite", "stop") == "skip"
        target = cfg.eval.get("target_return")
        target_return = None if target is None else float(target)
        self.logger = RunLogger(self.run_dir, tensorboard=bool(cfg.log.tensorboard),
                                resume_step=self.step if self.resumed else None)
        self.progress = ProgressLine(total, enabled=bool(cfg.log.progress))
        old_handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        threads = torch.get_num_threads()
        pool = ThreadPoolExecutor(1, thread_name_prefix="rlq-update", initializer=torch.set_num_threads,
                                  initargs=(threads,)) if self.overlap else None

        # QAT switches on at quant.start_step (online and target networks together)
        quant_start = self.agent.quant.start_at(total) if self.agent.quant.enabled else None
        if self._env_replay is not None:  # exact resume: the env as it was at the checkpoint
            obs = self._replay_env()
        else:  # a fresh run, or a resume without replay: fresh episodes
            self.env_seed = int(cfg.seed) + self.step
            self._actions = _Growing()
            obs, _ = self.env.reset(seed=self.env_seed)
        record_actions = bool(cfg.checkpoint.save_replay)
        self._obs = obs
        t0, step0, upd0 = time.perf_counter(), self.step, self.updates
        t_log, step_log, upd_log = t0, self.step, self.updates
        last_metrics: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        try:
            while self.step < total:
                if quant_start is not None and self.step >= quant_start:
                    if not self.agent.quant_active:  # (a resumed run may already be quantized)
                        last_metrics = self._drain(skip_nonfinite) or last_metrics
                        self.agent.start_quantization()
                        self.logger.log(self.step, {"quant_started": 1.0}, kind="event")
                    quant_start = None
                self.agent.set_step(self.step)
                actions = self.agent.act(obs, explore=True)
                next_obs, reward, terminated, truncated, info = self.env.step(actions)
                if record_actions:
                    self._actions.extend(np.asarray(actions)[None])
                learn_reward = np.clip(reward, -1.0, 1.0) if clip else reward
                learn_term = terminated | info["life_loss"] if "life_loss" in info else terminated
                self.buffer.add(obs, actions, learn_reward, learn_term, truncated, next_obs,
                                episode_end=terminated | truncated)
                obs = self._obs = next_obs
                prev_step = self.step
                self.step += n
                self.vector_steps += 1

                if "_episode" in info and info["_episode"].any():
                    mask = info["_episode"]
                    for r, l in zip(info["episode"]["r"][mask], info["episode"]["l"][mask]):
                        self.episodes += 1
                        self.recent_returns.append(float(r))
                        self.logger.log(self.step, {"episode_return": float(r), "episode_length": float(l)},
                                        kind="episode")

                if self.vector_steps % train_freq == 0 and len(self.buffer) >= min_fill:
                    if self.per:  # importance-sampling exponent: beta0 -> 1 over the run
                        self.buffer.sampler.set_progress(self.step / total)
                    if pool is None:
                        for _ in range(gradient_steps):
                            batch = self.buffer.sample(batch_size)
                            outs = self._run_updates([batch], self.updates, skip_nonfinite)
                            last_metrics = self._record_updates([batch], outs, skip_nonfinite) or last_metrics
                    else:  # finish the round in flight, refresh the actor's copy, start this round
                        last_metrics = self._drain(skip_nonfinite) or last_metrics
                        self.agent.sync_acting_copies()
                        batches = [self.buffer.sample(batch_size) for _ in range(gradient_steps)]
                        self._pending = (batches, pool.submit(self._run_updates, batches, self.updates,
                                                              skip_nonfinite))

                if self.step // log_every > prev_step // log_every or self.step >= total:
                    last_metrics = self._drain(skip_nonfinite) or last_metrics  # (records as synchronous ones)
                    now = time.perf_counter()
                    dt = max(now - t_log, 1e-9)
                    sps, ups = (self.step - step_log) / dt, (self.updates - upd_log) / dt
                    t_log, step_log, upd_log = now, self.step, self.updates
                    record = {"sps": sps, "updates_per_s": ups, "updates": float(self.updates),
                              "episodes": float(self.episodes), **self.agent.schedule_metrics(), **last_metrics}
                    if self.recent_returns:
                        record["return_recent"] = float(np.mean(self.recent_returns))
                    self.logger.log(self.step, record)
                    self.progress.update(self.step, {"sps": round(sps), "ret": record.get("return_recent"),
                                                     "eval": last_eval.get("return_mean")})

                if ((eval_every > 0 and self.step // eval_every > prev_step // eval_every)
                        or (self.step >= total and cfg.eval.final)):
                    last_metrics = self._drain(skip_nonfinite) or last_metrics
                    last_eval = self.evaluate()
                    self.logger.log(self.step, last_eval, kind="eval")
                    self.progress.update(self.step, {"eval": last_eval["return_mean"],
                                                     "iqm": last_eval["return_iqm"]}, force=True)
                    if target_return is not None and last_eval["return_mean"] >= target_return:
                        self.logger.log(self.step, {"target_return_reached": last_eval["return_mean"]}, kind="event")
                        break

                if ckpt_every > 0 and self.step // ckpt_every > prev_step // ckpt_every:
                    last_metrics = self._drain(skip_nonfinite) or last_metrics
                    self.save()
                if self._stop_reason is not None:
                    raise TrainingStopped(f"stopped by {self._stop_reason}")
            last_metrics = self._drain(skip_nonfinite) or last_metrics
        except TrainingStopped as stop:
            if self._stop_reason is not None:
                self._drain(skip_nonfinite)
                path = self.save()
                print(f"\n{stop} at step {self.step}; checkpoint saved to {path}. Resume with:\n"
                      f"  python -m rlq.train resume={self.run_dir}", file=sys.stderr)
            raise
        finally:
            if pool is not None:
                self._pending = None  # (an exception above leaves a round we no longer record)
                pool.shutdown(wait=True)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.progress.close()
        path = self.save()
        elapsed = time.perf_counter() - t0
        summary = {"step": self.step, "updates": self.updates, "episodes": self.episodes,
                   "wall_s": elapsed, "sps": (self.step - step0) / max(elapsed, 1e-9),
                   "updates_per_s": (self.updates - upd0) / max(elapsed, 1e-9),
                   "eval": last_eval, "best_eval": self.best_eval, "checkpoint": str(path)}
        self.logger.flush()
        return summary

    # -- updates --------------------------------------------------------------------------------------
    def _run_updates(self, batches: list[Batch], updates_before: int, skip_nonfinite: bool) -> list[Any]:
        """``agent.update`` (then ``on_update_round``) on each batch, stopping after a non-finite loss unless
        such batches are skipped. Touches only the agent: overlap mode runs it in the worker thread."""
        outs = []
        for batch in batches:
            out = self.agent.update(batch)
            outs.append(out)
            self.agent.on_update_round(updates_before + len(outs))
            loss = out.metrics.get("loss")
            if loss is not None and not math.isfinite(loss) and not skip_nonfinite:
                break
        return outs

    def _record_updates(self, batches: list[Batch], outs: list[Any], skip_nonfinite: bool) -> dict[str, float] | None:
        """Counters, priorities and the non-finite policy for finished updates; the last good metrics."""
        metrics = None
        for batch, out in zip(batches, outs):
            self.updates += 1
            if out.priorities is not None:
                self.buffer.update_priorities(batch.idx.numpy(), out.priorities)
            loss = out.metrics.get("loss")
            if loss is not None and not math.isfinite(loss):  # the agent applied nothing
                if skip_nonfinite:
                    self.skipped_updates += 1
                    self.logger.log(self.step, {"nonfinite_loss_skipped": float(self.skipped_updates)}, kind="event")
                    continue
                raise TrainingStopped(
                    f"non-finite loss or gradient ({loss}) at step {self.step}: training diverged; the "
                    f"last good checkpoint in {self.run_dir / 'checkpoints'} is kept (lower agent.lr, or "
                    f"nonfinite=skip to drop such batches)")
            metrics = out.metrics
        return metrics

    def _drain(self, skip_nonfinite: bool) -> dict[str, float] | None:
        """Overlap mode: wait for the update round in flight and record it (a no-op otherwise)."""
        if self._pending is None:
            return None
        batches, future = self._pending
        self._pending = None
        return self._record_updates(batches, future.result(), skip_nonfinite)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        self.env.close()
        if self._eval_env is not None:
            self._eval_env.close()


class _Growing:
    """An append-only array along axis 0 with amortised O(1) appends."""

    def __init__(self):
        self._buf: np.ndarray | None = None
        self._n = 0

    def extend(self, rows: np.ndarray) -> None:
        if self._buf is None:
            self._buf = np.empty((max(1024, 2 * len(rows)), *rows.shape[1:]), rows.dtype)
        elif self._n + len(rows) > len(self._buf):
            grown = np.empty((max(2 * len(self._buf), self._n + len(rows)), *self._buf.shape[1:]), self._buf.dtype)
            grown[:self._n] = self._buf[:self._n]
            self._buf = grown
        self._buf[self._n:self._n + len(rows)] = rows
        self._n += len(rows)

    def view(self) -> np.ndarray | None:
        return None if self._buf is None else self._buf[:self._n]


def _sha(obs: np.ndarray | None) -> str:
    return "" if obs is None else hashlib.sha256(np.ascontiguousarray(obs).tobytes()).hexdigest()


def _np_global_state() -> dict[str, Any]:
    """numpy's legacy global RNG state with plain/tensor values (checkpoints load with weights_only)."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_np_global_state(s: dict[str, Any]) -> None:
    np.random.set_state((s["name"], s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))
