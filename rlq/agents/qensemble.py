"""Q-ensemble DQN (``agent=qensemble``): N Q-networks with stacked weights, trained from one shared target.

Papers
    Anschel et al. 2017, "Averaged-DQN" / Osband-style ensembles (``target_reduction: mean``);
    Lan et al. 2020, "Maxmin Q-learning" (``min``: the minimum over all N members);
    Chen et al. 2021, "Randomized Ensembled Double Q-Learning" (REDQ, ``redq``: the minimum over a random
    subset of M members, drawn anew for every update; its update-to-data ratio is ``gradient_steps``).

The N networks are one :class:`rlq.nets.ensemble.EnsembleQNetwork` (MLP, or the Nature CNN on Atari as
one shared-input convolution followed by grouped ones): one batched call evaluates every member, there is
no Python loop over members. With ``Q̄_j`` the target copies and ``reduce`` the configured reduction::

    Q̄(s', a) = reduce_j Q̄_j(s', a)           (j over all N, or over the M sampled members for redq)
    y        = r + γ^n (1 - d) max_a Q̄(s', a)   (double: Q̄(s', argmax_a mean_i Q_i(s', a)))
    L        = Σ_i mean_batch Huber(Q_i(s, a) - y)

Every member regresses to the same target ``y`` (as in Maxmin and REDQ); the reduction is taken per action,
then the max over actions. Acting is epsilon-greedy on the **mean** Q over members (``q_values``); evaluation
is greedy on it, and ``rlq.export`` folds the mean-Q policy of an MLP ensemble into one network.

Deviations and choices
    - Each member's gradient is clipped to ``max_grad_norm`` on its own (a member is clipped as a single DQN
      would be; clipping the joint norm would tighten as N grows).
    - REDQ's subset is drawn from the agent's numpy generator (checkpointed, so resumes are exact); only the M
      sampled target members are evaluated.
    - ``agent.amp=bf16``: the update's member products (forward and backward) run in bf16 (AVX512-BF16 on
      this CPU runs them ~2x faster than fp32); parameters, gradients, Adam, targets and losses stay fp32,
      acting stays fp32. Opt-in, as for the DQN agents.
    - ``agent.native_step`` (with ``amp=bf16``, MLP members, CPU): the update's forwards, loss, backward and
      per-member clip run as one native call per update (:mod:`rlq.nets.native_ensemble`), with the same bf16
      products; Adam stays torch's. ``auto`` (default) uses it when the CPU has AVX512-BF16 and torch runs on
      one thread (the default for vector observations; the native step is single-threaded); ``true`` forces
      it (on a CPU without AVX512-BF16 its portable C path, slower than torch); ``false`` keeps the torch ops.
    - No dueling / noisy / distributional heads (the DQN switches); ``double`` is supported.
    - Atari (the ``atari:`` block) uses the DQN agent's Atari settings; an ensemble of N Nature CNNs costs
      about N times one DQN update.

Defaults (CartPole, top level of ``configs/agent/qensemble.yaml``): N = 5, REDQ target with M = 2, the DQN
preset otherwise (lr 1e-3, batch 64, update every 2 env steps, hard target copy every 50 updates).
"""
from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlq.agents.base import UpdateOut, amp_forward, register
from rlq.agents.dqn import DQNAgent
from rlq.nets.ensemble import EnsembleQNetwork, make_ensemble_encoder, per_member_clip_grad_norm_
from rlq.replay.base import Batch

REDUCTIONS = ("min", "mean", "redq")
NATIVE_STEP = ("auto", "true", "false")


def reduce_members(q: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce ``(k, ...)`` member values over dim 0: ``min`` (also REDQ, whose subset the caller selected) or
    ``mean``."""
    if reduction == "mean":
        return q.mean(0)
    if reduction in ("min", "redq"):
        return q.min(0).values
    raise ValueError(f"unknown target reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")


def check_ensemble_cfg(n: int, reduction: str, m: int, what: str = "agent.n_members") -> None:
    """The checks ``rlq.config.validate`` makes, for agents built directly (one-line ValueError)."""
    if n < 1:
        raise ValueError(f"{what}={n} is out of range: an ensemble needs >= 1 member")
    if reduction not in REDUCTIONS:
        raise ValueError(f"agent.target_reduction={reduction!r} is not a target reduction: choose one of "
                         f"{', '.join(REDUCTIONS)}")
    if reduction == "redq" and not 1 <= m <= n:
        raise ValueError(f"agent.redq_m={m} is out of range: REDQ's subset needs 1 <= redq_m <= {what}={n}")


@register("qensemble")
class QEnsembleAgent(DQNAgent):
    """N Q-networks, one shared target (module docstring). ``n_members``, ``target_reduction``, ``redq_m``."""

    def __init__(self, cfg: Any, observation_space: gym.Space, action_space: gym.Space, device: str = "cpu",
                 seed: int = 0, quant: Any = None):
        self.n_members = int(cfg.n_members)
        self.reduction = str(cfg.target_reduction)
        self.redq_m = int(cfg.get("redq_m", 2))
        check_ensemble_cfg(self.n_members, self.reduction, self.redq_m)
        for switch in ("dueling", "noisy", "distributional"):
            if cfg.get(switch, False):
                raise ValueError(f"agent.{switch}=true is not supported by qensemble: use agent=dqn / rainbow for it")
        super().__init__(cfg, observation_space, action_space, device, seed, quant)
        self._native, self._native_forced = self._make_native_step(cfg.get("native_step", "auto"))

    def _make_native_step(self, mode: Any) -> tuple[Any, bool]:
        """``(NativeEnsembleStep or None, forced)`` for ``agent.native_step`` (module docstring)."""
        from rlq.nets import native_ensemble as ne
        mode = {True: "true", False: "false"}.get(mode, str(mode).lower())
        if mode not in NATIVE_STEP:
            raise ValueError(f"agent.native_step={mode!r} is not a choice: use one of {', '.join(NATIVE_STEP)}")
        if mode == "false":
            return None, False
        layers = ne.ensemble_linears(self.online)
        why = ("it needs agent.amp=bf16" if self.amp != "bf16" else
               f"it runs on the CPU, not {self.device.type}" if self.device.type != "cpu" else
               "it needs MLP members (encoder=mlp, no fake-quant layers)" if layers is None else
               f"the native library is unavailable: {ne.status()}" if ne.lib() is None else "")
        if mode == "auto" and (why or "avx512bf16" not in ne.available_isas()):
            return None, False
        if why:
            raise ValueError(f"agent.native_step=true cannot be used: {why}")
        self._native_chains = {id(self.online): layers, id(self.target): ne.ensemble_linears(self.target)}
        return ne.NativeEnsembleStep(layers), mode == "true"

    def _native_active(self) -> bool:
        return self._native is not None and (self._native_forced or torch.get_num_threads() == 1)

    def build_network(self) -> nn.Module:
        cfg = self.cfg
        enc = make_ensemble_encoder(self.n_members, str(cfg.encoder), self.observation_space.shape,
                                    hidden=tuple(cfg.hidden), cnn_features=int(cfg.cnn_features))
        return EnsembleQNetwork(enc, self.n_actions, int(cfg.head_hidden))

    # -- learning -----------------------------------------------------------------------------------
    def target_members(self) -> torch.Tensor | None:
        """The target members this update reduces over: all (None), or REDQ's random subset of M."""
        if self.reduction != "redq" or self.redq_m == self.n_members:
            return None
        idx = np.sort(self.rng.choice(self.n_members, size=self.redq_m, replace=False))
        return torch.as_tensor(idx, device=self.device)

    def _members_forward(self, net: nn.Module, obs: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """``net(obs, members)`` -> (k, B, A) in fp32; its products in bf16 when ``agent.amp=bf16`` (a forward
        without gradients through the native step when it is active)."""
        if not torch.is_grad_enabled() and self._native_active():
            return self._native.forward(self._native_chains[id(net)], obs, members)
        return amp_forward(self.amp, self.device, net, obs, members)

    def td_target(self, batch: Batch) -> torch.Tensor:
        """``r + discount * max_a reduce_j Q̄_j(s', a)`` (Double: at the online mean's argmax), shape (B,)."""
        with torch.no_grad():
            q_next = reduce_members(self._members_forward(self.target, batch.next_obs, self.target_members()),
                                    self.reduction)  # (B, A)
            if self.double:
                a_star = self._members_forward(self.online, batch.next_obs).mean(0).argmax(1, keepdim=True)
                v_next = q_next.gather(1, a_star).squeeze(1)
            else:
                v_next = q_next.max(1).values
            return batch.reward + batch.discount * v_next

    def update(self, batch: Batch) -> UpdateOut:
        if self._native_active():
            return self._native_update(batch)
        action = batch.action.long()
        q_all = self._members_forward(self.online, batch.obs)  # (n, B, A)
        n, b = q_all.shape[0], q_all.shape[1]
        q = q_all.gather(2, action.view(1, b, 1).expand(n, b, 1)).squeeze(2)  # (n, B)
        target = self.td_target(batch)
        per = F.smooth_l1_loss(q, target.expand(n, b), reduction="none")
        loss = (batch.weights * per).mean(1).sum()
        priority = (target - q.detach()).abs().mean(0)
        return self._finish_update(self._ensemble_step(loss), q.detach(), priority)

    def _native_update(self, batch: Batch) -> UpdateOut:
        """The update of :meth:`update` with forward, loss, backward and clip in one native call."""
        target = self.td_target(batch)
        q, losses, norms = self._native.step(self._native_chains[id(self.online)], batch.obs, batch.action, target,
                                             batch.weights, self.max_grad_norm)
        value = float(losses.sum())
        if math.isfinite(value) and not torch.isfinite(norms).all():
            value = math.nan
        if math.isfinite(value):
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return self._finish_update(value, q, (target - q).abs().mean(0))

    def _finish_update(self, value: float, q_d: torch.Tensor, priority: torch.Tensor) -> UpdateOut:
        if not math.isfinite(value):  # nothing was applied: the trainer stops or skips this batch
            return UpdateOut(metrics={"loss": value})
        self.updates += 1
        self._update_target()
        n = q_d.shape[0]
        return UpdateOut(metrics={"loss": value, "q_mean": q_d.mean().item(),
                                  "q_member_std": q_d.std(0).mean().item() if n > 1 else 0.0,
                                  "priority": priority.mean().item()},
                         priorities=priority.cpu().numpy())

    def _ensemble_step(self, loss: torch.Tensor) -> float:
        """As :meth:`Agent.optimizer_step`, with each member's gradient clipped on its own."""
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            return value
        loss.backward()
        norms = per_member_clip_grad_norm_(self._params, self.n_members,
                                           self.max_grad_norm if self.max_grad_norm > 0 else math.inf)
        if not torch.isfinite(norms).all():
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan
        self.optimizer.step()
        return value
