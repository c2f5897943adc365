"""Distributional (C51) value heads and the categorical projected Bellman target.

Papers
    Bellemare et al. 2017, "A Distributional Perspective on Reinforcement Learning" (C51, Algorithm 1);
    Hessel et al. 2018, "Rainbow" (dueling + distributional + noisy head, n-step targets).

The return distribution of each action is categorical on a fixed support of ``atoms`` equally spaced
values ``z_i = v_min + i * dz``, ``dz = (v_max - v_min) / (atoms - 1)``. :class:`CategoricalHead` gives
**log-probabilities** (B, n_actions, atoms); :func:`categorical_projection` projects the target
distribution ``reward + discount * z`` back onto the support, and :func:`categorical_loss` is the
per-sample cross-entropy (Rainbow's PER priority too).

A Rainbow agent, with ``net = QNetwork(encoder, CategoricalHead(...))``::

    log_p = net(obs)                                  # (B, A, atoms)
    q = net.head.q_values(log_p)                      # (B, A) -> argmax for acting
    with torch.no_grad():
        log_p_next = target(next_obs)                 # (B, A, atoms)
        a_star = online.head.q_values(online(next_obs)).argmax(1)   # double-Q (Rainbow)
        p_next = gather_actions(log_p_next, a_star).exp()           # (B, atoms)
        m = categorical_projection(p_next, batch.reward, batch.discount, net.head.support)
    loss_per_sample = categorical_loss(gather_actions(log_p, batch.action), m)   # (B,)
    loss = (batch.weights * loss_per_sample).mean(); priorities = loss_per_sample.detach()

``batch.reward`` is the n-step discounted return and ``batch.discount`` is ``gamma^k`` (0 after a
terminal), so the same projection serves every n.

Noisy layers: ``noisy=True`` makes every linear layer of the head a :class:`~rlq.nets.noisy.NoisyLinear`.
For noisy plain / dueling Q heads use ``rlq.nets.noisy.linear_factory(noisy, sigma0)`` as the
``linear=`` argument of ``QHead`` / ``DuelingHead`` (``make_linear`` builds a single layer); both are
re-exported here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlq.nets.noisy import NoisyLinear, linear_factory, make_linear

__all__ = ["CategoricalHead", "categorical_projection", "categorical_loss", "gather_actions",
           "make_linear", "linear_factory", "NoisyLinear"]


class CategoricalHead(nn.Module):
    """Features -> per-action categorical return distributions, as log-probabilities (B, A, atoms).

    ``dueling=False``: one stream producing A * atoms logits. ``dueling=True`` (Rainbow): a value stream
    (B, 1, atoms) and an advantage stream (B, A, atoms) combined as ``V + A - mean_a A`` on the logits,
    then log_softmax over atoms. Each stream is a single linear layer (``hidden=0``) or
    linear(hidden) -> ReLU -> linear. ``noisy=True``: every linear layer is a NoisyLinear(sigma0).
    The log_softmax is computed in float32 (or the logits' dtype if wider), whatever the layers' dtype.

    Buffer ``support`` (atoms,) = linspace(v_min, v_max, atoms); it is saved in the state dict.
    """

    def __init__(self, in_dim: int, n_actions: int, atoms: int = 51, v_min: float = -10.0, v_max: float = 10.0,
                 dueling: bool = False, hidden: int = 0, noisy: bool = False, sigma0: float = 0.5):
        super().__init__()
        if atoms < 2:
            raise ValueError(f"atoms must be >= 2, got {atoms}")
        if not v_max > v_min:
            raise ValueError(f"need v_max > v_min, got v_min={v_min}, v_max={v_max}")
        self.n_actions, self.atoms = int(n_actions), int(atoms)
        self.v_min, self.v_max = float(v_min), float(v_max)
        self.delta_z = (self.v_max - self.v_min) / (self.atoms - 1)
        self.dueling, self.noisy = bool(dueling), bool(noisy)
        self.register_buffer("support", torch.linspace(self.v_min, self.v_max, self.atoms))
        linear = linear_factory(noisy, sigma0)

        def stream(out: int) -> nn.Module:
            if hidden:
                return nn.Sequential(linear(in_dim, hidden), nn.ReLU(), linear(hidden, out))
            return linear(in_dim, out)

        if self.dueling:
            self.value = stream(self.atoms)
            self.advantage = stream(self.n_actions * self.atoms)
        else:
            self.logits = stream(self.n_actions * self.atoms)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b = h.shape[0]
        if self.dueling:
            v = self.value(h).view(b, 1, self.atoms)
            a = self.advantage(h).view(b, self.n_actions, self.atoms)
            logits = v + a - a.mean(dim=1, keepdim=True)
        else:
            logits = self.logits(h).view(b, self.n_actions, self.atoms)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return F.log_softmax(logits, dim=-1)

    def q_values(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Expected returns (B, A) = sum_i p_i z_i from log-probabilities (B, A, atoms)."""
        return (log_probs.exp() * self.support.to(log_probs.dtype)).sum(dim=-1)


def gather_actions(log_probs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Pick each sample's action distribution: (B, A, atoms), (B,) -> (B, atoms)."""
    idx = actions.long().view(-1, 1, 1).expand(-1, 1, log_probs.shape[-1])
    return log_probs.gather(1, idx).squeeze(1)


def categorical_projection(next_probs: torch.Tensor, reward: torch.Tensor, discount: torch.Tensor,
                           support: torch.Tensor) -> torch.Tensor:
    """C51 projection (Bellemare et al. 2017, Algorithm 1) of ``reward + discount * Z`` onto ``support``.

    ``next_probs`` (B, atoms): the next-state distribution of the bootstrap action; ``reward``,
    ``discount`` (B,) (or scalars); ``support`` (atoms,) equally spaced, v_min = support[0],
    v_max = support[-1]. Returns (B, atoms) target probabilities (rows sum to the rows of
    ``next_probs``, i.e. to 1).

    Tz_j = clamp(r + discount * z_j, v_min, v_max), b_j = (Tz_j - v_min) / dz, l = floor(b_j),
    u = ceil(b_j); atom l gets p_j (u - b_j) and atom u gets p_j (b_j - l). When b_j lands exactly on
    an atom (l == u) the whole p_j goes to it (weights computed as w_u = b - l, w_l = 1 - w_u, which
    equal u - b and b - l when u = l + 1 and give 1 and 0 when l == u). discount = 0 puts all mass at
    clamp(reward). Vectorised with two ``scatter_add_`` calls; computed in the promoted float dtype of
    the inputs (at least float32). Differentiable in ``next_probs``; call it under ``no_grad`` for a
    target.
    """
    if next_probs.dim() != 2:
        raise ValueError(f"next_probs must be (B, atoms), got shape {tuple(next_probs.shape)}")
    atoms = support.shape[0]
    if next_probs.shape[1] != atoms:
        raise ValueError(f"next_probs has {next_probs.shape[1]} atoms, support has {atoms}")
    dtype = torch.promote_types(next_probs.dtype, torch.float32)
    device = next_probs.device
    p = next_probs.to(dtype)
    z = support.to(device=device, dtype=dtype)
    r = torch.as_tensor(reward, device=device, dtype=dtype)
    d = torch.as_tensor(discount, device=device, dtype=dtype)
    r = r.reshape(-1, 1) if r.dim() else r
    d = d.reshape(-1, 1) if d.dim() else d
    v_min, v_max = z[0], z[-1]
    dz = (v_max - v_min) / (atoms - 1)
    tz = (r + d * z.unsqueeze(0)).clamp(v_min, v_max).expand_as(p)
    b = ((tz - v_min) / dz).clamp(0, atoms - 1)  # clamp guards against rounding just past the edges
    # a NaN target (a NaN reward) must give a NaN loss, not an out-of-range index: indices from NaN-free
    # positions, weights from the real ones (NaN where the target is NaN)
    safe = torch.nan_to_num(b, nan=0.0)
    lower = safe.floor()
    upper = safe.ceil()
    w_upper = b - lower
    w_lower = 1.0 - w_upper
    out = torch.zeros_like(p)
    out.scatter_add_(1, lower.long(), p * w_lower)
    out.scatter_add_(1, upper.long(), p * w_upper)
    return out


def categorical_loss(log_probs_taken: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy -sum_i m_i log p_i: (B, atoms), (B, atoms) -> (B,).

    ``target_probs`` is detached (it is a target). Use the result, weighted and averaged, as the loss and
    its detached values as PER priorities. Hessel et al. describe the priority as the KL divergence; it
    differs from this cross-entropy by the target's entropy (same gradient, slightly different
    priorities); Dopamine's and Kaixhin's Rainbow use the cross-entropy, as here.
    """
    return -(target_probs.detach().to(log_probs_taken.dtype) * log_probs_taken).sum(dim=-1)
