"""Vectorized ensembles: N networks with stacked weights evaluated in one batched call (no Python loop over
members), the building block of Q-ensembles (REDQ, SAC-N / LB-SAC, ensemble DQN).

``EnsembleLinear(n, in, out)`` holds a ``(n, out, in)`` weight and a ``(n, out)`` bias and computes, for an input
``(B, in)`` shared by every member or ``(n, B, in)`` with one batch per member, ``(n, B, out)`` with one
``torch.baddbmm``. Each member is initialised like a separate ``nn.Linear`` (Kaiming-uniform weights, uniform
bias in ``±1/sqrt(in)``), so an ensemble of N starts as N independent networks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class EnsembleLinear(nn.Module):
    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        if n < 1:
            raise ValueError(f"an ensemble needs n >= 1 members, got {n}")
        self.n, self.in_features, self.out_features = int(n), int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(self.n, self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.n, self.out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        for i in range(self.n):  # as nn.Linear: kaiming_uniform(a=sqrt(5)) weights, uniform bias
            nn.init.kaiming_uniform_(self.weight[i], a=math.sqrt(5))
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # one batch shared by every member
            x = x.unsqueeze(0).expand(self.n, *x.shape)
        if x.dim() != 3 or x.shape[0] != self.n:
            raise ValueError(f"EnsembleLinear({self.n}) takes (B, {self.in_features}) or ({self.n}, B, "
                             f"{self.in_features}) inputs, got {tuple(x.shape)}")
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def member(self, i: int) -> nn.Linear:
        """Member ``i`` as a plain ``nn.Linear`` (a copy)."""
        lin = nn.Linear(self.in_features, self.out_features)
        with torch.no_grad():
            lin.weight.copy_(self.weight[i])
            lin.bias.copy_(self.bias[i])
        return lin

    def extra_repr(self) -> str:
        return f"n={self.n}, in_features={self.in_features}, out_features={self.out_features}"


class EnsembleMLP(nn.Module):
    """N ReLU MLPs ``in -> hidden... -> out`` with stacked weights: ``(B, in)`` or ``(n, B, in)`` -> ``(n, B, out)``."""

    def __init__(self, n: int, in_features: int, hidden: Sequence[int], out_features: int):
        super().__init__()
        self.n = int(n)
        layers: list[nn.Module] = []
        d = in_features
        for h in hidden:
            layers += [EnsembleLinear(n, d, h), nn.ReLU()]
            d = h
        layers.append(EnsembleLinear(n, d, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())
