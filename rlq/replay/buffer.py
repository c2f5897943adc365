"""The replay buffer: one row per vector step, n-step returns computed at sample time.

Layout. Time-major arrays of ``rows = capacity // num_envs`` rows x ``num_envs`` columns with one
shared write cursor; the flat index of slot ``(row, env)`` is ``row * num_envs + env``. Slot ``(t, e)``
stores the action, reward (float32, as passed: already clipped if clipping is on), ``terminated``,
``episode_end`` and ``reset`` flags of transition ``t`` of env ``e``, and the observation data of its
**next_obs** (the storage decides how: :class:`ArrayStorage` or :class:`FrameStorage`). The obs of
transition ``t`` is the next_obs stored at slot ``t - 1``, so each observation is stored once.

Autoreset. The buffer follows Gymnasium 1.x NEXT_STEP autoreset: the step after an ``episode_end`` of
env ``e`` is a *reset step* (obs = final obs, next_obs = the new episode's reset obs, reward 0); its
slot gets ``reset=True`` and stores the reset observation, and it is never sampled. ``episode_end``
defaults to ``terminated | truncated``; a trainer that treats life losses as terminal passes
``terminated=True, episode_end=False`` for them (no bootstrap, but frames and episode continue).

Pseudo-rows. The first :meth:`ReplayBuffer.add` (and the first after :meth:`load_state_dict`, since the
trainer resets its envs on resume) first writes a pseudo-row holding ``obs`` as next_obs data with
``reset=True`` (never sampled), then the real row. On resume the last row written before the
checkpoint is marked ``episode_end`` (the stream was cut there, which is a truncation: n-step windows
stop there and bootstrap from its next_obs).

Sampleable transitions. ``(t, e)`` is sampleable iff slot ``t`` is written, ``reset[t, e]`` is False,
the slots it reads are still in the buffer (when the buffer has wrapped, the oldest ``lookback`` rows
are excluded: ``frame_stack`` rows for frame storage, 1 row for array storage, because their obs lives
in an overwritten slot), and its n-step window is complete: the newest ``n_step - 1`` rows are always
excluded (even when their window would already end at an episode end; simpler, and they become
sampleable a few steps later).

n-step returns. For a sampled ``(t, e)``: walk ``k = 1..n``, ``reward = sum_{i<k} gamma^i r_{t+i}``,
stopping at the first step ``t+i`` that is ``terminated`` or ``episode_end`` (its reward included).
``discount = 0`` if that last step was terminated, else ``gamma^k`` (truncation bootstraps from the
final obs). ``next_obs`` is the next_obs stored at the last included slot.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlq.replay.base import Batch
from rlq.replay.samplers import Sampler, UniformSampler
from rlq.replay.storage import ArrayStorage, FrameStorage, ObsStorage, _as_numpy

_STATE_VERSION = 1


class ReplayBuffer:
    """Vector-env replay buffer with frame deduplication, n-step returns and pluggable samplers.

    Args:
        capacity: number of transitions (slots); rounded down to a multiple of ``num_envs``
            (``self.capacity`` is the rounded value).
        num_envs: envs of the vector env; every ``add`` writes one slot per env.
        obs_shape, obs_dtype: single-env observation shape and dtype.
        action_shape, action_dtype: single-env action shape and dtype. Integer actions are stored as
            int32 and returned as int64; float actions stored and returned as float32.
        n_step, gamma: n-step return settings (applied at sample time).
        frame_stack: 0 stores full observations (:class:`ArrayStorage`); ``k > 0`` stores one frame per
            slot and rebuilds ``(k, H, W)`` uint8 stacks (:class:`FrameStorage`, ``obs_shape[0] == k``).
        sampler: a :class:`Sampler`; default :class:`UniformSampler` seeded with ``seed``.
        seed: seed of the default sampler.
    """

    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: Any,
                 action_shape: tuple[int, ...] = (), action_dtype: Any = np.int64, n_step: int = 1,
                 gamma: float = 0.99, frame_stack: int = 0, sampler: Sampler | None = None, seed: int = 0):
        self._num_envs = int(num_envs)
        if self._num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self._rows = int(capacity) // self._num_envs
        self.n_step = int(n_step)
        if self.n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {n_step}")
        self.gamma = float(gamma)
        self.frame_stack = int(frame_stack)
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.storage: ObsStorage
        if self.frame_stack > 0:
            if not self.obs_shape or self.obs_shape[0] != self.frame_stack:
                raise ValueError(f"frame_stack={self.frame_stack} but obs_shape is {self.obs_shape}: "
                                 "the stack must be the first dimension")
            self.storage = FrameStorage(self._rows, self._num_envs, self.obs_shape, obs_dtype)
        else:
            self.storage = ArrayStorage(self._rows, self._num_envs, self.obs_shape, obs_dtype)
        min_rows = self.storage.lookback + self.n_step + 1
        if self._rows < min_rows:
            raise ValueError(f"capacity {capacity} gives {self._rows} rows for {num_envs} envs; "
                             f"at least {min_rows} rows ({min_rows * self._num_envs} transitions) are needed")
        self.obs_dtype = self.storage.obs_dtype
        self.action_shape = tuple(int(s) for s in action_shape)
        self._discrete = np.issubdtype(np.dtype(action_dtype), np.integer)
        self._action_store = np.dtype(np.int32 if self._discrete else np.float32)
        self._action_out = np.dtype(np.int64 if self._discrete else np.float32)

        shape = (self._rows, self._num_envs)
        self._action = np.zeros(shape + self.action_shape, dtype=self._action_store)
        self._reward = np.zeros(shape, dtype=np.float32)
        self._terminated = np.zeros(shape, dtype=bool)
        self._episode_end = np.zeros(shape, dtype=bool)
        self._reset = np.zeros(shape, dtype=bool)
        self._t = 0                  # rows ever written (pseudo-rows included); next row = _t % rows
        self._needs_pseudo = True    # first add (and first after load) writes a pseudo-row first
        self.sampler: Sampler = sampler if sampler is not None else UniformSampler(seed)

    # ------------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int:
        """Number of slots: ``rows * num_envs``."""
        return self._rows * self._num_envs

    @property
    def num_envs(self) -> int:
        return self._num_envs

    @property
    def rows(self) -> int:
        return self._rows

    def __len__(self) -> int:
        """Slots written (rows written, pseudo-rows and reset steps included, x num_envs), capped at capacity.

        This counts stored slots, not sampleable transitions (see :meth:`valid_indices`).
        """
        return min(self._t, self._rows) * self._num_envs

    @property
    def nbytes(self) -> int:
        """Total bytes allocated (observations and metadata)."""
        meta = (self._action, self._reward, self._terminated, self._episode_end, self._reset)
        return self.storage.nbytes + sum(int(a.nbytes) for a in meta)

    @property
    def bytes_per_transition(self) -> float:
        return self.nbytes / self.capacity

    # ------------------------------------------------------------------ writing
    def add(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, terminated: np.ndarray,
            truncated: np.ndarray, next_obs: np.ndarray, episode_end: np.ndarray | None = None) -> None:
        """Add one vector step (leading dim ``num_envs`` everywhere).

        ``obs`` is only read on the first add (and the first after :meth:`load_state_dict`), where it
        becomes the pseudo-row; afterwards the obs of a transition is the previous row's next_obs.
        ``episode_end`` defaults to ``terminated | truncated``.
        """
        E = self._num_envs
        next_obs = self._check_obs(next_obs, "next_obs")
        action = np.asarray(action)
        if action.shape != (E, *self.action_shape):
            raise ValueError(f"action has shape {action.shape}, expected {(E, *self.action_shape)}")
        reward = self._check_flat(reward, np.float32, "reward")
        terminated = self._check_flat(terminated, bool, "terminated")
        truncated = self._check_flat(truncated, bool, "truncated")
        if episode_end is None:
            episode_end = terminated | truncated
        else:
            episode_end = self._check_flat(episode_end, bool, "episode_end")

        pseudo = self._needs_pseudo
        if pseudo:
            obs = self._check_obs(obs, "obs")
            self.storage.check(obs, np.ones(E, dtype=bool))
            reset = np.zeros(E, dtype=bool)  # the pseudo-row is no episode end
        else:
            reset = self._episode_end[(self._t - 1) % self._rows].copy()
        self.storage.check(next_obs, reset)  # validate everything before writing anything

        written = []
        if pseudo:
            if self._t > 0:  # resume: the stream was cut after the last row, a truncation
                self._episode_end[(self._t - 1) % self._rows] = True
            no = np.zeros(E, dtype=bool)
            written.append(self._write_row(obs, np.zeros_like(action), np.zeros(E, np.float32), no, no,
                                           np.ones(E, dtype=bool)))
            self._needs_pseudo = False
        written.append(self._write_row(next_obs, action, reward, terminated, episode_end, reset))
        self.sampler.on_add(np.concatenate(written))

    def continue_stream(self) -> None:
        """After :meth:`load_state_dict`: the envs continue exactly where the saved stream was cut (an exact
        resume replayed them to that state), so the next :meth:`add` follows the last row with no pseudo-row."""
        if self._t > 0:
            self._needs_pseudo = False

    def _write_row(self, next_obs: np.ndarray, action: np.ndarray, reward: np.ndarray, terminated: np.ndarray,
                   episode_end: np.ndarray, reset: np.ndarray) -> np.ndarray:
        row = self._t % self._rows
        self.storage.write(row, next_obs)
        self._action[row] = action
        self._reward[row] = reward
        self._terminated[row] = terminated
        self._episode_end[row] = episode_end
        self._reset[row] = reset
        self._t += 1
        return row * self._num_envs + np.arange(self._num_envs, dtype=np.int64)

    def _check_obs(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.shape != (self._num_envs, *self.obs_shape):
            raise ValueError(f"{name} has shape {x.shape}, expected {(self._num_envs, *self.obs_shape)}")
        return x

    def _check_flat(self, x: np.ndarray, dtype: Any, name: str) -> np.ndarray:
        x = np.asarray(x, dtype=dtype)
        if x.shape != (self._num_envs,):
            raise ValueError(f"{name} has shape {x.shape}, expected ({self._num_envs},)")
        return x

    # ------------------------------------------------------------------ validity
    def _bounds(self) -> tuple[int, int]:
        """Inclusive range ``[lo, hi]`` of absolute row times that may hold sampleable transitions."""
        t = self._t
        lo = 1 if t <= self._rows else t - self._rows + self.storage.lookback
        return lo, t - self.n_step

    def sample_window(self) -> tuple[int, int]:
        """``(start_row, count)``: rows ``(start_row + j) % rows`` for ``j < count`` are the only rows that
        may hold sampleable transitions (all are, except reset slots)."""
        lo, hi = self._bounds()
        return lo % self._rows, max(0, hi - lo + 1)

    def valid_mask(self, idx: np.ndarray) -> np.ndarray:
        """Vectorized sampleability of flat indices (see the module docstring)."""
        idx = np.asarray(idx, dtype=np.int64)
        inside = (idx >= 0) & (idx < self.capacity)
        safe = np.where(inside, idx, 0)
        row, env = np.divmod(safe, self._num_envs)
        last = self._t - 1
        abs_t = last - (last - row) % self._rows  # the latest write time of that row (< 0: never written)
        lo, hi = self._bounds()
        return inside & (abs_t >= lo) & (abs_t <= hi) & ~self._reset[row, env]

    def valid_indices(self) -> np.ndarray:
        """All sampleable flat indices, oldest row first (O(capacity); for tests and debugging)."""
        start, count = self.sample_window()
        window = (((start + np.arange(count)) % self._rows)[:, None] * self._num_envs
                  + np.arange(self._num_envs)).ravel()
        return window[self.valid_mask(window)]

    # ------------------------------------------------------------------ reading
    def sample(self, batch_size: int) -> Batch:
        """Draw ``batch_size`` transitions with the sampler and gather them."""
        idx, weights = self.sampler.sample(batch_size, self)
        return self.gather(idx, weights)

    def gather(self, idx: np.ndarray, weights: np.ndarray | None = None) -> Batch:
        """The n-step transitions at flat indices ``idx`` (assumed valid, see :meth:`valid_mask`)."""
        idx = np.asarray(idx, dtype=np.int64)
        row, env = np.divmod(idx, self._num_envs)

        ret = np.zeros(idx.shape, dtype=np.float64)
        steps = np.zeros(idx.shape, dtype=np.int64)
        last = row.copy()
        last_terminated = np.zeros(idx.shape, dtype=bool)
        active = np.ones(idx.shape, dtype=bool)
        for i in range(self.n_step):
            r = (row + i) % self._rows
            ret += np.where(active, self.gamma ** i * self._reward[r, env], 0.0)
            steps += active
            last = np.where(active, r, last)
            terminated = self._terminated[r, env]
            last_terminated = np.where(active, terminated, last_terminated)
            active &= ~(terminated | self._episode_end[r, env])
        discount = np.where(last_terminated, 0.0, self.gamma ** steps).astype(np.float32)
        # obs ends at row - 1, next_obs at the last included row. One gather for both: a single large
        # allocation is several times faster than two (fewer page faults); obs and next_obs are two
        # contiguous halves of it.
        both = self.storage.observations(np.concatenate([row - 1, last]), np.concatenate([env, env]), self._reset)
        obs, next_obs = both[: idx.shape[0]], both[idx.shape[0]:]

        if weights is None:
            weights = np.ones(idx.shape, dtype=np.float32)
        return Batch(
            obs=torch.from_numpy(obs),
            action=torch.from_numpy(self._action[row, env].astype(self._action_out, copy=False)),
            reward=torch.from_numpy(ret.astype(np.float32)),
            discount=torch.from_numpy(discount),
            next_obs=torch.from_numpy(next_obs),
            idx=torch.from_numpy(idx.copy()),
            weights=torch.from_numpy(np.asarray(weights, dtype=np.float32)),
        )

    def update_priorities(self, idx: np.ndarray | torch.Tensor, priorities: np.ndarray | torch.Tensor) -> None:
        """Forward new priorities to the sampler (accepts numpy arrays or tensors)."""
        self.sampler.update_priorities(_numpy(idx).astype(np.int64, copy=False), _numpy(priorities))

    # ------------------------------------------------------------------ checkpointing
    def _config(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "num_envs": self._num_envs, "obs_shape": list(self.obs_shape),
                "obs_dtype": str(self.obs_dtype), "action_shape": list(self.action_shape),
                "action_dtype": str(self._action_store), "frame_stack": self.frame_stack}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the buffer: tensors, ints, strings, lists and dicts only
        (loadable with ``torch.load(weights_only=True)``). The tensors share memory with the buffer:
        save the dict before the next :meth:`add`. ``n_step``/``gamma`` are recorded but a loading
        buffer keeps its own (they only act at sample time)."""
        n = min(self._t, self._rows)
        arrays = {"action": self._action, "reward": self._reward, "terminated": self._terminated,
                  "episode_end": self._episode_end, "reset": self._reset}
        return {"version": _STATE_VERSION, **self._config(), "n_step": self.n_step, "gamma": self.gamma,
                "t": self._t, **{k: torch.from_numpy(v[:n]) for k, v in arrays.items()},
                "storage": self.storage.state_dict(n), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly; the next :meth:`add` starts with a pseudo-row (the trainer resets its envs).

        Raises ValueError if capacity, num_envs, shapes, dtypes or frame_stack differ.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"replay state version is {state.get('version')} in the checkpoint but "
                             f"{_STATE_VERSION} in this buffer (not a replay buffer state?)")
        for key, mine in self._config().items():
            theirs = state.get(key)
            if theirs != mine:
                raise ValueError(
                    f"replay state mismatch: {key} is {theirs} in the checkpoint but {mine} in this buffer")
        t = int(state["t"])
        n = min(t, self._rows)
        for name in ("action", "reward", "terminated", "episode_end", "reset"):
            arr = getattr(self, "_" + name)
            arr[:n] = _as_numpy(state[name], arr.dtype, (n, *arr.shape[1:]), name)
        self.storage.load_state_dict(state["storage"], n)
        self.sampler.load_state_dict(state["sampler"])
        self._t = t
        self._needs_pseudo = True


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
