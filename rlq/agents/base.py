"""The Agent interface and the agent registry.

An agent knows nothing about environments, files or time: the trainer hands it observations and
batches, and tells it the current exploration rate through ``act(..., explore=True)`` / ``set_step``.
"""
from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rlq.quant import QuantConfig, is_quantized, quantize_, set_quant_enabled
from rlq.replay.base import Batch


#: acting batches up to this size run their forward pass on one torch thread (see :func:`acting_threads`)
SMALL_BATCH = 16


def amp_forward(amp: str, device: torch.device, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)`` in fp32; with ``agent.amp=bf16`` under bf16 autocast, its output cast back to fp32 (the
    agents' update forwards: targets, losses and everything after them stay fp32)."""
    if amp == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(*args).float()
    return fn(*args)


@contextmanager
def acting_threads(batch: int) -> Iterator[None]:
    """Run a small acting batch (``batch <= SMALL_BATCH``, e.g. one row per env) on a single torch thread.

    When the other core is busy (another run of a sweep, an env thread, the overlap learner) torch's
    intra-op threads wait on each other at every layer: a batch-10 Nature-CNN forward took 6.5 ms on 2 threads
    against 2.8 ms on 1 (and 22-124 ms against 3-5 ms on a more loaded machine). With the other core idle, 2
    threads are faster at batch 10 (1.6 against 2.6 ms) and equal at batch 1, so a dedicated machine pays
    ~1 ms per vector step of 10 envs for never hitting the slow case (experiments/results/bench_update.md).
    The update keeps every thread. Setting the count costs ~0.1 us.
    """
    threads = torch.get_num_threads()
    if threads == 1 or batch > SMALL_BATCH:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class UpdateOut:
    """What one gradient update reports: scalar metrics for logging and, for prioritized replay,
    the new priority of each sampled transition (``None`` otherwise)."""

    metrics: dict[str, float] = field(default_factory=dict)
    priorities: np.ndarray | None = None


class Agent(ABC):
    """Base class of every agent.

    Subclasses are built with ``Agent(cfg, observation_space, action_space, device, seed, quant)`` where
    ``cfg`` is the agent's config node (``configs/agent/<name>.yaml``), the spaces are the single-env
    spaces, ``seed`` seeds the agent's own random streams (exploration) and ``quant`` is the run's
    ``quant:`` config. A subclass passes every network it trains through :meth:`quantize` right after
    building it (before its optimizers); the trainer calls :meth:`start_quantization` at
    ``quant.start_step``.

    With the trainer's ``overlap=true``, ``update`` (and ``on_update_round``) run in a worker thread while
    ``act`` and ``set_step`` go on in the loop: ``act`` must read only :meth:`acting_net` copies and state
    that ``update`` does not write, and ``update`` nothing that ``act`` / ``set_step`` write. Agents that
    declare :attr:`acting_nets` promise this.
    """

    name: str = "agent"
    #: attribute names of the networks ``act`` reads. The trainer's overlap mode (``overlap=true``) runs
    #: ``update`` in a worker thread while the env keeps stepping; ``act`` then reads private copies of these
    #: networks (:meth:`use_acting_copies`), refreshed between updates (:meth:`sync_acting_copies`).
    acting_nets: tuple[str, ...] = ()

    def __init__(self, cfg: Any, observation_space: gym.Space, action_space: gym.Space, device: str = "cpu",
                 seed: int = 0, quant: Any = None):
        self.cfg = cfg
        self.observation_space = observation_space
        self.action_space = action_space
        self.device = torch.device(device)
        self.seed = int(seed)
        self.quant = QuantConfig.from_cfg(quant)
        self._quant_nets: list[nn.Module] = []

    # -- quantization ---------------------------------------------------------------------------------
    def example_obs(self, batch: int = 2) -> torch.Tensor:
        """A batch of observations sampled from the observation space (for tracing a network)."""
        obs = np.stack([self.observation_space.sample() for _ in range(batch)])
        return torch.as_tensor(obs, device=self.device)

    def quantize(self, net: nn.Module, example_inputs: Any = None) -> nn.Module:
        """Convert ``net`` in place to fake-quant layers for QAT (a no-op for ``quant=none``); the
        online and target copies of a network both go through here so they stay consistent.
        ``example_inputs`` defaults to a batch of observations (pass ``(obs, action)`` for critics)."""
        if self.quant.enabled:
            pixels = np.dtype(self.observation_space.dtype) == np.uint8 and len(self.observation_space.shape) == 3
            quantize_(net, self.quant, self.example_obs() if example_inputs is None else example_inputs,
                      pixel_input=pixels)
            self._quant_nets.append(net)
        return net

    @property
    def quant_active(self) -> bool:
        """Whether fake quantization is on (after ``quant.start_step``)."""
        return any(is_quantized(net) for net in self._quant_nets)

    def start_quantization(self) -> None:
        """Switch fake quantization on in every network given to :meth:`quantize` (idempotent)."""
        for net in self._quant_nets:
            set_quant_enabled(net, True)

    def optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                       max_grad_norm: float = 0.0) -> float:
        """``backward`` + gradient clipping (``max_grad_norm > 0``) + ``optimizer.step()``, except when the
        loss or the gradient norm is NaN/inf: then the parameters and optimizer state stay untouched and
        the returned loss is non-finite (the trainer stops, or skips the batch with ``nonfinite=skip``).
        Returns the loss as a float."""
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            return value
        loss.backward()
        norm = nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf, foreach=True)
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            return math.nan
        optimizer.step()
        return value

    # -- acting while an update runs (the trainer's overlap mode) --------------------------------------
    def use_acting_copies(self) -> None:
        """Make :meth:`acting_net` return frozen copies of the :attr:`acting_nets`, so that ``act`` never reads
        weights an optimizer is changing in another thread. The copies are exact until the next update;
        :meth:`sync_acting_copies` brings them up to date (the trainer calls it after each update round)."""
        if not self.acting_nets:
            raise NotImplementedError(f"agent {self.name!r} does not support overlap=true (no acting_nets)")
        self._acting_copies = {name: copy.deepcopy(getattr(self, name)).requires_grad_(False)
                               for name in self.acting_nets}

    def sync_acting_copies(self) -> None:
        """Copy the current weights (and quantizer / noise state) into the acting copies, if any."""
        for name, net in getattr(self, "_acting_copies", {}).items():
            net.load_state_dict(getattr(self, name).state_dict())

    def acting_net(self, name: str) -> nn.Module:
        """The network ``act`` should read for attribute ``name``: its acting copy in overlap mode, else itself."""
        copies = getattr(self, "_acting_copies", None)
        return copies[name] if copies else getattr(self, name)

    @contextmanager
    def acting_originals(self) -> Iterator[None]:
        """Within this block ``act`` reads the trained networks themselves (evaluation in overlap mode)."""
        copies = getattr(self, "_acting_copies", None)
        self._acting_copies = None
        try:
            yield
        finally:
            self._acting_copies = copies

    def acting_state(self) -> dict[str, Any]:
        """The acting copies' state (checkpoints of overlap-mode runs, for an exact resume)."""
        return {name: net.state_dict() for name, net in (getattr(self, "_acting_copies", None) or {}).items()}

    def load_acting_state(self, state: dict[str, Any]) -> None:
        for name, net in (getattr(self, "_acting_copies", None) or {}).items():
            if name in state:
                net.load_state_dict(state[name])

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


def agent_class(name: str) -> type[Agent]:
    """The class registered under ``name`` (``KeyError`` if none)."""
    return _REGISTRY[name]


def make_agent(cfg: Any, observation_space: gym.Space, action_space: gym.Space, device: str = "cpu",
               seed: int = 0, quant: Any = None) -> Agent:
    """Build the agent named ``cfg.name`` (with the run's ``quant`` config, if any); an unknown name
    lists the known ones."""
    name = cfg.name
    if name not in _REGISTRY:
        raise ValueError(f"unknown agent name {name!r}: choose one of {', '.join(agent_names())}")
    if quant is None:
        return _REGISTRY[name](cfg, observation_space, action_space, device=device, seed=seed)
    return _REGISTRY[name](cfg, observation_space, action_space, device=device, seed=seed, quant=quant)
