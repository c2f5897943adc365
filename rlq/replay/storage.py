"""Observation storages for :class:`rlq.replay.ReplayBuffer`.

Both storages share the buffer's layout: ``rows`` time-major rows x ``num_envs`` columns, one slot per
(vector step, env). A slot holds the observation data of the transition's **next_obs**; the obs of
transition ``t`` is the next_obs stored at slot ``t - 1`` of the same env, so every observation is
stored once. The buffer owns the write cursor and the per-slot metadata (action, reward, flags); a
storage only stores and rebuilds observations, given the buffer's ``reset`` flags (``reset[t, e]`` is
True iff slot ``(t, e)`` holds the first observation of an episode).

* :class:`ArrayStorage` keeps the whole next_obs per slot (any dtype and shape): vector observations.
* :class:`FrameStorage` keeps one ``H x W`` uint8 frame per slot and rebuilds ``(stack, H, W)`` frame
  stacks by index (Atari): about 7 KB per transition instead of 56 KB.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch


class ObsStorage(Protocol):
    """What the buffer needs from an observation storage."""

    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    #: rows of history an observation reads: a transition at row ``t`` needs slots ``t - lookback .. t-1``.
    lookback: int

    @property
    def nbytes(self) -> int: ...

    def check(self, next_obs: np.ndarray, reset: np.ndarray) -> None: ...

    def write(self, row: int, next_obs: np.ndarray) -> None: ...

    def observations(self, end_rows: np.ndarray, envs: np.ndarray, reset: np.ndarray) -> np.ndarray: ...

    def state_dict(self, rows_written: int) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], rows_written: int) -> None: ...


class ArrayStorage:
    """Stores the full next_obs of every slot: ``data[row, env] = next_obs[env]``.

    Works for any observation dtype and shape. The observation whose data ends at row ``r`` is simply
    ``data[r, env]``.
    """

    lookback = 1

    def __init__(self, rows: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: Any):
        self.rows = int(rows)
        self.num_envs = int(num_envs)
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.obs_dtype = np.dtype(obs_dtype)
        self.data = np.zeros((self.rows, self.num_envs, *self.obs_shape), dtype=self.obs_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for observations."""
        return int(self.data.nbytes)

    def check(self, next_obs: np.ndarray, reset: np.ndarray) -> None:
        """Nothing to validate beyond the shape, which the buffer checks."""

    def write(self, row: int, next_obs: np.ndarray) -> None:
        """Store one row (``num_envs`` next observations) at ``row``."""
        self.data[row] = next_obs

    def observations(self, end_rows: np.ndarray, envs: np.ndarray, reset: np.ndarray) -> np.ndarray:
        """Observations whose data ends at rows ``end_rows`` (taken modulo ``rows``) of envs ``envs``.

        Returns a freshly gathered ``(B, *obs_shape)`` array. ``reset`` is unused here.
        """
        return self.data[end_rows % self.rows, envs]

    def state_dict(self, rows_written: int) -> dict[str, Any]:
        """The first ``rows_written`` rows as a tensor (shares memory with the storage)."""
        return {"data": torch.from_numpy(self.data[:rows_written])}

    def load_state_dict(self, state: dict[str, Any], rows_written: int) -> None:
        data = _as_numpy(state["data"], self.data.dtype, (rows_written, *self.data.shape[1:]), "data")
        self.data[:rows_written] = data


class FrameStorage:
    """Frame-deduplicated storage for zero-padded frame stacks (Atari through ale-py's vector env).

    Observations are ``(stack, H, W)`` uint8 stacks following ALE's convention: a reset observation is
    ``[0, ..., 0, f0]`` and every step shifts one new frame in, so stacks are zero-padded before an
    episode's first frame. Each slot stores only the newest frame of its next_obs (``next_obs[-1]``).
    The stack whose newest frame is at row ``r`` is rebuilt from the frames at rows ``r-stack+1 .. r``
    of the same env; every frame that lies before the episode's first slot (the latest slot ``<= r``
    with ``reset=True``, which holds the reset frame ``f0``) is replaced by zeros. Frames continue
    across life losses, which are not episode ends.

    Reset rows are validated cheaply: their leading ``stack - 1`` frames must be zero, otherwise the
    environment does not zero-pad and :class:`ArrayStorage` must be used instead.
    """

    def __init__(self, rows: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: Any = np.uint8):
        obs_shape = tuple(int(s) for s in obs_shape)
        if len(obs_shape) != 3:
            raise ValueError(f"FrameStorage needs (stack, H, W) observations, got obs_shape {obs_shape}")
        if np.dtype(obs_dtype) != np.uint8:
            raise ValueError(f"FrameStorage needs uint8 observations, got {np.dtype(obs_dtype)}")
        self.rows = int(rows)
        self.num_envs = int(num_envs)
        self.obs_shape = obs_shape
        self.obs_dtype = np.dtype(np.uint8)
        self.stack = obs_shape[0]
        self.lookback = self.stack
        self.frames = np.zeros((self.rows, self.num_envs, *obs_shape[1:]), dtype=np.uint8)
        self._offsets = np.arange(-(self.stack - 1), 1, dtype=np.int64)  # -(stack-1) .. 0

    @property
    def nbytes(self) -> int:
        """Bytes allocated for frames."""
        return int(self.frames.nbytes)

    def check(self, next_obs: np.ndarray, reset: np.ndarray) -> None:
        """Raise ValueError if a reset observation is not zero-padded (``[0, ..., 0, f0]``)."""
        if self.stack > 1 and reset.any() and next_obs[reset, :-1].any():
            envs = np.flatnonzero(reset)[next_obs[reset, :-1].reshape(int(reset.sum()), -1).any(axis=1)]
            raise ValueError(
                f"FrameStorage: the reset observation of env(s) {envs.tolist()} is not zero-padded (its first "
                f"{self.stack - 1} frames are not all zero); this environment does not follow ALE's "
                "[0, ..., 0, f0] stacking convention: use ArrayStorage (frame_stack=0) instead")

    def write(self, row: int, next_obs: np.ndarray) -> None:
        """Store the newest frame of each env's next_obs at ``row``."""
        self.frames[row] = next_obs[:, -1]

    def observations(self, end_rows: np.ndarray, envs: np.ndarray, reset: np.ndarray) -> np.ndarray:
        """Rebuild the stacks whose newest frame is at rows ``end_rows`` (modulo ``rows``) of ``envs``.

        Frame ``j`` of a stack (row ``end - stack + 1 + j``) is zeroed iff some later row of the stack
        (``end - stack + 2 + j .. end``) is a reset row, i.e. the frame belongs to an earlier episode (or
        to a row never written: row 0 is always a reset row). Returns a fresh ``(B, stack, H, W)`` array.
        """
        slots = (np.asarray(end_rows, dtype=np.int64)[:, None] + self._offsets) % self.rows  # (B, stack)
        cols = np.asarray(envs, dtype=np.int64)[:, None]
        out = self.frames[slots, cols]  # (B, stack, H, W), a fresh array
        if self.stack > 1:
            later_reset = reset[slots[:, 1:], cols]  # reset of the row after frame j, j < stack - 1
            # zero[j] = any(later_reset[:, j:]): a reversed cumulative OR.
            zero = np.logical_or.accumulate(later_reset[:, ::-1], axis=1)[:, ::-1]
            out[:, :-1][zero] = 0
        return out

    def state_dict(self, rows_written: int) -> dict[str, Any]:
        """The first ``rows_written`` rows of frames as a tensor (shares memory with the storage)."""
        return {"frames": torch.from_numpy(self.frames[:rows_written])}

    def load_state_dict(self, state: dict[str, Any], rows_written: int) -> None:
        frames = _as_numpy(state["frames"], self.frames.dtype, (rows_written, *self.frames.shape[1:]), "frames")
        self.frames[:rows_written] = frames


def _as_numpy(value: Any, dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A checkpointed tensor as a numpy array of the expected dtype and shape (ValueError otherwise)."""
    arr = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.shape != tuple(shape):
        raise ValueError(
            f"replay state: '{name}' has shape {arr.shape} in the checkpoint but {tuple(shape)} is expected")
    if arr.dtype != dtype:
        raise ValueError(f"replay state: '{name}' has dtype {arr.dtype} in the checkpoint but {dtype} is expected")
    return arr
