"""Samplers: which stored transitions a batch draws, and with which importance weights.

A sampler never touches storage. It sees the buffer only through :class:`SampleSource` (sizes, the
window of rows that may hold sampleable transitions, and a vectorized validity check), so a
prioritized sampler (sum-tree over the ``capacity`` flat indices) plugs in by implementing
:class:`Sampler`: it gets ``on_add`` with every flat index written and ``update_priorities`` from
the trainer, and rejects draws for which ``buffer.valid_mask`` is False (reset steps, incomplete
n-step windows, slots whose history was overwritten).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


class SampleSource(Protocol):
    """The part of the buffer a sampler may use. Flat index = ``row * num_envs + env``."""

    @property
    def capacity(self) -> int: ...

    @property
    def num_envs(self) -> int: ...

    @property
    def rows(self) -> int: ...

    def sample_window(self) -> tuple[int, int]: ...

    def valid_mask(self, idx: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Sampler(Protocol):
    """Chooses flat indices to sample and their importance-sampling weights."""

    def sample(self, batch_size: int, buffer: SampleSource) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(idx int64 (B,), weights float32 (B,))``; every idx must satisfy ``buffer.valid_mask``."""
        ...

    def on_add(self, idx: np.ndarray) -> None:
        """Called by the buffer with the flat indices it has just (over)written."""
        ...

    def update_priorities(self, idx: np.ndarray, priorities: np.ndarray) -> None:
        """New priorities for previously sampled indices (no-op for uniform sampling)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class UniformSampler:
    """Uniform sampling over the sampleable transitions, with importance weights 1.

    Vectorized rejection sampling: draw ``(row, env)`` uniformly from the buffer's sample window,
    redraw the invalid draws (reset steps) in rounds. Since each round draws uniformly from the same
    window, the accepted draws are uniform over the valid transitions. After ``max_rounds`` rounds the
    remaining draws are taken directly from the enumerated valid set (same distribution; only matters
    in pathological buffers where nearly every candidate is a reset step).
    """

    def __init__(self, seed: int = 0, max_rounds: int = 32):
        self.rng = np.random.default_rng(seed)
        self.max_rounds = int(max_rounds)

    def sample(self, batch_size: int, buffer: SampleSource) -> tuple[np.ndarray, np.ndarray]:
        start, count = buffer.sample_window()
        num_envs, rows = buffer.num_envs, buffer.rows
        if count <= 0:
            raise ValueError("cannot sample: the replay buffer holds no sampleable transition yet")
        idx = np.empty(batch_size, dtype=np.int64)
        todo = np.arange(batch_size)
        for _ in range(self.max_rounds):
            u = self.rng.integers(0, count * num_envs, size=todo.size)
            cand = ((start + u // num_envs) % rows) * num_envs + u % num_envs
            ok = buffer.valid_mask(cand)
            idx[todo[ok]] = cand[ok]
            todo = todo[~ok]
            if todo.size == 0:
                return idx, np.ones(batch_size, dtype=np.float32)
        # Fallback: enumerate the window's valid transitions once and draw from them.
        window = ((start + np.arange(count)) % rows)[:, None] * num_envs + np.arange(num_envs)
        window = window.ravel()
        valid = window[buffer.valid_mask(window)]
        if valid.size == 0:
            raise ValueError("cannot sample: the replay buffer holds no sampleable transition yet")
        idx[todo] = valid[self.rng.integers(0, valid.size, size=todo.size)]
        return idx, np.ones(batch_size, dtype=np.float32)

    def on_add(self, idx: np.ndarray) -> None:
        """Uniform sampling keeps no per-index state."""

    def update_priorities(self, idx: np.ndarray, priorities: np.ndarray) -> None:
        """Uniform sampling ignores priorities."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
