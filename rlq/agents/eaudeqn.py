"""EauDeQN: dense-to-sparse DQN that prunes at the agent's own pace.

Paper
    Vincent, Faust, Tripathi, Peters, D'Eramo 2025, "Eau De Q-Network: Adaptive Distillation of Neural
    Networks in Deep Reinforcement Learning" (arXiv 2503.01437, RLC 2025). Config ``configs/agent/eaudeqn.yaml``.

The algorithm (from the abstract; the parts marked *ours* below are not in any text we could read)
    K online networks with different sparsity levels are trained from one shared target network: every
    update, each takes a gradient step on the same batch towards the same TD target, and its loss is
    summed over the target-update window. At each target update (every ``target_update_period`` updates)
    the online network with the smallest accumulated loss becomes the new target network; the others are
    replaced by magnitude-pruned copies of it at higher sparsity, one copy being kept at the chosen
    network's own sparsity. If pruning costs more loss than the sparser copies can recover within a
    window, the unpruned copy wins and sparsity stays; otherwise it rises. So sparsity follows the agent's
    learning pace and there is no final-sparsity hyper-parameter. Everything else is :class:`DQNAgent`
    (Huber TD loss, Adam, epsilon-greedy, its Double/dueling/C51/PER/n-step switches, ``agent.amp=bf16``,
    the trainer's ``overlap=true``: acting reads copies of slot 0 and of the target).

What we could verify, and the choices we made where we could not
    The paper body (method section, appendix) was not readable from here; only the abstract, the
    released Atari ``config.json`` of the authors' HuggingFace model card (``TheoVincent/Atari_EauDeQN``:
    ``n_networks 5, max_speed 0.01, max_noise 3.0, reset_optimizer true``, target update every 8000 env
    steps, lr 6.25e-5) and the selection code of the same authors' AdaQN (``theovincent/AdaDQN``: losses
    summed over the window, ``nanargmin`` picks the target, losses reset to 0). The training code is not
    public. Hence (*ours* = our design, documented so it can be replaced when the code appears):

    - **How much each copy is pruned** (*ours*): slot 0 is the chosen network itself (its sparsity
      ``s``); slot ``i = 1..K-1`` is pruned to ``min(s + max_speed * i / (K - 1), 1)``: evenly spaced
      increments up to ``max_speed`` *absolute* sparsity per target update (with the paper's 0.01 and
      1250 target updates in 10 M steps, 100% is within reach, so ``max_speed`` caps the pace without
      setting a final level). The initial networks are the same increments of one dense network.
    - **max_noise** (not implemented): the released config has it, its meaning is not stated anywhere
      we could read (noise on the increments? on the selection?). Our increments are deterministic.
    - **Magnitude pruning** (*ours*): ``prune_scope: global`` by default, one ``|w|`` threshold over every
      Linear/Conv2d weight matrix, so small layers with large weights (the MLP's 4-input first layer) keep
      more; ``layer`` prunes every matrix to the same sparsity (the GMP baselines' uniform choice). On
      CartPole (seed 0, 100k steps, ``max_speed`` 0.005) global ended at 88% sparsity, layer at 74%: with
      uniform sparsity the small first and last layers are the first to cost loss, and selection stops
      there. Biases stay dense; a copy is pruned from the chosen network's weights and its removed weights
      stay removed (``rlq/nets/sparse.py``). Masks are re-applied after every optimizer step.
    - **Optimizer state** (``reset_optimizer``, the paper's key; its scope is *ours*): ``true`` resets
      the Adam state of **every** online network at each target update, the kept copy included, so each
      window starts on equal footing (a warm optimizer on only the unpruned copy would bias the selection
      against pruning); ``false`` gives every slot a copy of the chosen network's Adam state.
    - **Acting and the policy** (*ours*): exploration acts greedily (epsilon-greedy) w.r.t. slot 0, the
      online continuation of the selected network; AdaQN instead samples network ``i`` with probability
      ∝ 1/loss_i, which EauDeQN may or may not keep. Greedy acting (``act(explore=False)``: evaluation,
      ``rlq.evaluate``) and ``policy_net()`` (export, quantization, the reported sparsity) are the selected
      network itself, the target: slot 0 starts each window from it with a reset Adam state, and Adam's
      first steps move every weight by about ``lr``, so slot 0 mid-window is a perturbed copy of the network
      the selection chose. Measured on CartPole (the final checkpoints of seeds 0-9 of
      ``experiments/results/cartpole_eaudeqn.md``, 30 greedy episodes each): the selected network returns
      383.6 on average, slot 0 262.4; for dense DQN, target 323.6 and online 337.2. On 5 seeds run after
      the change (10-14) the final policy returned 128.6% of DQN's. Both have the same masks, so the same
      sparsity.
    - **Shared target** (*ours* for Double DQN): one target per batch for all K networks, computed from
      the target network (``double``: with slot 0 choosing the next action).
    - Non-finite loss of one network: it gets no step and an infinite accumulated loss (cannot be
      selected); all K non-finite: the update reports the NaN (the trainer stops or skips, as for DQN).
      A window whose every network diverged keeps slot 0.

Defaults
    Top level (CartPole, MLP 256-256): the DQN preset (lr 1e-3, batch 64, target copy every 50 updates =
    100 env steps, so 1000 selections in 100k steps) with K = 5 and ``max_speed`` 0.005 (up to half a
    percentage point of sparsity per selection; with 0.01, seed 0 ended sparser in the first 20k steps but at
    70% instead of 74% after 100k with ``layer`` pruning: larger increments lose more selections).
    ``atari:`` block: the released Atari config (lr 6.25e-5,
    Adam eps 1.5e-4, 20k learning starts, target update every 2000 updates = 8000 agent steps, epsilon
    1 -> 0.01 over 250k agent steps, ``max_speed`` 0.01); the rest is DQN's Atari preset.

Cost
    The K networks are K ordinary modules updated in a loop (one fused Adam each), not a stacked
    ensemble: masks, pruning, QAT and export then need nothing special. The shared target costs one
    forward; the rest is K forward/backward passes, about K times a DQN update (measured in
    ``experiments/results/bench_eaudeqn.md``).

Logged (``schedule_metrics``, each training record): ``sparsity`` (overall, acting network),
``sparsity/<layer>``, ``selected`` (slot chosen at the last target update, before it moved to slot 0),
``sparser_selections`` (how many times a sparser copy won), ``acc_loss/<i>`` (the last window's accumulated
losses), ``net_sparsity/<i>`` (each slot's current sparsity level).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from rlq.agents.base import UpdateOut, register
from rlq.agents.dqn import DQNAgent
from rlq.nets.distributional import categorical_loss, gather_actions
from rlq.nets.sparse import (SCOPES, Masks, apply_masks_, dense_masks, ensemble_weights, magnitude_masks, masks_sparsity,
                             prune_tensors, sparsity_report)
from rlq.replay.base import Batch


@register("eaudeqn")
class EauDeQNAgent(DQNAgent):
    """DQN with ``n_networks`` online networks of increasing sparsity and loss-based target selection
    (module docstring: the paper, our choices where it is silent)."""

    def __init__(self, cfg: Any, observation_space: gym.Space, action_space: gym.Space, device: str = "cpu",
                 seed: int = 0, quant: Any = None):
        k = int(cfg.n_networks)
        if k < 2:
            raise ValueError(f"agent.n_networks={k}: eaudeqn needs at least 2 online networks")
        if float(cfg.tau) < 1.0:
            raise ValueError(f"agent.tau={cfg.tau}: eaudeqn needs hard target copies (tau=1.0), the target is "
                             "the online network selected at each copy")
        if bool(cfg.get("noisy", False)):
            raise ValueError("agent.noisy=true: eaudeqn prunes Linear/Conv2d weights and NoisyLinear layers are "
                             "neither; use noisy=false")
        if str(cfg.prune_scope) not in SCOPES:
            raise ValueError(f"agent.prune_scope={cfg.prune_scope!r}: choose one of {', '.join(SCOPES)}")
        super().__init__(cfg, observation_space, action_space, device, seed, quant)
        self.n_networks = k
        self.max_speed = float(cfg.max_speed)
        self.reset_optimizer = bool(cfg.reset_optimizer)
        self.prune_scope = str(cfg.prune_scope)
        # slot 0 is DQNAgent's online network (exploration; greedy acting and export use the target); slots
        # 1..K-1 are built the same way
        self.nets = [self.online] + [self.quantize(self.build_network().to(self.device)) for _ in range(k - 1)]
        self.optimizers = [self.optimizer] + [self._new_optimizer(net) for net in self.nets[1:]]
        self.net_params = [list(net.parameters()) for net in self.nets]
        self.masks: list[Masks] = [dense_masks(net) for net in self.nets]
        self.levels = [0.0] * k                 # each slot's sparsity level
        self.acc_loss = np.zeros(k)             # summed loss over the current window
        self.last_acc_loss = np.full(k, np.nan)  # the previous window's (logged)
        self.selected = 0
        self.sparser_selections = 0
        self._replace_from(0)  # slot i = slot 0 pruned by max_speed * i / (K - 1)
        self._report = sparsity_report(self.online)

    def _new_optimizer(self, net: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(net.parameters(), lr=float(self.cfg.lr), eps=float(self.cfg.adam_eps),
                                fused=self.device.type in ("cpu", "cuda"))

    def increments(self) -> list[float]:
        """Sparsity added to the chosen network's level for each slot: ``max_speed * i / (K - 1)``."""
        return [self.max_speed * i / (self.n_networks - 1) for i in range(self.n_networks)]

    # -- acting and the policy ----------------------------------------------------------------------
    acting_nets = ("online", "target")

    def policy_net(self) -> torch.nn.Module:
        """The selected network (the target): what greedy acting, export and quantization use (module
        docstring, "Acting and the policy")."""
        return self.target

    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        return super().act(obs, explore) if explore else self.greedy(obs, net_name="target")

    # -- selection and pruning ----------------------------------------------------------------------
    @torch.no_grad()
    def _replace_from(self, j: int) -> None:
        """Slot 0 <- network ``j``; slots 1..K-1 <- ``j`` pruned to higher sparsity; target <- ``j``."""
        chosen = {name: t.clone() for name, t in self.nets[j].state_dict().items()}
        chosen_masks = {name: m.clone() for name, m in self.masks[j].items()}
        chosen_opt = None if self.reset_optimizer else copy.deepcopy(self.optimizers[j].state_dict())
        base = self.levels[j]
        for i, (net, inc) in enumerate(zip(self.nets, self.increments())):
            net.load_state_dict(chosen)
            level = min(base + inc, 1.0)
            self.masks[i] = ({n: m.clone() for n, m in chosen_masks.items()} if i == 0 else
                             magnitude_masks(net, level, self.prune_scope, chosen_masks))
            apply_masks_(net, self.masks[i])
            self.levels[i] = level
            if self.reset_optimizer:
                self.optimizers[i].state.clear()
            else:
                self.optimizers[i].load_state_dict(copy.deepcopy(chosen_opt))
        self.target.load_state_dict(chosen)

    def select(self) -> int:
        """End of a target-update window: the slot with the smallest accumulated loss becomes the target
        and slot 0, the others its pruned copies; the losses restart at 0. Returns the chosen slot."""
        acc = np.where(np.isfinite(self.acc_loss), self.acc_loss, np.inf)
        j = int(np.argmin(acc)) if np.isfinite(acc).any() else 0
        self.last_acc_loss = self.acc_loss.copy()
        self.selected = j
        self.sparser_selections += int(j > 0)
        self._replace_from(j)
        self.acc_loss[:] = 0.0
        self._report = sparsity_report(self.online)
        return j

    # -- learning -----------------------------------------------------------------------------------
    def update(self, batch: Batch) -> UpdateOut:
        action = batch.action.long()
        with torch.no_grad():  # one shared target for the K networks
            target = self.distributional_target(batch) if self.distributional else self.td_target(batch)
        values, q0, priority = [], None, None
        for i, net in enumerate(self.nets):
            if self.distributional:
                log_p = self._forward(net, batch.obs)
                per_sample = categorical_loss(gather_actions(log_p, action), target)
                q = net.head.q_values(log_p.detach()).gather(1, action.unsqueeze(1)).squeeze(1) if i == 0 else None
            else:
                q = self._forward(net, batch.obs).gather(1, action.unsqueeze(1)).squeeze(1)
                per_sample = F.smooth_l1_loss(q, target, reduction="none")
            value = self.optimizer_step((batch.weights * per_sample).mean(), self.optimizers[i], self.net_params[i],
                                        self.max_grad_norm)
            if math.isfinite(value):
                apply_masks_(net, self.masks[i])
                self.acc_loss[i] += value
            else:
                self.acc_loss[i] = math.inf
            values.append(value)
            if i == 0:
                q0 = q.detach()
                priority = (per_sample if self.distributional else (target - q0).abs()).detach()
        if not any(math.isfinite(v) for v in values):  # nothing was applied: the trainer stops or skips
            return UpdateOut(metrics={"loss": values[0]})
        self.updates += 1
        if self.updates % self.target_update_period == 0:
            self.select()
        return UpdateOut(metrics={"loss": values[0], "q_mean": q0.mean().item(), "priority": priority.mean().item()},
                         priorities=priority.cpu().numpy())

    # -- logging ------------------------------------------------------------------------------------
    def schedule_metrics(self) -> dict[str, float]:
        out = {"epsilon": self.epsilon, "sparsity": self._report["overall"], "selected": float(self.selected),
               "sparser_selections": float(self.sparser_selections)}
        out.update({f"sparsity/{name.removesuffix('.weight')}": v for name, v in self._report["layers"].items()})
        for i in range(self.n_networks):
            out[f"acc_loss/{i}"] = float(self.last_acc_loss[i])
            out[f"net_sparsity/{i}"] = masks_sparsity(self.masks[i])
        return out

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # online (= slot 0), target, slot 0's optimizer, counters, rng
        state["eaudeqn"] = {
            "nets": [net.state_dict() for net in self.nets[1:]],
            "optimizers": [opt.state_dict() for opt in self.optimizers[1:]],
            "masks": [{n: m.clone() for n, m in masks.items()} for masks in self.masks],
            "levels": list(self.levels),
            "acc_loss": torch.from_numpy(self.acc_loss.copy()),
            "last_acc_loss": torch.from_numpy(self.last_acc_loss.copy()),
            "selected": self.selected,
            "sparser_selections": self.sparser_selections,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        e = state["eaudeqn"]
        if len(e["masks"]) != self.n_networks:
            raise ValueError(f"checkpoint has {len(e['masks'])} eaudeqn networks, this agent has "
                             f"n_networks={self.n_networks}")
        super().load_state_dict(state)
        for net, opt, net_state, opt_state in zip(self.nets[1:], self.optimizers[1:], e["nets"], e["optimizers"]):
            net.load_state_dict(net_state)
            opt.load_state_dict(opt_state)
        self.masks = [{n: m.to(self.device, torch.bool).clone() for n, m in masks.items()} for masks in e["masks"]]
        self.levels = [float(v) for v in e["levels"]]
        self.acc_loss = e["acc_loss"].double().numpy().copy()
        self.last_acc_loss = e["last_acc_loss"].double().numpy().copy()
        self.selected = int(e["selected"])
        self.sparser_selections = int(e["sparser_selections"])
        self._report = sparsity_report(self.online)


class EauDeCritics:
    """EauDeQN's selection for an actor-critic's critics (``agent=eaudesac``, ``rlq/agents/sac.py``).

    ``k`` critic sets of ``n`` members (SAC's twin critics: ``n = 2``) live in one vectorized
    :class:`rlq.agents.sac.EnsembleCritic` of ``k * n`` members, so the K sets cost one batched forward and
    backward (set ``s`` = members ``s*n .. s*n + n - 1``); one Adam covers them all (elementwise, so this is K
    independent Adams sharing a step counter). Every set regresses to the same target; the agent hands each
    set's summed critic loss to :meth:`accumulate`. Every ``select_every`` updates, :meth:`select` picks the set
    with the smallest accumulated loss: it becomes set 0, the others its magnitude-pruned copies at
    ``s + max_speed * i / (K - 1)``, exactly as :class:`EauDeQNAgent` does for Q-networks (pruning per member
    weight matrix, or one global threshold over the set's weights; masks re-applied after every step). The
    actor is trained against set 0 and stays dense.

    Our choices (the paper's MuJoCo agent is not described in anything we could read): SAC's target critics
    keep their Polyak averaging (``tau``, every update), now toward set 0, instead of a hard copy of the chosen
    set (a hard copy would undo SAC's slow target); the selection period is its own key (``select_every``).
    ``reset_optimizer``: ``true`` clears the Adam state of every set at each selection; ``false`` gives every
    set the chosen set's moments."""

    def __init__(self, critics: torch.nn.Module, k: int, n: int, max_speed: float, reset_optimizer: bool,
                 prune_scope: str):
        if k < 2:
            raise ValueError(f"agent.n_networks={k}: EauDeQN critics need at least 2 critic sets")
        if prune_scope not in SCOPES:
            raise ValueError(f"agent.prune_scope={prune_scope!r}: choose one of {', '.join(SCOPES)}")
        self.critics, self.k, self.n = critics, int(k), int(n)
        self.max_speed, self.reset_optimizer, self.prune_scope = float(max_speed), bool(reset_optimizer), prune_scope
        self.params = list(critics.parameters())
        if any(p.shape[0] != self.k * self.n for p in self.params):
            raise ValueError(f"EauDeCritics needs an ensemble of k * n = {self.k * self.n} members")
        self.weights = ensemble_weights(critics)
        self.masks: Masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in self.weights.items()}
        self.levels = [0.0] * self.k
        self.acc_loss = np.zeros(self.k)
        self.last_acc_loss = np.full(self.k, np.nan)
        self.selected = 0
        self.sparser_selections = 0
        self._replace_from(0, None)

    def set_members(self, s: int) -> torch.Tensor:
        return torch.arange(s * self.n, (s + 1) * self.n, device=self.params[0].device)

    def _per_set(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.k, self.n, *t.shape[1:])

    def _set_tensors(self, stacked: dict[str, torch.Tensor], s: int) -> dict[str, torch.Tensor]:
        """Set ``s``'s weight matrices (views), one entry per member and layer: the "layers" of per-layer pruning."""
        return {f"{name}[{j}]": t[s * self.n + j] for name, t in stacked.items() for j in range(self.n)}

    @torch.no_grad()
    def apply_masks_(self) -> None:
        for name, w in self.weights.items():
            w.mul_(self.masks[name])

    @torch.no_grad()
    def _replace_from(self, j: int, optimizer: torch.optim.Optimizer | None) -> None:
        for t in [*self.params, *self.masks.values()]:  # every set <- set j (weights, biases, masks)
            v = self._per_set(t)
            v.copy_(v[j].clone().expand_as(v))
        base = self.levels[j]
        for s in range(self.k):
            self.levels[s] = min(base + self.max_speed * s / (self.k - 1), 1.0)
            if s:
                pruned = prune_tensors(self._set_tensors(self.weights, s), self.levels[s], self.prune_scope,
                                       self._set_tensors(self.masks, s))
                for key, m in pruned.items():
                    name, member = key.rsplit("[", 1)
                    self.masks[name][s * self.n + int(member[:-1])] = m
        self.apply_masks_()
        if optimizer is None:
            return
        if self.reset_optimizer:
            optimizer.state.clear()
            return
        for p in self.params:  # every set gets the chosen set's Adam moments (the step count is shared)
            for t in optimizer.state.get(p, {}).values():
                if t.dim() > 0 and t.shape[0] == self.k * self.n:
                    v = self._per_set(t)
                    v.copy_(v[j].clone().expand_as(v))

    def accumulate(self, per_set: torch.Tensor) -> None:
        """Add this update's critic loss of each set (a ``(k,)`` tensor) to the window's sums."""
        values = per_set.detach().double().cpu().numpy()
        self.acc_loss = np.where(np.isfinite(values), self.acc_loss + values, np.inf)

    def select(self, optimizer: torch.optim.Optimizer) -> int:
        acc = np.where(np.isfinite(self.acc_loss), self.acc_loss, np.inf)
        j = int(np.argmin(acc)) if np.isfinite(acc).any() else 0
        self.last_acc_loss = self.acc_loss.copy()
        self.selected = j
        self.sparser_selections += int(j > 0)
        self._replace_from(j, optimizer)
        self.acc_loss[:] = 0.0
        return j

    def set_sparsity(self, s: int = 0) -> dict[str, float]:
        """Set ``s``'s zero-weight fraction: per layer (over its members) and overall."""
        layers, zeros, total = {}, 0, 0
        for name, w in self.weights.items():
            ws = self._per_set(w)[s]
            z = int((ws == 0).sum())
            layers[name.removesuffix(".weight")] = z / ws.numel()
            zeros, total = zeros + z, total + ws.numel()
        return {"overall": zeros / max(total, 1), **{f"layer/{k}": v for k, v in layers.items()}}

    def metrics(self) -> dict[str, float]:
        sp = self.set_sparsity(0)
        out = {"critic_sparsity": sp["overall"], "selected": float(self.selected),
               "sparser_selections": float(self.sparser_selections)}
        out.update({f"critic_sparsity/{k[6:]}": v for k, v in sp.items() if k.startswith("layer/")})
        for i in range(self.k):
            out[f"acc_loss/{i}"] = float(self.last_acc_loss[i])
            out[f"net_sparsity/{i}"] = self.levels[i]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: m.clone() for n, m in self.masks.items()}, "levels": list(self.levels),
                "acc_loss": torch.from_numpy(self.acc_loss.copy()), "last_acc_loss": torch.from_numpy(self.last_acc_loss.copy()),
                "selected": self.selected, "sparser_selections": self.sparser_selections}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["masks"]) != set(self.masks) or len(state["levels"]) != self.k:
            raise ValueError(f"checkpoint's EauDeQN critics do not match this agent's (n_networks={self.k})")
        for name, m in state["masks"].items():
            self.masks[name].copy_(m)
        self.levels = [float(v) for v in state["levels"]]
        self.acc_loss = state["acc_loss"].double().numpy().copy()
        self.last_acc_loss = state["last_acc_loss"].double().numpy().copy()
        self.selected = int(state["selected"])
        self.sparser_selections = int(state["sparser_selections"])
