"""Q-value heads and the encoder+head Q-network used by the DQN family."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rlq.nets.encoders import has_hooks

Linear = Callable[[int, int], nn.Module]  # a layer factory: nn.Linear, or a NoisyLinear partial


class QHead(nn.Module):
    """A linear layer (``hidden`` > 0: a hidden ReLU layer first) from features to one Q-value per action."""

    def __init__(self, in_dim: int, n_actions: int, hidden: int = 0, linear: Linear = nn.Linear):
        super().__init__()
        if hidden:
            self.q: nn.Module = nn.Sequential(linear(in_dim, hidden), nn.ReLU(), linear(hidden, n_actions))
        else:
            self.q = linear(in_dim, n_actions)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.q(h)


class DuelingHead(nn.Module):
    """Wang et al. 2016: Q(s, a) = V(s) + A(s, a) - mean_a A(s, a), with separate value and advantage
    streams (``hidden`` units each, 0 for a single linear layer per stream)."""

    def __init__(self, in_dim: int, n_actions: int, hidden: int = 0, linear: Linear = nn.Linear):
        super().__init__()

        def stream(out: int) -> nn.Module:
            if hidden:
                return nn.Sequential(linear(in_dim, hidden), nn.ReLU(), linear(hidden, out))
            return linear(in_dim, out)

        self.value = stream(1)
        self.advantage = stream(n_actions)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.advantage(h)
        return self.value(h) + a - a.mean(dim=1, keepdim=True)


class QNetwork(nn.Module):
    """encoder -> head. ``forward(obs)`` returns the head's output: Q-values (B, n_actions), or for a
    distributional head the log-probabilities (B, n_actions, atoms). ``q_values(obs)`` always returns
    Q-values (the expectation for distributional heads): what acting and export use."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.distributional = hasattr(head, "q_values")

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        head = self.head
        if torch.is_grad_enabled() and type(head) is QHead and not has_hooks(head, head.q):
            # a quantized MLP and its linear Q-layer: one fused QAT training node (None: not quantized)
            fused = getattr(self.encoder, "fused_forward", None)
            if fused is not None and (y := fused(obs, head.q)) is not None:
                return y
        return head(self.encoder(obs))

    def q_values(self, obs: torch.Tensor) -> torch.Tensor:
        out = self(obs)
        return self.head.q_values(out) if self.distributional else out
