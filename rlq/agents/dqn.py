"""DQN, Double DQN and Dueling DQN: one implementation with switches.

Papers
    Mnih et al. 2015, "Human-level control through deep reinforcement learning" (DQN, Nature CNN);
    van Hasselt et al. 2016, "Deep Reinforcement Learning with Double Q-learning" (``double``);
    Wang et al. 2016, "Dueling Network Architectures for Deep RL" (``dueling``).

Configs: ``configs/agent/dqn.yaml`` (double=false, dueling=false), ``double_dqn.yaml`` (double=true),
``dueling_dqn.yaml`` (double=true, dueling=true, as in Wang et al.). The top-level values are tuned
for classic control (CartPole solves within 50k env steps); the ``atari:`` block of each file replaces
them when the env is an Atari game (command-line ``agent.*`` overrides still win).

Classic-control defaults (top level of ``dqn.yaml``): Adam lr 1e-3, batch 64, replay 50k, 1k random
steps, one update every 2 env steps, hard target copy every 50 updates, epsilon 1.0 -> 0.05 over 10k
env steps, MLP 256-256, Huber loss, gradient-norm clip 10. The frequent target copies are what make
CartPole learn within 50k steps (with copies every 500 updates the Q-values need ~100k updates to
reach the ~100 that gamma = 0.99 implies); measured in experiments/results/cartpole_dqn.md.

Atari defaults (the ``atari:`` block) and deviations from the Nature paper
    - Adam (lr 1e-4, eps 1.5e-4) instead of RMSProp (lr 2.5e-4), as in Dopamine / CleanRL.
    - Huber loss on the TD error (the paper's "error clipping" to [-1, 1] is the same gradient),
      plus gradient-norm clipping at 10 (SB3's default; the paper has none).
    - Replay 1M transitions (frame-deduplicated, ~7 KB each), batch 32, update every 4 agent steps,
      learning starts after 80k agent steps (CleanRL; the paper uses 50k).
    - Target network copied every 250 updates (= 1000 agent steps at train_freq 4, CleanRL's setting;
      the paper copies every 10k agent steps). ``tau < 1`` switches to Polyak averaging every update.
    - epsilon decays linearly 1.0 -> 0.01 over the first 1M agent steps (paper: 1.0 -> 0.1 over 1M).
    - Rewards are clipped to [-1, 1] for learning (``env.clip_rewards``), raw returns are logged.
    - Dueling head: value and advantage streams are single linear layers on top of the shared 512-unit
      feature layer of the Nature CNN (Wang et al. give each stream its own 512-unit hidden layer;
      set ``head_hidden: 512`` with ``cnn_features: 0`` for that).

Rainbow (Hessel et al. 2018, ``configs/agent/rainbow.yaml``) is this agent with every switch on:
``double``, ``dueling``, ``noisy`` (NoisyNet heads, Fortunato et al. 2018), ``distributional`` (C51,
Bellemare et al. 2017), ``prioritized`` (proportional PER, Schaul et al. 2016) and ``n_step: 3``.
Atari values follow the paper: Adam lr 6.25e-5 / eps 1.5e-4, 51 atoms on [-10, 10], noisy sigma0 0.5,
PER alpha 0.5 with beta 0.4 -> 1 over the run and priority = the C51 cross-entropy, n = 3, target
copied every 8k agent steps (2000 updates), learning starts after 80k frames (20k agent steps),
update every 4 agent steps, batch 32, replay 1M, epsilon 0 (noisy nets explore). Architecture: the
Nature-CNN conv torso (``cnn_features: 0``) feeding noisy dueling value/advantage streams of 512
units each, as in the paper. Deviations: evaluation acts with the noisy layers' mean weights (no
noise; with ``env.eval_epsilon`` 0.001); new noise is drawn once per acting step (shared by the
vector envs) and once per update for the online and target nets. The CartPole preset (top level)
uses support [0, 100] (gamma = 0.99 keeps Q below 100), an MLP 256 with 128-unit noisy streams,
lr 1e-3, batch 64, target copy every 50 updates. Each switch can be turned off for ablations
(``agent.noisy=false`` brings epsilon-greedy back: 1.0 -> 0.05 over 10k steps).

n-step returns come from the replay buffer (``n_step``), whose batches carry the bootstrap factor
``discount = gamma^k`` (0 after a terminal), so the same target serves every n.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlq.agents.base import Agent, UpdateOut, acting_threads, amp_forward, register
from rlq.nets import DuelingHead, QHead, QNetwork, make_encoder
from rlq.nets.distributional import CategoricalHead, categorical_loss, categorical_projection, gather_actions
from rlq.nets.noisy import linear_factory, noise_disabled, reset_noise
from rlq.quant import copy_quant_state
from rlq.replay.base import Batch


def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
    """Linear interpolation from ``start`` to ``end`` over ``duration`` steps, then flat."""
    if duration <= 0:
        return end
    frac = min(max(step / duration, 0.0), 1.0)
    return start + frac * (end - start)


@register("dqn", "double_dqn", "dueling_dqn", "rainbow")
class DQNAgent(Agent):
    """Q-learning agent; switches: ``double``, ``dueling``, ``noisy``, ``distributional`` (C51), and,
    through the replay buffer, ``n_step`` and ``prioritized``. The module docstring gives Rainbow's
    settings."""

    acting_nets = ("online",)

    def __init__(self, cfg: Any, observation_space: gym.Space, action_space: gym.Space, device: str = "cpu",
                 seed: int = 0, quant: Any = None):
        super().__init__(cfg, observation_space, action_space, device, seed, quant)
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ValueError(f"agent {cfg.name!r} needs a discrete action space, got {action_space}; "
                             "use a continuous-control agent (e.g. sac) for this env")
        self.n_actions = int(action_space.n)
        # hyper-parameters read once: OmegaConf attribute access is slow on the acting/update path
        self.double = bool(cfg.double)
        self.noisy = bool(cfg.get("noisy", False))
        self.distributional = bool(cfg.get("distributional", False))
        self.eps_start, self.eps_end = float(cfg.eps_start), float(cfg.eps_end)
        self.eps_decay_steps = int(cfg.eps_decay_steps)
        self.tau, self.target_update_period = float(cfg.tau), int(cfg.target_update_period)
        self.max_grad_norm = float(cfg.max_grad_norm or 0.0)
        # agent.amp=bf16: the update's network forwards (and so their backward) run under bf16 autocast;
        # outputs are cast back to fp32 before targets and losses. Acting stays fp32 (batch-1 bf16 is slower).
        self.amp = str(cfg.get("amp", "none"))
        self.online = self.quantize(self.build_network().to(self.device))
        self.target = self.quantize(self.build_network().to(self.device))
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)
        # fused Adam: one pass over each parameter instead of foreach's several; on the Rainbow Pong net
        # (6.9M parameters, noisy dueling heads) an update takes 125 ms instead of 173 ms at 1 thread
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=float(cfg.lr), eps=float(cfg.adam_eps),
                                          fused=self.device.type in ("cpu", "cuda"))
        self._params = list(self.online.parameters())
        self.rng = np.random.default_rng(self.seed)
        self.step = 0
        self.updates = 0

    # -- networks ---------------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        cfg = self.cfg
        enc = make_encoder(cfg.encoder, self.observation_space.shape, self.observation_space.dtype,
                           hidden=tuple(cfg.hidden), cnn_features=int(cfg.cnn_features))
        hidden, sigma0 = int(cfg.head_hidden), float(cfg.get("sigma0", 0.5))
        if self.distributional:
            head: nn.Module = CategoricalHead(enc.out_dim, self.n_actions, int(cfg.atoms), float(cfg.v_min),
                                              float(cfg.v_max), dueling=bool(cfg.dueling), hidden=hidden,
                                              noisy=self.noisy, sigma0=sigma0)
        elif cfg.dueling:
            head = DuelingHead(enc.out_dim, self.n_actions, hidden, linear_factory(self.noisy, sigma0))
        else:
            head = QHead(enc.out_dim, self.n_actions, hidden, linear_factory(self.noisy, sigma0))
        return QNetwork(enc, head)

    def policy_net(self) -> nn.Module:
        return self.online

    # -- acting -------------------------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        return linear_schedule(self.eps_start, self.eps_end, self.eps_decay_steps, self.step)

    def set_step(self, step: int) -> None:
        self.step = step

    def schedule_metrics(self) -> dict[str, float]:
        return {"epsilon": self.epsilon}

    def greedy(self, obs: np.ndarray, noise: bool = False, net_name: str = "online") -> np.ndarray:
        """argmax_a Q(obs, a) of the ``net_name`` network (an :attr:`acting_nets` name); with noisy nets,
        ``noise=True`` acts with freshly sampled noise and ``noise=False`` with the mean weights (evaluation)."""
        net = self.acting_net(net_name)
        if noise:
            reset_noise(net)
        # mean weights unless acting with noise; nets without noisy layers skip the module walk
        mean_weights = noise_disabled(net) if self.noisy and not noise else nullcontext()
        # small acting batches on one thread (not in overlap mode: the learner thread shares the setting)
        few = acting_threads(len(obs)) if getattr(self, "_acting_copies", None) is None else nullcontext()
        with torch.inference_mode(), mean_weights, few:
            q = net.q_values(torch.as_tensor(obs, device=self.device))
        return q.argmax(dim=1).cpu().numpy()

    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        n = obs.shape[0]
        eps = self.epsilon if explore else 0.0
        if eps >= 1.0:  # warm-up: skip the forward pass entirely
            return self.rng.integers(self.n_actions, size=n)
        rand = self.rng.random(n) < eps if eps > 0.0 else None
        if rand is not None and rand.all():  # every env explores: no forward pass needed
            return self.rng.integers(self.n_actions, size=n)
        actions = self.greedy(obs, noise=explore and self.noisy)
        if rand is not None and rand.any():
            actions[rand] = self.rng.integers(self.n_actions, size=int(rand.sum()))
        return actions

    # -- learning -----------------------------------------------------------------------------------
    def _forward(self, net: nn.Module, obs: torch.Tensor, q_values: bool = False) -> torch.Tensor:
        """``net(obs)`` (or ``net.q_values(obs)``) in fp32; under bf16 autocast when ``agent.amp=bf16``."""
        return amp_forward(self.amp, self.device, net.q_values if q_values else net, obs)

    def _next_action(self, batch: Batch, target_out: torch.Tensor) -> torch.Tensor:
        """Greedy next action (B, 1): from the online net (Double DQN) or the target net's output."""
        if self.double:
            return self._forward(self.online, batch.next_obs, q_values=True).argmax(dim=1, keepdim=True)
        q = self.target.head.q_values(target_out) if self.distributional else target_out
        return q.argmax(dim=1, keepdim=True)

    def td_target(self, batch: Batch) -> torch.Tensor:
        """Scalar target ``r + discount * Q_target(s', a*)``."""
        with torch.no_grad():
            q_next_target = self._forward(self.target, batch.next_obs)
            q_next = q_next_target.gather(1, self._next_action(batch, q_next_target)).squeeze(1)
            return batch.reward + batch.discount * q_next

    def distributional_target(self, batch: Batch) -> torch.Tensor:
        """C51 target: the target net's distribution at a*, projected through ``r + discount * z``."""
        with torch.no_grad():
            next_log_p = self._forward(self.target, batch.next_obs)
            a_star = self._next_action(batch, next_log_p).squeeze(1)
            next_p = gather_actions(next_log_p, a_star).exp()
            return categorical_projection(next_p, batch.reward, batch.discount, self.online.head.support)

    def update(self, batch: Batch) -> UpdateOut:
        if self.noisy:  # fresh noise for this update, independent for online and target
            reset_noise(self.online)
            reset_noise(self.target)
        action = batch.action.long()
        if self.distributional:
            log_p = self._forward(self.online, batch.obs)
            log_p_a = gather_actions(log_p, action)
            per_sample = categorical_loss(log_p_a, self.distributional_target(batch))
            loss = (batch.weights * per_sample).mean()
            q = self.online.head.q_values(log_p.detach()).gather(1, action.unsqueeze(1)).squeeze(1)
            priority = per_sample.detach()
        else:
            q = self._forward(self.online, batch.obs).gather(1, action.unsqueeze(1)).squeeze(1)
            target = self.td_target(batch)
            loss = (batch.weights * F.smooth_l1_loss(q, target, reduction="none")).mean()
            priority = (target - q).detach().abs()
        value = self.optimizer_step(loss, self.optimizer, self._params, self.max_grad_norm)
        if not math.isfinite(value):  # nothing was applied: the trainer stops or skips this batch
            return UpdateOut(metrics={"loss": value})
        self.updates += 1
        self._update_target()
        return UpdateOut(
            metrics={"loss": value, "q_mean": q.detach().mean().item(), "priority": priority.mean().item()},
            priorities=priority.cpu().numpy(),
        )

    def _update_target(self) -> None:
        if self.tau >= 1.0:
            if self.updates % self.target_update_period == 0:
                self.target.load_state_dict(self.online.state_dict())
        else:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()), self.tau)
                if self._quant_nets:  # observer ranges and flags are copied, learned ranges averaged above
                    copy_quant_state(self.target, self.online)

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "updates": self.updates,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.updates = int(state["updates"])
        self.rng.bit_generator.state = state["rng"]
