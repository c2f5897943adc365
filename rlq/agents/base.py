"""The Agent interface and the agent registry.

An agent knows nothing about environments, files or time: the trainer hands it observations and
batches, and tells it the current exploration rate through ``act(..., explore=True)`` / ``set_step``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rlq.replay.base import Batch


@dataclass
class UpdateOut:
    """What one gradient update reports: scalar metrics for logging and, for prioritized replay,
    the new priority of each sampled transition (``None`` otherwise)."""

    metrics: dict[str, float] = field(default_factory=dict)
    priorities: np.ndarray | None = None


class Agent(ABC):
    """Base class of every agent.

    Subclasses are built with ``Agent(cfg, observation_space, action_space, device, seed)`` where
    ``cfg`` is the agent's config node (``configs/agent/<name>.yaml``), the spaces are the single-env
    spaces and ``seed`` seeds the agent's own random streams (exploration).
    """

    name: str = "agent"

    def __init__(self, cfg: Any, observation_space: gym.Space, action_space: gym.Space, device: str = "cpu",
                 seed: int = 0):
        self.cfg = cfg
        self.observation_space = observation_space
        self.action_space = action_space
        self.device = torch.device(device)
        self.seed = int(seed)

    @abstractmethod
    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        """Actions for a batch of observations (leading dim = num_envs)."""

    @abstractmethod
    def update(self, batch: Batch) -> UpdateOut:
        """One gradient update from a sampled batch."""

    @abstractmethod
    def policy_net(self) -> nn.Module:
        """The network used for acting: what gets quantized and exported."""

    def set_step(self, step: int) -> None:
        """Called by the trainer with the global env step before acting (for schedules)."""

    def on_update_round(self, update_count: int) -> None:
        """Called by the trainer after every update (for schedules that count updates)."""

    def schedule_metrics(self) -> dict[str, float]:
        """Scalars of the agent's schedules (e.g. ``epsilon``) for logging."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: networks, optimizers, counters (tensors and plain Python)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


_REGISTRY: dict[str, Callable[..., Agent]] = {}


def register(*names: str) -> Callable[[type[Agent]], type[Agent]]:
    """Class decorator: ``@register("dqn", "double_dqn")`` makes the agent buildable by
    ``make_agent`` under each name (the config's switches, not the name, select the variant)."""

    def deco(cls: type[Agent]) -> type[Agent]:
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"agent {name!r} registered twice")
            _REGISTRY[name] = cls
        cls.name = names[0]
        return cls

    return deco


def agent_names() -> list[str]:
    return sorted(_REGISTRY)


def make_agent(cfg: Any, observation_space: gym.Space, action_space: gym.Space, device: str = "cpu",
               seed: int = 0) -> Agent:
    """Build the agent named ``cfg.name``; an unknown name lists the known ones."""
    name = cfg.name
    if name not in _REGISTRY:
        raise ValueError(f"unknown agent name {name!r}: choose one of {', '.join(agent_names())}")
    return _REGISTRY[name](cfg, observation_space, action_space, device=device, seed=seed)
