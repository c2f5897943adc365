"""Shared replay types: the Batch every buffer returns and the interface agents and the trainer rely on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


@dataclass
class Batch:
    """A sampled batch of (possibly n-step) transitions, as torch tensors.

    ``reward`` is the discounted n-step return ``sum_{i<k} gamma^i r_{t+i}`` and ``discount`` the
    factor to apply to the bootstrap value: ``gamma^k`` when the last step was not terminal (a
    truncated episode bootstraps), ``0`` when it was. A one-step target is therefore always
    ``reward + discount * V(next_obs)``, whatever ``n_step`` is.
    """

    obs: torch.Tensor          # (B, *obs_shape), dtype of the observation space (uint8 for Atari)
    action: torch.Tensor       # (B,) int64 for discrete actions, (B, act_dim) float32 otherwise
    reward: torch.Tensor       # (B,) float32
    discount: torch.Tensor     # (B,) float32
    next_obs: torch.Tensor     # (B, *obs_shape)
    idx: torch.Tensor          # (B,) int64 flat storage indices (for priority updates)
    weights: torch.Tensor      # (B,) float32 importance-sampling weights (ones for uniform)


class ReplayBuffer(Protocol):
    def add(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, terminated: np.ndarray,
            truncated: np.ndarray, next_obs: np.ndarray, episode_end: np.ndarray | None = None) -> None: ...

    def sample(self, batch_size: int) -> Batch: ...

    def update_priorities(self, idx: np.ndarray, priorities: np.ndarray) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
