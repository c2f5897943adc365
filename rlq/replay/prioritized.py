"""Proportional prioritized experience replay (Schaul et al. 2016), as a :class:`~rlq.replay.samplers.Sampler`.

:class:`SumTree` holds one leaf per flat buffer slot (``row * num_envs + env``) in a power-of-two array
layout (``tree[1]`` is the root, node ``i`` has children ``2i`` and ``2i + 1``, leaves are
``tree[size + j]``). All operations are batched: an update sets a batch of leaves and recomputes their
ancestors level by level; a prefix-sum search descends all targets level by level at once. Parents are
always recomputed as ``left + right`` from their (final) children, never patched with deltas, so the
tree never drifts and a batched update gives bit-identical arrays to the same updates done one by one.

:class:`PrioritizedSampler` semantics:

* **What the tree stores.** Leaves hold ``(p + eps) ** alpha`` where ``p`` is the raw priority given to
  :meth:`PrioritizedSampler.update_priorities` (``|TD error|`` or a per-sample loss, >= 0). Sampling
  probability is ``P(i) = leaf_i / total``.
* **New transitions** (:meth:`PrioritizedSampler.on_add`) get ``max_priority ** alpha``, where
  ``max_priority`` is the largest ``p + eps`` ever given (initially 1.0; it never decreases).
* **Invalid slots.** Every written slot gets a priority, including reset steps, pseudo-rows, the newest
  ``n_step - 1`` rows and (after wraparound) the oldest ``lookback`` rows, because validity is not known
  at add time and changes as the buffer fills and wraps (a slot in the newest rows becomes sampleable a
  few steps later). Draws that land on a slot for which ``buffer.valid_mask`` is False are redrawn
  from the whole tree (not from their stratum), in vectorized rounds. Redrawing from the whole
  distribution keeps the expected count of every valid slot exactly proportional to its priority
  (``B * p_i / total_valid``); invalid slots only waste a few draws.
* **Stratified sampling.** The total mass is cut into ``batch_size`` equal segments and one target is
  drawn uniformly in each.
* **Importance weights.** ``w_i = (N * P(i)) ** -beta / max_j w_j`` with the max taken over the batch
  (as Dopamine and most PER implementations do). ``N`` is the number of slots ever written (stored
  leaves, capped at ``capacity``). With batch-max normalization ``N`` and ``total`` cancel exactly:
  ``w_i = (leaf_i / min_j leaf_j) ** -beta``, so whether ``N`` counts stored or valid slots (or ``P``
  is normalized over all or only valid slots) does not change the weights.
* **beta.** By default annealed linearly from ``beta0`` to 1 over ``beta_steps`` calls of :meth:`sample`.
  A trainer that prefers to anneal over env steps calls :meth:`set_progress` (fraction of training
  done) or :meth:`set_beta` / assigns :attr:`beta`; from then on the explicit value is used and the
  call counter no longer matters.
* **Stale updates.** ``update_priorities`` trusts its indices: an index overwritten between sampling
  and the update (only possible with asynchronous actors) gets the new priority anyway.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlq.replay.samplers import SampleSource

_STATE_VERSION = 1


class SumTree:
    """Batched sum-tree over ``capacity`` leaves (float64, power-of-two layout, root at index 1)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.size = 1 << max(0, (self.capacity - 1).bit_length())  # leaves, a power of two >= capacity
        self.depth = self.size.bit_length() - 1                      # levels below the root
        self.tree = np.zeros(2 * self.size, dtype=np.float64)
        self._shifts = np.arange(1, self.depth + 1, dtype=np.int64)[:, None]

    @property
    def total(self) -> float:
        return float(self.tree[1])

    @property
    def leaves(self) -> np.ndarray:
        """View of the ``capacity`` leaf values."""
        return self.tree[self.size:self.size + self.capacity]

    def get(self, idx: np.ndarray) -> np.ndarray:
        return self.tree[self.size + np.asarray(idx, dtype=np.int64)]

    def update(self, idx: np.ndarray, values: np.ndarray) -> None:
        """Set leaves ``idx`` to ``values`` (vectorized; with duplicate indices the last write wins)."""
        idx = np.asarray(idx, dtype=np.int64).ravel()
        values = np.asarray(values, dtype=np.float64)
        values = np.full(idx.shape, values) if values.ndim == 0 else values.ravel()
        if values.shape != idx.shape:
            raise ValueError(f"SumTree.update: {idx.size} indices but {values.size} values")
        if idx.size == 0:
            return
        if idx.size > 1:
            # numpy leaves the winner of repeated fancy-index writes undefined: keep each index's last value.
            order = np.argsort(idx, kind="stable")
            srt = idx[order]
            last = np.empty(srt.shape, dtype=bool)
            last[-1] = True
            np.not_equal(srt[1:], srt[:-1], out=last[:-1])
            keep = order[last]
            idx, values = idx[keep], values[keep]
        tree = self.tree
        leaf = idx + self.size
        tree[leaf] = values
        if idx.size * self.depth >= self.size:  # large batch: one O(size) pass is cheaper, same sums
            self.rebuild()
            return
        # Ancestors of every leaf, one row per level (bottom-up), computed at once; then one pass per level.
        # Duplicate parents are harmless: each gets the same (final) sum of its children.
        parents = leaf >> self._shifts
        left = parents << 1
        for p, lft, rgt in zip(parents, left, left + 1):
            tree[p] = tree[lft] + tree[rgt]

    def rebuild(self) -> None:
        """Recompute every internal node from the leaves (the same sums :meth:`update` maintains)."""
        tree, n = self.tree, self.size
        while n > 1:
            tree[n // 2:n] = tree[n:2 * n:2] + tree[n + 1:2 * n:2]
            n //= 2

    def find(self, targets: np.ndarray) -> np.ndarray:
        """Leaf index ``i`` with ``cumsum[i-1] <= t < cumsum[i]`` for each target (vectorized descent).

        Always returns a leaf with positive value (requires ``total > 0``): a target that reaches a
        zero-mass leaf (``t >= total`` or float rounding next to trailing zero leaves) is redone with a
        descent that never enters a zero-mass subtree, which returns the last positive leaf for
        ``t >= total``.
        """
        t = np.array(targets, dtype=np.float64).ravel()
        t0 = t.copy()
        node = np.ones(t.shape, dtype=np.int64)
        tree = self.tree
        for _ in range(self.depth):
            node += node               # left child
            left = tree[node]
            go_right = t >= left
            left *= go_right
            t -= left
            node += go_right
        zero = tree[node] <= 0
        if zero.any():
            node[zero] = self._find_guarded(t0[zero])
        return node - self.size

    def _find_guarded(self, t: np.ndarray) -> np.ndarray:
        node = np.ones(t.shape, dtype=np.int64)
        tree = self.tree
        for _ in range(self.depth):
            left_node = node << 1
            left = tree[left_node]
            go_right = (t >= left) & (tree[left_node + 1] > 0)
            t = t - np.where(go_right, left, 0.0)
            node = left_node + go_right
        return node


class PrioritizedSampler:
    """Proportional prioritized sampling with importance weights (see the module docstring).

    Args:
        capacity: number of flat slots; at least the buffer's ``capacity`` (``rows * num_envs``).
        alpha: priority exponent; the tree stores ``(p + eps) ** alpha``. Rainbow: 0.5.
        beta0: initial importance-sampling exponent (Rainbow: 0.4), annealed linearly to 1.
        beta_steps: number of :meth:`sample` calls over which beta reaches 1 (unless set explicitly
            with :meth:`set_beta` / :meth:`set_progress`).
        eps: added to every raw priority so no transition has zero probability.
        seed: numpy RNG seed.
        max_rounds: rejection rounds before falling back to enumerating the valid slots.
    """

    def __init__(self, capacity: int, alpha: float = 0.5, beta0: float = 0.4, beta_steps: int = 1_000_000,
                 eps: float = 1e-6, seed: int = 0, max_rounds: int = 32):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not 0.0 <= beta0 <= 1.0:
            raise ValueError(f"beta0 must be in [0, 1], got {beta0}")
        if beta_steps < 1:
            raise ValueError(f"beta_steps must be >= 1, got {beta_steps}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.tree = SumTree(capacity)
        self.capacity = self.tree.capacity
        self.alpha = float(alpha)
        self.beta0 = float(beta0)
        self.beta_steps = int(beta_steps)
        self.eps = float(eps)
        self.max_rounds = int(max_rounds)
        self.rng = np.random.default_rng(seed)
        self.max_priority = 1.0            # max raw (p + eps) seen; new slots get max_priority ** alpha
        self.sample_calls = 0
        self._beta: float | None = None    # explicit beta (set_beta / set_progress); None: anneal by calls
        self._stored = np.zeros(self.capacity, dtype=bool)
        self._num_stored = 0

    # ------------------------------------------------------------------ beta
    @property
    def beta(self) -> float:
        if self._beta is not None:
            return self._beta
        frac = min(1.0, self.sample_calls / self.beta_steps)
        return self.beta0 + (1.0 - self.beta0) * frac

    @beta.setter
    def beta(self, value: float) -> None:
        self.set_beta(value)

    def set_beta(self, beta: float) -> None:
        """Use this beta from now on (disables the per-call annealing)."""
        beta = float(beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self._beta = beta

    def set_progress(self, fraction: float) -> None:
        """Set beta to ``beta0 + (1 - beta0) * fraction`` (fraction of training done, clipped to [0, 1])."""
        frac = min(1.0, max(0.0, float(fraction)))
        self._beta = self.beta0 + (1.0 - self.beta0) * frac

    # ------------------------------------------------------------------ sizes
    @property
    def num_stored(self) -> int:
        """Slots ever written (the ``N`` of the importance weights)."""
        return self._num_stored

    @property
    def total(self) -> float:
        return self.tree.total

    def priorities(self, idx: np.ndarray) -> np.ndarray:
        """Stored leaf values ``(p + eps) ** alpha`` at ``idx``."""
        return self.tree.get(self._check_idx(idx, "idx"))

    # ------------------------------------------------------------------ Sampler protocol
    def on_add(self, idx: np.ndarray) -> None:
        idx = self._check_idx(idx, "on_add idx")
        self.tree.update(idx, self.max_priority ** self.alpha)
        if self._num_stored < self.capacity:
            fresh = idx[~self._stored[idx]]
            if fresh.size:
                fresh = np.unique(fresh)
                self._stored[fresh] = True
                self._num_stored += int(fresh.size)

    def update_priorities(self, idx: np.ndarray | torch.Tensor, priorities: np.ndarray | torch.Tensor) -> None:
        """Set raw priorities ``p`` (``|TD|`` or loss, >= 0) for ``idx``; the tree stores ``(p + eps) ** alpha``."""
        idx = self._check_idx(idx, "update_priorities idx")
        p = _numpy(priorities).astype(np.float64, copy=False).ravel()
        if p.shape != idx.shape:
            raise ValueError(f"update_priorities: {idx.size} indices but {p.size} priorities")
        if p.size == 0:
            return
        if not np.isfinite(p).all() or (p < 0).any():
            bad = p[~(np.isfinite(p) & (p >= 0))]
            raise ValueError(f"update_priorities: priorities must be finite and >= 0, got {bad[:5].tolist()}")
        p = p + self.eps
        self.max_priority = max(self.max_priority, float(p.max()))
        self.tree.update(idx, p ** self.alpha)

    def sample(self, batch_size: int, buffer: SampleSource) -> tuple[np.ndarray, np.ndarray]:
        if buffer.capacity > self.capacity:
            raise ValueError(f"PrioritizedSampler capacity {self.capacity} is smaller than the buffer's "
                             f"{buffer.capacity}")
        batch_size = int(batch_size)
        total = self.tree.total
        if buffer.sample_window()[1] <= 0 or not total > 0:
            raise ValueError("cannot sample: the replay buffer holds no sampleable transition yet")
        # Stratified: one uniform target in each of batch_size equal segments of the total mass.
        targets = (np.arange(batch_size) + self.rng.random(batch_size)) * (total / batch_size)
        idx = self.tree.find(targets)
        bad = np.flatnonzero(~buffer.valid_mask(idx))
        for _ in range(self.max_rounds):
            if bad.size == 0:
                break
            # Redraw invalid draws from the whole distribution (not their stratum): unbiased, see docstring.
            idx[bad] = self.tree.find(self.rng.random(bad.size) * total)
            bad = bad[~buffer.valid_mask(idx[bad])]
        if bad.size:
            idx[bad] = self._fallback(bad.size, buffer)
        leaf = self.tree.get(idx)
        prob = leaf / total
        w = (max(self._num_stored, 1) * prob) ** -self.beta
        w /= w.max()
        self.sample_calls += 1
        return idx, w.astype(np.float32)

    def _fallback(self, n: int, buffer: SampleSource) -> np.ndarray:
        """Draw ``n`` slots exactly proportionally among the enumerated valid slots of the window."""
        start, count = buffer.sample_window()
        num_envs, rows = buffer.num_envs, buffer.rows
        window = (((start + np.arange(count)) % rows)[:, None] * num_envs + np.arange(num_envs)).ravel()
        valid = window[buffer.valid_mask(window)]
        mass = np.cumsum(self.tree.get(valid))
        if valid.size == 0 or not mass[-1] > 0:  # short-circuit: mass[-1] only read when non-empty
            raise ValueError("cannot sample: the replay buffer holds no sampleable transition yet")
        pick = np.searchsorted(mass, self.rng.random(n) * mass[-1], side="right")
        return valid[np.minimum(pick, valid.size - 1)]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain types only (``torch.load(weights_only=True)``); copies, safe to keep."""
        return {"version": _STATE_VERSION, "capacity": self.capacity, "alpha": self.alpha, "eps": self.eps,
                "leaves": torch.from_numpy(self.tree.leaves.copy()),
                "stored": torch.from_numpy(self._stored.copy()),
                "max_priority": self.max_priority, "sample_calls": self.sample_calls,
                "beta": -1.0 if self._beta is None else self._beta,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly. Raises ValueError if capacity, alpha or eps differ (the leaves depend on them);
        ``beta0``/``beta_steps`` stay this sampler's own."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"prioritized sampler state version is {state.get('version')}, expected "
                             f"{_STATE_VERSION} (not a PrioritizedSampler state?)")
        for key in ("capacity", "alpha", "eps"):
            if state[key] != getattr(self, key):
                raise ValueError(f"prioritized sampler state mismatch: {key} is {state[key]} in the checkpoint "
                                 f"but {getattr(self, key)} in this sampler")
        leaves = _numpy(state["leaves"]).astype(np.float64, copy=False)
        stored = _numpy(state["stored"]).astype(bool, copy=False)
        if leaves.shape != (self.capacity,) or stored.shape != (self.capacity,):
            raise ValueError(f"prioritized sampler state has {leaves.shape} leaves, expected ({self.capacity},)")
        self.tree.tree[:] = 0.0
        self.tree.leaves[:] = leaves
        self.tree.rebuild()
        self._stored[:] = stored
        self._num_stored = int(stored.sum())
        self.max_priority = float(state["max_priority"])
        self.sample_calls = int(state["sample_calls"])
        beta = float(state["beta"])
        self._beta = None if beta < 0 else beta
        self.rng.bit_generator.state = state["rng"]

    # ------------------------------------------------------------------ helpers
    def _check_idx(self, idx: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
        idx = _numpy(idx)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"{what}: indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.capacity):
            raise ValueError(f"{what}: indices must be in [0, {self.capacity}), got min {idx.min()} "
                             f"max {idx.max()}")
        return idx


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
