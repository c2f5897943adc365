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
      set ``dueling_hidden: 512`` for that).

n-step returns come from the replay buffer (``n_step``), whose batches carry the bootstrap factor
``discount = gamma^k`` (0 after a terminal), so the same target serves every n.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlq.agents.base import Agent, UpdateOut, register
from rlq.nets import DuelingHead, QHead, QNetwork, make_encoder
from rlq.replay.base import Batch


def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
    """Linear interpolation from ``start`` to ``end`` over ``duration`` steps, then flat."""
    if duration <= 0:
        return end
    frac = min(max(step / duration, 0.0), 1.0)
    return start + frac * (end - start)


@register("dqn", "double_dqn", "dueling_dqn")
class DQNAgent(Agent):
    """ε-greedy Q-learning agent with optional Double-Q targets and a dueling head."""

    def __init__(self, cfg: Any, observation_space: gym.Space, action_space: gym.Space, device: str = "cpu"):
        super().__init__(cfg, observation_space, action_space, device)
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ValueError(f"agent {cfg.name!r} needs a discrete action space, got {action_space}; "
                             "use a continuous-control agent (e.g. sac) for this env")
        self.n_actions = int(action_space.n)
        # hyper-parameters read once: OmegaConf attribute access is slow on the acting/update path
        self.double = bool(cfg.double)
        self.eps_start, self.eps_end = float(cfg.eps_start), float(cfg.eps_end)
        self.eps_decay_steps = int(cfg.eps_decay_steps)
        self.tau, self.target_update_period = float(cfg.tau), int(cfg.target_update_period)
        self.max_grad_norm = float(cfg.max_grad_norm or 0.0)
        self.online = self.build_network().to(self.device)
        self.target = self.build_network().to(self.device)
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=float(cfg.lr), eps=float(cfg.adam_eps),
                                          foreach=True)
        self.rng = np.random.default_rng(int(cfg.get("seed", 0)))
        self.step = 0
        self.updates = 0

    # -- networks ---------------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        cfg = self.cfg
        enc = make_encoder(cfg.encoder, self.observation_space.shape, self.observation_space.dtype,
                           hidden=tuple(cfg.hidden), cnn_features=int(cfg.cnn_features))
        if cfg.dueling:
            head: nn.Module = DuelingHead(enc.out_dim, self.n_actions, int(cfg.dueling_hidden))
        else:
            head = QHead(enc.out_dim, self.n_actions)
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

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            q = self.online(torch.as_tensor(obs, device=self.device))
        return q.argmax(dim=1).cpu().numpy()

    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        n = obs.shape[0]
        eps = self.epsilon if explore else 0.0
        if eps >= 1.0:  # warm-up: skip the forward pass entirely
            return self.rng.integers(self.n_actions, size=n)
        actions = self.greedy(obs)
        if eps > 0.0:
            rand = self.rng.random(n) < eps
            if rand.any():
                actions[rand] = self.rng.integers(self.n_actions, size=int(rand.sum()))
        return actions

    # -- learning -----------------------------------------------------------------------------------
    def td_target(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            q_next_target = self.target(batch.next_obs)
            if self.double:
                a_star = self.online(batch.next_obs).argmax(dim=1, keepdim=True)
            else:
                a_star = q_next_target.argmax(dim=1, keepdim=True)
            q_next = q_next_target.gather(1, a_star).squeeze(1)
            return batch.reward + batch.discount * q_next

    def update(self, batch: Batch) -> UpdateOut:
        q = self.online(batch.obs).gather(1, batch.action.long().unsqueeze(1)).squeeze(1)
        target = self.td_target(batch)
        td = target - q
        loss = (batch.weights * F.smooth_l1_loss(q, target, reduction="none")).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.online.parameters(), self.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.updates += 1
        self._update_target()
        td_abs = td.detach().abs()
        return UpdateOut(
            metrics={"loss": loss.item(), "q_mean": q.detach().mean().item(), "td_abs": td_abs.mean().item()},
            priorities=td_abs.cpu().numpy(),
        )

    def _update_target(self) -> None:
        if self.tau >= 1.0:
            if self.updates % self.target_update_period == 0:
                self.target.load_state_dict(self.online.state_dict())
        else:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()), self.tau)

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
