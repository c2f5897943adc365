"""Maximum-entropy actor-critics: SAC (continuous), SAC for discrete actions, and DSAC-T / DSAC (v1).

**SAC** (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications"), ``agent=sac``:
a tanh-squashed Gaussian actor, twin Q critics with Polyak-averaged targets, and a temperature α tuned
toward a target entropy (default ``-|A|``). With ``a' ~ π(·|s')`` and ``ℓ' = log π(a'|s')``::

    y        = r + γ^n (1 - d) (min_i Q̄_i(s', a') - α ℓ')
    L_Q      = Σ_i mean (Q_i(s, a) - y)^2
    L_π      = mean (α log π(ã|s) - min_i Q_i(s, ã)),   ã ~ π(·|s) (reparameterised)
    L_α      = mean (log α · (-log π(ã|s) - H̄))         (α grows when the entropy is below H̄)

**Critic ensembles** (``agent.n_critics``, ``agent.target_reduction``): SAC's critics are one vectorized
:class:`EnsembleCritic` of N members (stacked weights, one batched call; N = 2 is the twin critics above, built
from two ``Critic`` initialisations exactly as before). ``target_reduction`` replaces the ``min_i`` of the target:

- ``min`` over all N: SAC (N = 2) and SAC-N (An et al. 2021, "Uncertainty-Based Offline RL with Diversified
  Q-Ensemble"; LB-SAC, Nikulin et al. 2022, is SAC-N with a large batch and a square-root-scaled learning rate,
  ``configs/agent/lb_sac.yaml``). The actor maximises the min over all N too.
- ``redq``: REDQ (Chen et al. 2021): the min over a random subset of ``redq_m`` target critics, drawn anew for
  every update (only those M are evaluated); the actor's loss uses the **mean** over all N critics, and the
  update-to-data ratio is ``gradient_steps`` (the paper: N = 10, M = 2, 20 updates per env step with
  ``policy_delay`` 20, i.e. one actor update per env step; ``configs/agent/redq.yaml``).
- ``mean``: the ensemble average in the target and in the actor's loss (REDQ's ``q_target_mode: ave``).

Every critic regresses to the same target; the loss is summed over critics (``Σ_i mean (Q_i - y)^2``, as above).
DSAC keeps its own twin (v1: single) distributional critics.

**EauDeQN critics** (``agent=eaudesac``: SAC with ``critic_sparsity: eaudeqn``; Vincent et al. 2025, see
``rlq/agents/eaudeqn.py``): ``n_networks`` sets of the N critics above, stacked in one ensemble of K·N members
(one batched call), all regressing to the same target; every ``select_every`` updates the set with the smallest
summed loss becomes set 0 and the others its magnitude-pruned copies at higher sparsity
(:class:`rlq.agents.eaudeqn.EauDeCritics`, where our choices are listed). The actor and the Polyak-averaged
target critics follow set 0; the actor stays dense (``policy_net()``, what is exported), the critics' sparsity
is logged (``critic_sparsity``). Not with DSAC or QAT.

The log-probability of a squashed action ``a = tanh(u)`` is ``log N(u; μ, σ) - Σ log(1 - tanh(u)^2)``,
computed as ``2 (log 2 - u - softplus(-2u))`` (stable for large ``|u|``). Actions are scaled from
``[-1, 1]`` to the env's Box bounds; the critics see the ``[-1, 1]`` actions.

**Discrete SAC** (Christodoulou 2019), ``agent=sac_discrete``: a categorical policy and critics that output
``Q(s, ·)`` for every action, so expectations over actions are exact sums::

    y   = r + γ^n (1 - d) Σ_a π(a|s') (min_i Q̄_i(s', a) - α log π(a|s'))
    L_π = mean Σ_a π(a|s) (α log π(a|s) - min_i Q_i(s, a))
    L_α = mean log α · (H(π(·|s)) - H̄),   H̄ = target_entropy_scale · log |A|

It uses the DQN family's encoders (MLP, or the Nature CNN for pixels), so it runs on CartPole and Atari.

**DSAC-T** (Duan et al., "Distributional Soft Actor-Critic with Three Refinements"), ``agent=dsac``: each
critic is a Gaussian return distribution ``Z_i(s, a) = N(Q_i, σ_i^2)`` (``σ = softplus``). With the target
policy π̄ (Polyak-averaged like the critics) and a sample ``Q̂ = Q + clamp(ε, -3, 3) σ``, ``ε ~ N(0, 1)``:

- *expected value substituting*: the mean is trained toward ``y = r + γ (1 - d)(min_i Q̄_i(s', a') - α ℓ')``;
- *twin value distribution learning*: ``min`` over the two target means, and the sample of the critic
  with the smaller mean gives ``y_s = r + γ (1 - d)(Q̂_j(s', a') - α ℓ')``;
- *variance-based critic gradient adjusting*: ``σ̄_i`` is an exponential average (rate ``tau_b``) of the
  batch-mean σ_i; the sampled target is bounded, ``y_b = Q_i + clamp(y_s - Q_i, -3 σ̄_i, 3 σ̄_i)``, and::

      ω_i = clamp(σ̄_i^2 / (σ̂_i^2 + ε), 0.1, 10),    σ̂ = stop_grad(max(σ, 0)),  ε = 0.1
      L_i = mean ω_i [Huber_50(Q_i, y) + σ_i (σ̂_i^2 - Huber_50(stop_grad(Q_i), y_b)) / (σ̂_i + ε)]

  The actor maximises ``min_i Q_i(s, ã) - α log π(ã|s)`` (means). Actor, α and every target network are
  updated every ``policy_delay`` (2) critic updates, as in the authors' code.

``variant: v1`` is DSAC (v1): one distributional critic, the sampled target of its target network bounded
by ``td_bound`` (20), and the loss ``-(y - Q) / (σ̂^2 + ε) · Q - ((Q - y_b)^2 - σ̂^2) / (σ̂^3 + ε) · σ``.

Every network passes through :meth:`Agent.quantize` before its optimizer, so ``quant=w8a8`` trains
fake-quantized actors and critics; ``policy_net()`` is the actor (what gets exported).

Defaults and deviations (the configs ``configs/agent/{sac,sac_discrete,dsac}.yaml`` comment every key)
    - SAC follows CleanRL's ``sac_continuous_action``: lr 3e-4 (actor) / 1e-3 (critics, α), batch 256, 256x2
      ReLU MLPs, τ 0.005, log σ squashed by a tanh into [-5, 2] (``log_std_mode: tanh``); the paper updates
      the actor every step (``policy_delay: 1``), CleanRL every 2nd step twice. The actor's loss
      backpropagates through the critics with their weights frozen (no critic gradient is computed there).
    - Discrete SAC: ``target_entropy_scale`` is Christodoulou's 0.98 on classic control (evaluation is greedy, so
      a high-entropy behaviour policy still evaluates well: CartPole reaches 475 on 3 seeds) and CleanRL's 0.89
      on Atari. The actor's loss uses the critics' ``Q(s, ·)`` from before this update's critic step (one
      forward pass fewer).
    - DSAC-T follows the authors' MuJoCo settings (lr 1e-4, α lr 3e-4, log α₀ = 1, 256x3 MLPs, log σ clipped
      to [-20, 0.5] with ``log_std_mode: clamp``, ``policy_delay`` 2) except ReLU for their GELU (the
      deployment kernels implement ReLU) and ``learning_starts`` 5000 (theirs: 10000). Their serial trainer
      collects ``sample_batch_size`` = 20 env steps per update (so their 1.5M iterations are ~30M env steps);
      here one update follows each env step, as in SAC (``agent.train_freq=20`` gives their ratio).
"""
from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlq.agents.base import Agent, UpdateOut, amp_forward, register
from rlq.agents.qensemble import check_ensemble_cfg, reduce_members
from rlq.nets import make_encoder
from rlq.nets.ensemble import EnsembleMLP
from rlq.replay.base import Batch

LOG_2 = math.log(2.0)


def mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def squashed_log_prob(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """``log π(tanh(u))`` for ``u ~ N(mean, exp(log_std))``, summed over action dimensions: the Gaussian
    log-density minus ``Σ log(1 - tanh(u)^2) = Σ 2 (log 2 - u - softplus(-2u))``."""
    normal = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    correction = 2.0 * (LOG_2 - u - F.softplus(-2.0 * u))
    return (normal - correction).sum(-1)


class GaussianActor(nn.Module):
    """obs -> (mean, log_std) of a Gaussian over pre-tanh actions. ``log_std_mode`` maps the network's raw
    output into ``[log_std_min, log_std_max]``: ``tanh`` squashes it smoothly (CleanRL's SAC; a raw 0 gives the
    middle of the range), ``clamp`` clips it (the DSAC-T authors' code; a raw 0 gives log σ = 0, σ = 1)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], log_std_min: float, log_std_max: float,
                 log_std_mode: str = "tanh"):
        super().__init__()
        if log_std_mode not in ("tanh", "clamp"):
            raise ValueError(f"log_std_mode={log_std_mode!r}: choose tanh or clamp")
        self.net = mlp(obs_dim, hidden, 2 * act_dim)
        self.log_std_min, self.log_std_max = float(log_std_min), float(log_std_max)
        self.log_std_mode = log_std_mode

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw = self.net(obs.flatten(1).float()).chunk(2, dim=-1)
        if self.log_std_mode == "clamp":
            return mean, raw.clamp(self.log_std_min, self.log_std_max)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(raw) + 1.0)
        return mean, log_std

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(action in [-1, 1], its log-probability), reparameterised."""
        mean, log_std = self(obs)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        u = mean + log_std.exp() * eps
        return torch.tanh(u), squashed_log_prob(u, mean, log_std)

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self(obs)[0])


class Critic(nn.Module):
    """Q(s, a) on the concatenation of the flattened observation and the ``[-1, 1]`` action: ``out`` = 1 (a
    value) or 2 (DSAC: mean and the pre-softplus standard deviation)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], out: int = 1):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, hidden, out)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs.flatten(1).float(), action], dim=-1))


class EnsembleCritic(nn.Module):
    """N critics ``Q_i(s, a)`` with stacked weights (:class:`rlq.nets.ensemble.EnsembleMLP`): ``forward(obs,
    action, members=None)`` -> ``(k, B, out)`` for the k selected members (all by default), in one batched
    call. Built by stacking N :class:`Critic` initialisations (:meth:`from_critics`), so N = 2 starts from
    exactly the twin critics two ``Critic`` modules would be."""

    def __init__(self, net: EnsembleMLP):
        super().__init__()
        self.net = net
        self.n = net.n

    @classmethod
    def from_critics(cls, critics: list[Critic]) -> "EnsembleCritic":
        return cls(EnsembleMLP.from_sequentials([c.net for c in critics]))

    def __len__(self) -> int:
        return self.n

    def forward(self, obs: torch.Tensor, action: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(torch.cat([obs.flatten(1).float(), action], dim=-1), members)


class DiscreteNet(nn.Module):
    """An encoder (MLP or Nature CNN) and a linear layer with one output per action (policy logits or Q)."""

    def __init__(self, encoder: nn.Module, n_actions: int):
        super().__init__()
        self.encoder = encoder
        self.out = nn.Linear(encoder.out_dim, n_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(obs))


def sac_target(reward: torch.Tensor, discount: torch.Tensor, q1_next: torch.Tensor, q2_next: torch.Tensor,
               logp_next: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """``r + discount (min(Q̄_1, Q̄_2)(s', a') - α log π(a'|s'))`` (``discount`` = γ^n (1 - terminated))."""
    return reward + discount * (torch.min(q1_next, q2_next) - alpha * logp_next)


def discrete_sac_target(reward: torch.Tensor, discount: torch.Tensor, logp_next: torch.Tensor,
                        q1_next: torch.Tensor, q2_next: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """``r + discount Σ_a π(a|s') (min(Q̄_1, Q̄_2)(s', a) - α log π(a|s'))`` from (B, A) log-probs and Qs."""
    return reward + discount * (logp_next.exp() * (torch.min(q1_next, q2_next) - alpha * logp_next)).sum(1)


def discrete_actor_loss(logp: torch.Tensor, q_min: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """``mean_s Σ_a π(a|s) (α log π(a|s) - min_i Q_i(s, a))`` (Q detached by the caller)."""
    return (logp.exp() * (alpha * logp - q_min)).sum(1).mean()


def alpha_loss(log_alpha: torch.Tensor, entropy: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """``mean log α · (H - H̄)``: its gradient raises α when the policy's entropy is below the target."""
    return (log_alpha * (entropy.detach() - target_entropy)).mean()


class frozen:
    """Context: ``params`` do not require gradients inside, so the actor's loss backpropagates through the
    critics to the action without computing (and then discarding) the critics' weight gradients."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p in self.params:
            p.requires_grad_(True)


def polyak(target: nn.Module, online: nn.Module, tau: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


class _SACBase(Agent):
    """What SAC, discrete SAC and DSAC share: temperature, schedules, random warm-up actions, state."""

    def __init__(self, cfg: Any, observation_space: gym.Space, action_space: gym.Space, device: str = "cpu",
                 seed: int = 0, quant: Any = None):
        super().__init__(cfg, observation_space, action_space, device, seed, quant)
        torch.manual_seed(self.seed)
        self.rng = np.random.default_rng(self.seed)
        self.gen = torch.Generator(device=self.device).manual_seed(self.seed)
        self.gamma = float(cfg.gamma)
        self.tau = float(cfg.tau)
        self.policy_delay = int(cfg.policy_delay)
        self.learning_starts = int(cfg.learning_starts)
        self.max_grad_norm = float(cfg.get("max_grad_norm", 0.0))
        self.autotune = bool(cfg.autotune)
        self.log_alpha = torch.tensor(math.log(float(cfg.alpha)), device=self.device, requires_grad=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=float(cfg.alpha_lr))
        self.step = 0
        self.updates = 0
        self.last_alpha = float(cfg.alpha)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    def set_step(self, step: int) -> None:
        self.step = step

    def schedule_metrics(self) -> dict[str, float]:
        return {"alpha": float(self.alpha)}

    def _obs(self, obs: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(obs), device=self.device)

    def _alpha_step(self, entropy: torch.Tensor) -> float:
        """One temperature step toward the target entropy from a batch of (estimated) entropies."""
        if not self.autotune:
            return 0.0
        loss = alpha_loss(self.log_alpha, entropy, self.target_entropy)
        return self.optimizer_step(loss, self.alpha_optimizer, [self.log_alpha])

    # the modules every subclass has: actor, critics, critic_targets, actor_optimizer, critic_optimizer
    _MODULES = ("actor", "critics", "critic_targets", "actor_optimizer", "critic_optimizer")

    def state_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k).state_dict() for k in self._MODULES}, **self._common_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self._MODULES:
            getattr(self, k).load_state_dict(state[k])
        self._load_common(state)

    def _common_state(self) -> dict[str, Any]:
        return {"log_alpha": self.log_alpha.detach().clone(), "alpha_optimizer": self.alpha_optimizer.state_dict(),
                "step": self.step, "updates": self.updates, "rng": self.rng.bit_generator.state,
                "gen": self.gen.get_state()}

    def _load_common(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.step, self.updates = int(state["step"]), int(state["updates"])
        self.rng.bit_generator.state = state["rng"]
        self.gen.set_state(state["gen"])


@register("sac", "dsac", "sac_n", "redq", "lb_sac", "eaudesac")
class SACAgent(_SACBase):
    """SAC and DSAC-T / DSAC-v1 on continuous (Box) action spaces (``distributional`` and ``variant`` in
    the config select DSAC; see the module docstring)."""

    def __init__(self, cfg: Any, observation_space: gym.Space, action_space: gym.Space, device: str = "cpu",
                 seed: int = 0, quant: Any = None):
        if not isinstance(action_space, gym.spaces.Box) or len(action_space.shape) != 1:
            hint = "; use agent=sac_discrete" if isinstance(action_space, gym.spaces.Discrete) else ""
            raise ValueError(f"agent {cfg.name!r} needs a continuous (Box, 1-d) action space, got {action_space}{hint}")
        if len(observation_space.shape) == 3:
            raise ValueError(f"agent {cfg.name!r} takes vector observations, got images of shape "
                             f"{observation_space.shape}")
        super().__init__(cfg, observation_space, action_space, device, seed, quant)
        self.distributional = bool(cfg.get("distributional", False))
        self.variant = str(cfg.get("variant", "t"))
        if self.variant not in ("t", "v1"):
            raise ValueError(f"agent.variant={self.variant!r} is not a DSAC variant: choose t (DSAC-T) or v1")
        obs_dim = int(np.prod(observation_space.shape))
        self.act_dim = int(action_space.shape[0])
        low, high = action_space.low.astype(np.float32), action_space.high.astype(np.float32)
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise ValueError(f"agent {cfg.name!r} needs bounded actions, got {action_space}")
        self.low, self.high = low, high
        self.scale = torch.as_tensor((high - low) / 2.0, device=self.device)
        self.center = torch.as_tensor((high + low) / 2.0, device=self.device)
        self.target_entropy = float(cfg.target_entropy) if cfg.get("target_entropy") is not None else -float(self.act_dim)
        hidden = list(cfg.hidden)
        self.n_critics = int(cfg.get("n_critics", 2))
        self.reduction = str(cfg.get("target_reduction", "min"))
        self.redq_m = int(cfg.get("redq_m", 2))
        if self.distributional and (self.n_critics != 2 or self.reduction != "min"):
            raise ValueError(f"agent.n_critics={self.n_critics} / agent.target_reduction={self.reduction!r}: {cfg.name} "
                             "keeps its own distributional critics (use agent=sac for critic ensembles)")
        check_ensemble_cfg(self.n_critics, self.reduction, self.redq_m, "agent.n_critics")
        n_critics = 1 if (self.distributional and self.variant == "v1") else self.n_critics
        # agent.amp=bf16: the critic ensemble's products (forward and backward) in bf16; fp32 everything else
        self.amp = str(cfg.get("amp", "none"))
        if self.amp != "none" and self.distributional:
            raise ValueError(f"agent.amp={self.amp} is for SAC's ensemble critics: {cfg.name} keeps its own "
                             "distributional critics (use agent.amp=none)")
        # agent=eaudesac: K critic sets of N members in one ensemble, selected and pruned as in EauDeQN
        self.eaude = str(cfg.get("critic_sparsity", "none")) == "eaudeqn"
        if self.eaude and (self.distributional or self.quant.enabled):
            raise ValueError(f"agent {cfg.name!r}: critic_sparsity=eaudeqn needs SAC's ensemble critics and quant=none")
        sets = int(cfg.n_networks) if self.eaude else 1
        out = 2 if self.distributional else 1
        obs_ex = self.example_obs().float()
        act_ex = torch.zeros(obs_ex.shape[0], self.act_dim, device=self.device)
        std_args = (cfg.log_std_min, cfg.log_std_max, str(cfg.get("log_std_mode", "tanh")))
        self.actor = self.quantize(GaussianActor(obs_dim, self.act_dim, hidden, *std_args).to(self.device), obs_ex)

        def critics(sets: int = 1) -> nn.Module:  # (the N Critic initialisations happen in the same order as before)
            members = [Critic(obs_dim, self.act_dim, hidden, out).to(self.device) for _ in range(n_critics * sets)]
            if self.distributional:  # DSAC: separate critics
                return nn.ModuleList(self.quantize(c, (obs_ex, act_ex)) for c in members)
            return self.quantize(EnsembleCritic.from_critics(members), (obs_ex, act_ex))
        self.critics = critics(sets)
        self.critic_targets = critics()
        self.critic_sets = None
        if self.eaude:
            from rlq.agents.eaudeqn import EauDeCritics

            self.critic_sets = EauDeCritics(self.critics, sets, n_critics, float(cfg.max_speed),
                                            bool(cfg.reset_optimizer), str(cfg.prune_scope))
            self.select_every = int(cfg.select_every)
        if self.critic_sets is None:
            self.critic_targets.load_state_dict(self.critics.state_dict())
        else:  # the targets start as set 0
            self.critic_targets.load_state_dict({k: v[:n_critics] for k, v in self.critics.state_dict().items()})
        self.critic_targets.requires_grad_(False)
        if self.distributional:  # DSAC's target policy
            self.actor_target = self.quantize(
                GaussianActor(obs_dim, self.act_dim, hidden, *std_args).to(self.device), obs_ex)
            self.actor_target.load_state_dict(self.actor.state_dict())
            self.actor_target.requires_grad_(False)
            self.mean_std = torch.full((n_critics,), -1.0, device=self.device)  # σ̄_i (-1: not yet seen)
            self.tau_b = float(cfg.get("tau_b") or self.tau)
            self.td_bound = float(cfg.get("td_bound", 20.0))
        fused = self.device.type in ("cpu", "cuda")
        self.critic_optimizer = torch.optim.Adam(self.critics.parameters(), lr=float(cfg.critic_lr), fused=fused)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=float(cfg.actor_lr), fused=fused)
        self._critic_params = list(self.critics.parameters())
        self._actor_params = list(self.actor.parameters())
        # eaudesac: the actor's critics and the target critics' Polyak source are set 0
        self._actor_critics = None if self.critic_sets is None else self.critic_sets.set_members(0)
        self._set0_params = None if self.critic_sets is None else [p.detach()[:n_critics] for p in self._critic_params]

    # -- acting ---------------------------------------------------------------------------------------------
    def policy_net(self) -> nn.Module:
        return self.actor

    def to_env(self, a: torch.Tensor) -> np.ndarray:
        """``[-1, 1]`` actions -> the env's bounds."""
        return (a * self.scale + self.center).cpu().numpy().astype(np.float32)

    def from_env(self, action: torch.Tensor) -> torch.Tensor:
        return ((action.float() - self.center) / self.scale).clamp(-1.0, 1.0)

    @torch.no_grad()
    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        o = self._obs(obs)
        if explore and self.step < self.learning_starts:  # uniform random warm-up actions
            n = o.shape[0]
            return self.rng.uniform(self.low, self.high, size=(n, self.act_dim)).astype(np.float32)
        a = self.actor.sample(o, self.gen)[0] if explore else self.actor.mean_action(o)
        return self.to_env(a)

    # -- learning ---------------------------------------------------------------------------------------------
    def update(self, batch: Batch) -> UpdateOut:
        obs, next_obs = batch.obs, batch.next_obs
        action = self.from_env(batch.action)
        reward, discount = batch.reward.float(), batch.discount.float()
        alpha = self.alpha
        if self.distributional:
            critic_loss, info = self._dsac_critic_loss(obs, action, reward, discount, next_obs, alpha)
        else:
            with torch.no_grad():
                a2, logp2 = self.actor.sample(next_obs, self.gen)
                q_next = self._critic_forward(self.critic_targets, next_obs, a2, self.target_members()).squeeze(-1)
                y = reward + discount * (reduce_members(q_next, self.reduction) - alpha * logp2)  # q_next: (k, B)
            qs = self._critic_forward(self.critics, obs, action).squeeze(-1)  # (N, B); eaudesac: (K * N, B)
            per_critic = (qs - y).pow(2).mean(1)
            critic_loss = per_critic.sum()
            info = {"q_mean": qs[0].detach().mean().item()}
        value = self.optimizer_step(critic_loss, self.critic_optimizer, self._critic_params, self.max_grad_norm)
        if not math.isfinite(value):
            return UpdateOut(metrics={"loss": value})
        self.updates += 1
        if self.critic_sets is not None:  # set 0's loss is what a plain SAC would report
            self.critic_sets.apply_masks_()
            per_set = per_critic.detach().view(self.critic_sets.k, -1).sum(1)
            self.critic_sets.accumulate(per_set)
            info["loss_set0"] = float(per_set[0])
        metrics = {"loss": value, **info}
        if self.updates % self.policy_delay == 0:
            with frozen(self._critic_params):  # gradients reach the actor only
                a, logp = self.actor.sample(obs, self.gen)
                if self.distributional:
                    q_pi = torch.stack([c(obs, a)[..., 0] for c in self.critics]).min(0).values
                else:  # SAC / SAC-N: min over all critics; REDQ and mean: the mean over all critics
                    q_pi = reduce_members(self._critic_forward(self.critics, obs, a, self._actor_critics)[..., 0],
                                          "min" if self.reduction == "min" else "mean")
                actor_loss = (alpha * logp - q_pi).mean()
                actor_value = self.optimizer_step(actor_loss, self.actor_optimizer, self._actor_params,
                                                  self.max_grad_norm)
            if not math.isfinite(actor_value):
                return UpdateOut(metrics={"loss": actor_value})
            self._alpha_step(-logp)
            metrics.update(actor_loss=actor_value, entropy=float(-logp.detach().mean()))
            if self.distributional:  # DSAC: every target (critics and policy) on the delayed schedule
                polyak(self.critic_targets, self.critics, self.tau)
                polyak(self.actor_target, self.actor, self.tau)
        if self.critic_sets is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.critic_targets.parameters()), self._set0_params, self.tau)
            if self.updates % self.select_every == 0:
                self.critic_sets.select(self.critic_optimizer)
        elif not self.distributional:
            polyak(self.critic_targets, self.critics, self.tau)
        return UpdateOut(metrics=metrics)

    def _critic_forward(self, critics: nn.Module, obs: torch.Tensor, action: torch.Tensor,
                        members: torch.Tensor | None = None) -> torch.Tensor:
        """``critics(obs, action, members)`` in fp32; its products in bf16 when ``agent.amp=bf16``."""
        return amp_forward(self.amp, self.device, critics, obs, action, members)

    def target_members(self) -> torch.Tensor | None:
        """The target critics this update reduces over: all (None), or REDQ's random subset of M."""
        if self.reduction != "redq" or self.redq_m == self.n_critics:
            return None
        idx = np.sort(self.rng.choice(self.n_critics, size=self.redq_m, replace=False))
        return torch.as_tensor(idx, device=self.device)

    def _sample_q(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, σ, sample mean + clamp(ε, -3, 3) σ) of a distributional critic's output."""
        mean, std = out[..., 0], F.softplus(out[..., 1])
        eps = torch.randn(mean.shape, generator=self.gen, device=mean.device, dtype=mean.dtype).clamp(-3.0, 3.0)
        return mean, std, mean + eps * std

    def _dsac_critic_loss(self, obs, action, reward, discount, next_obs, alpha) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            a2, logp2 = self.actor_target.sample(next_obs, self.gen)
            nxt = [self._sample_q(c(next_obs, a2)) for c in self.critic_targets]
        outs = [self._sample_q(c(obs, action)) for c in self.critics]
        with torch.no_grad():  # σ̄_i: exponential average of the batch-mean σ_i
            batch_std = torch.stack([o[1].mean() for o in outs])
            first = self.mean_std < 0
            self.mean_std.copy_(torch.where(first, batch_std, (1 - self.tau_b) * self.mean_std + self.tau_b * batch_std))
        if self.variant == "v1":
            return self._dsac_v1_loss(outs[0], nxt[0], reward, discount, logp2, alpha)
        with torch.no_grad():
            (m1, _, s1), (m2, _, s2) = nxt
            q_next = torch.min(m1, m2)
            q_next_sample = torch.where(m1 < m2, s1, s2)
            y = reward + discount * (q_next - alpha * logp2)
            y_s = reward + discount * (q_next_sample - alpha * logp2)
        loss = 0.0
        for i, (q, std, _) in enumerate(outs):
            loss = loss + dsac_t_critic_loss(q, std, y, y_s, self.mean_std[i])
        return loss, {"q_mean": outs[0][0].detach().mean().item(), "q_std": outs[0][1].detach().mean().item()}

    def _dsac_v1_loss(self, out, nxt, reward, discount, logp2, alpha) -> tuple[torch.Tensor, dict]:
        q, std, _ = out
        with torch.no_grad():
            y = reward + discount * (nxt[2] - alpha * logp2)  # the target critic's sampled return
        return dsac_v1_critic_loss(q, std, y, self.td_bound), {"q_mean": q.detach().mean().item(),
                                                               "q_std": std.detach().mean().item()}

    def schedule_metrics(self) -> dict[str, float]:
        out = super().schedule_metrics()
        if self.critic_sets is not None:
            out.update(self.critic_sets.metrics())
        return out

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = super().state_dict()
        if self.distributional:
            s.update(actor_target=self.actor_target.state_dict(), mean_std=self.mean_std.clone())
        if self.critic_sets is not None:
            s["critic_sets"] = self.critic_sets.state_dict()
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.distributional:
            self.actor_target.load_state_dict(state["actor_target"])
            self.mean_std.copy_(state["mean_std"])
        if self.critic_sets is not None:
            self.critic_sets.load_state_dict(state["critic_sets"])


def dsac_t_critic_loss(q: torch.Tensor, std: torch.Tensor, y: torch.Tensor, y_sample: torch.Tensor,
                       mean_std: torch.Tensor, bias: float = 0.1, delta: float = 50.0) -> torch.Tensor:
    """DSAC-T's loss of one critic (module docstring): the mean is pulled to ``y`` (expected value
    substituting), σ by the bounded sampled target, everything weighted by the variance-based ω."""
    std_d = std.clamp(min=0.0).detach()
    q_d = q.detach()
    y_b = q_d + (y_sample - q_d).clamp(-3.0 * mean_std, 3.0 * mean_std)
    omega = (mean_std ** 2 / (std_d ** 2 + bias)).clamp(0.1, 10.0)
    huber_mean = F.huber_loss(q, y, delta=delta, reduction="none")
    huber_b = F.huber_loss(q_d, y_b, delta=delta, reduction="none")
    return (omega * (huber_mean + std * (std_d ** 2 - huber_b) / (std_d + bias))).mean()


def dsac_v1_critic_loss(q: torch.Tensor, std: torch.Tensor, y: torch.Tensor, td_bound: float,
                        bias: float = 0.1) -> torch.Tensor:
    """DSAC (v1): the Gaussian-likelihood gradient with the sampled target clipped to ``q ± td_bound``."""
    std_d = std.clamp(min=0.0).detach()
    q_d = q.detach()
    y_b = q_d + (y - q_d).clamp(-td_bound, td_bound)
    return (-(y - q_d) / (std_d ** 2 + bias) * q
            - ((q_d - y_b) ** 2 - std_d ** 2) / (std_d ** 3 + bias) * std).mean()


@register("sac_discrete")
class DiscreteSACAgent(_SACBase):
    """SAC for discrete actions (module docstring): exact expectations over the categorical policy."""

    def __init__(self, cfg: Any, observation_space: gym.Space, action_space: gym.Space, device: str = "cpu",
                 seed: int = 0, quant: Any = None):
        if not isinstance(action_space, gym.spaces.Discrete):
            hint = "; use agent=sac (or dsac)" if isinstance(action_space, gym.spaces.Box) else ""
            raise ValueError(f"agent 'sac_discrete' needs a discrete action space, got {action_space}{hint}")
        super().__init__(cfg, observation_space, action_space, device, seed, quant)
        self.n_actions = int(action_space.n)
        self.target_entropy = float(cfg.target_entropy_scale) * math.log(self.n_actions)

        def build() -> DiscreteNet:
            enc = make_encoder(str(cfg.encoder), observation_space.shape, observation_space.dtype, list(cfg.hidden),
                               int(cfg.get("cnn_features", 512)))
            return DiscreteNet(enc, self.n_actions).to(self.device)
        self.actor = self.quantize(build())
        self.critics = nn.ModuleList(self.quantize(build()) for _ in range(2))
        self.critic_targets = nn.ModuleList(self.quantize(build()) for _ in range(2))
        self.critic_targets.load_state_dict(self.critics.state_dict())
        self.critic_targets.requires_grad_(False)
        fused = self.device.type in ("cpu", "cuda")
        eps = float(cfg.get("adam_eps", 1e-8))
        self.critic_optimizer = torch.optim.Adam(self.critics.parameters(), lr=float(cfg.critic_lr), eps=eps, fused=fused)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=float(cfg.actor_lr), eps=eps, fused=fused)
        self._critic_params = list(self.critics.parameters())
        self._actor_params = list(self.actor.parameters())
        self.target_update_period = int(cfg.get("target_update_period", 1))

    def policy_net(self) -> nn.Module:
        return self.actor

    @torch.no_grad()
    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        o = self._obs(obs)
        n = o.shape[0]
        if explore and self.step < self.learning_starts:
            return self.rng.integers(self.n_actions, size=n)
        logits = self.actor(o)
        if not explore:
            return logits.argmax(1).cpu().numpy()
        return torch.multinomial(F.softmax(logits, dim=1), 1, generator=self.gen).squeeze(1).cpu().numpy()

    def update(self, batch: Batch) -> UpdateOut:
        obs, next_obs = batch.obs, batch.next_obs
        action = batch.action.long()
        alpha = self.alpha
        with torch.no_grad():
            logp2 = F.log_softmax(self.actor(next_obs), dim=1)
            y = discrete_sac_target(batch.reward.float(), batch.discount.float(), logp2,
                                    self.critic_targets[0](next_obs), self.critic_targets[1](next_obs), alpha)
        qs = [c(obs) for c in self.critics]
        q_taken = [q.gather(1, action.unsqueeze(1)).squeeze(1) for q in qs]
        critic_loss = sum(F.mse_loss(q, y) for q in q_taken)
        value = self.optimizer_step(critic_loss, self.critic_optimizer, self._critic_params, self.max_grad_norm)
        if not math.isfinite(value):
            return UpdateOut(metrics={"loss": value})
        self.updates += 1
        metrics = {"loss": value, "q_mean": q_taken[0].detach().mean().item()}
        if self.updates % self.policy_delay == 0:
            logp = F.log_softmax(self.actor(obs), dim=1)
            p = logp.exp()
            actor_loss = discrete_actor_loss(logp, torch.min(qs[0], qs[1]).detach(), alpha)
            actor_value = self.optimizer_step(actor_loss, self.actor_optimizer, self._actor_params, self.max_grad_norm)
            if not math.isfinite(actor_value):
                return UpdateOut(metrics={"loss": actor_value})
            entropy = -(p * logp).sum(1)
            self._alpha_step(entropy)
            metrics.update(actor_loss=actor_value, entropy=float(entropy.detach().mean()))
        if self.updates % self.target_update_period == 0:
            polyak(self.critic_targets, self.critics, self.tau)
        return UpdateOut(metrics=metrics)
