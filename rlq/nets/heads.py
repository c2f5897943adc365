"""Q-value heads and the encoder+head Q-network used by the DQN family."""
from __future__ import annotations

import torch
from torch import nn


class QHead(nn.Module):
    """A linear layer from features to one Q-value per action."""

    def __init__(self, in_dim: int, n_actions: int):
        super().__init__()
        self.q = nn.Linear(in_dim, n_actions)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.q(h)


class DuelingHead(nn.Module):
    """Wang et al. 2016: Q(s, a) = V(s) + A(s, a) - mean_a A(s, a), with separate value and advantage
    streams (``hidden`` units each, 0 for a single linear layer per stream)."""

    def __init__(self, in_dim: int, n_actions: int, hidden: int = 0):
        super().__init__()

        def stream(out: int) -> nn.Module:
            if hidden:
                return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out))
            return nn.Linear(in_dim, out)

        self.value = stream(1)
        self.advantage = stream(n_actions)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.advantage(h)
        return self.value(h) + a - a.mean(dim=1, keepdim=True)


class QNetwork(nn.Module):
    """encoder -> head. ``forward(obs)`` returns Q-values of shape (B, n_actions)."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(obs))
