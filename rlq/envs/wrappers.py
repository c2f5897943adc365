"""Episode statistics for vector envs, correct under every autoreset mode, with no per-env Python loop."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper

__all__ = ["EpisodeStats"]


class EpisodeStats(VectorWrapper):
    """Report raw return and length of every finished episode; optionally flag Atari life losses.

    On a step where sub-env ``i`` finishes an episode (``terminated | truncated``) the step's info gets
    ``info["episode"] = {"r": float64 (num_envs,), "l": int64 (num_envs,)}`` and
    ``info["_episode"] = bool (num_envs,)`` (gymnasium's convention: the keys are present only on steps
    where at least one episode finished; entries where ``_episode`` is False are 0).

    Returns sum the rewards the wrapped env produced (raw, unclipped) in float64. Under
    ``NEXT_STEP`` autoreset the step after a done is a reset step (reward 0, obs of the new episode);
    it counts neither in the return nor in the length. Under ``SAME_STEP``/``DISABLED`` the first
    step after a done (or after ``reset``) starts the new episode.

    With ``track_life_loss=True`` (Atari), ``info["life_loss"]`` (bool, every step) is True where
    ``info["lives"]`` decreased since the previous step of the same episode (never on a reset step).
    ``terminated`` is left untouched: the trainer bootstraps with ``terminated | life_loss`` while
    the game goes on.

    Rewards come out as float32 for every env (ALE returns int32).

    Simple attributes for the trainer: ``is_atari``, ``env_id``, ``short_name``, ``frame_stack``
    (stack size of Atari observations, None otherwise), ``seed`` (the seed given to ``make_env``;
    a first ``reset()`` without a seed uses it), ``options`` (resolved Atari options).
    """

    def __init__(
        self,
        env: VectorEnv,
        *,
        is_atari: bool = False,
        env_id: str = "",
        short_name: str = "",
        seed: int | None = None,
        track_life_loss: bool = False,
        frame_stack: int | None = None,
        options: dict[str, Any] | None = None,
    ):
        super().__init__(env)
        self.is_atari = is_atari
        self.env_id = env_id
        self.short_name = short_name or env_id
        self.seed = seed
        self.track_life_loss = track_life_loss
        self.frame_stack = frame_stack
        self.options = dict(options or {})
        mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        self._next_step = AutoresetMode(mode) == AutoresetMode.NEXT_STEP
        n = self.num_envs
        self._ret = np.zeros(n, dtype=np.float64)
        self._len = np.zeros(n, dtype=np.int64)
        self._prev_done = np.zeros(n, dtype=bool)
        self._lives: np.ndarray | None = None
        self._has_reset = False

    def reset(self, *, seed: int | list | np.ndarray | None = None, options: dict[str, Any] | None = None):
        if seed is None and not self._has_reset and self.seed is not None:
            seed = self.seed
        obs, info = self.env.reset(seed=seed, options=options)
        self._has_reset = True
        mask = None if options is None else options.get("reset_mask")
        if mask is None:
            self._ret[:] = 0.0
            self._len[:] = 0
            self._prev_done[:] = False
        else:
            mask = np.asarray(mask, dtype=bool)
            self._ret[mask] = 0.0
            self._len[mask] = 0
            self._prev_done[mask] = False
        if self.track_life_loss:
            lives = np.asarray(info["lives"])
            if mask is None or self._lives is None:
                self._lives = lives.copy()
            else:
                self._lives[mask] = lives[mask]
            info["life_loss"] = np.zeros(self.num_envs, dtype=bool)
        return obs, info

    def step(self, actions):
        if self.is_atari and not (
            isinstance(actions, np.ndarray) and actions.dtype in (np.int32, np.int64)
        ):  # ALE's vector env accepts only int32/int64 arrays
            actions = np.asarray(actions, dtype=np.int64)
        obs, reward, terminated, truncated, info = self.env.step(actions)
        r = np.asarray(reward)
        fresh = self._prev_done  # this sub-env's previous step ended an episode
        if self._next_step:
            # reset step: reward/length of the autoreset do not count
            self._ret = np.where(fresh, 0.0, self._ret + r)
            self._len = np.where(fresh, 0, self._len + 1)
            done = (terminated | truncated) & ~fresh
        else:
            self._ret = np.where(fresh, 0.0, self._ret) + r
            self._len = np.where(fresh, 0, self._len) + 1
            done = terminated | truncated
        self._prev_done = done
        if done.any():
            info["episode"] = {
                "r": np.where(done, self._ret, 0.0),
                "l": np.where(done, self._len, 0),
            }
            info["_episode"] = done
        if self.track_life_loss:
            lives = np.asarray(info["lives"])
            life_loss = lives < self._lives
            if self._next_step:
                life_loss &= ~fresh
            info["life_loss"] = life_loss
            self._lives = lives.copy()
        if r.dtype != np.float32:
            reward = r.astype(np.float32)
        return obs, reward, terminated, truncated, info
