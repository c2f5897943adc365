"""Fake-quantization autograd functions.

One rounding rule everywhere: ``torch.round`` (round half to even), the rule the integer deployment
(numpy ``rint``, C ``nearbyintf``) uses too. One quantization formula everywhere, with division by the
scale (not multiplication by its inverse), so that the integer deployment can reproduce it exactly::

    q     = clamp(round(x / s) + z, q_min, q_max)          # the integer code
    x_hat = (q - z) * s                                     # what the network computes with

``s`` and ``z`` broadcast against ``x`` (a scalar per tensor, or (C, 1, ...) per output channel). Each
function is a single ``autograd.Function``: fewer autograd nodes than composing round/clamp/STE ops,
which matters for the tiny networks of RL (see ``experiments/bench_qat.py``).
"""
from __future__ import annotations

import torch


class _FakeQuantSTE(torch.autograd.Function):
    """Fixed grid, clipped straight-through estimator (Bengio et al. 2013): the gradient passes where
    ``round(x / s) + z`` lies inside [q_min, q_max] and is 0 where the value was clamped."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, q_min: float, q_max: float):
        q = torch.round(x / scale) + zero_point
        inside = (q >= q_min) & (q <= q_max)
        ctx.save_for_backward(inside)
        return (q.clamp_(q_min, q_max) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, q_min: int,
               q_max: int) -> torch.Tensor:
    """``(clamp(round(x / s) + z, q_min, q_max) - z) * s`` with the clipped STE (no gradient to s, z)."""
    if not torch.is_tensor(zero_point):
        zero_point = torch.tensor(float(zero_point), dtype=x.dtype, device=x.device)
    return _FakeQuantSTE.apply(x, scale, zero_point, float(q_min), float(q_max))


class _TrustQuant(torch.autograd.Function):
    """Fixed grid, gradient only where the quantization error is within ``trust`` (QuEST's trust
    estimator, Panferov et al. 2025): elements that were clipped, or whose error exceeds the trust
    radius, get no gradient."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, q_min: float, q_max: float, trust):
        q = (torch.round(x / scale) + zero_point).clamp_(q_min, q_max)
        out = (q - zero_point) * scale
        ctx.save_for_backward((out - x).abs() <= trust)
        return out

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep, None, None, None, None, None


def trust_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int,
                trust: torch.Tensor) -> torch.Tensor:
    """Fake quantization with the trust-masked straight-through estimator."""
    return _TrustQuant.apply(x, scale, zero_point, float(q_min), float(q_max), trust)


class _LSQ(torch.autograd.Function):
    """Learned step size quantization (Esser et al. 2020) on the integer range [lo, hi] (= [q_min - z,
    q_max - z]): ``x_hat = s * clamp(round(x / s), lo, hi)``.

    Gradients: d x_hat / d x = 1 where lo <= x / s <= hi, else 0; d x_hat / d s = round(x/s) - x/s
    inside, lo or hi outside; the step-size gradient is multiplied by ``grad_scale`` (1/sqrt(N * Q_P))
    and summed to the shape of ``s`` (one step per tensor or per output channel)."""

    @staticmethod
    def forward(ctx, x, s, lo: float, hi: float, grad_scale: float):
        v = x / s
        q = torch.round(v).clamp_(lo, hi)
        inside = (v >= lo) & (v <= hi)
        ctx.save_for_backward(inside, torch.where(inside, q - v, q))
        ctx.s_shape, ctx.grad_scale = s.shape, grad_scale
        return q * s

    @staticmethod
    def backward(ctx, grad):
        inside, ds = ctx.saved_tensors
        grad_s = (grad * ds).sum_to_size(ctx.s_shape) * ctx.grad_scale
        return grad * inside, grad_s, None, None, None


def lsq_quant(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int, grad_scale: float) -> torch.Tensor:
    """LSQ fake quantization with a learnable ``step`` (see :class:`_LSQ`)."""
    return _LSQ.apply(x, step, float(lo), float(hi), float(grad_scale))


class _PACT(torch.autograd.Function):
    """PACT (Choi et al. 2018): ``y = clamp(x, 0, alpha)`` quantized on ``levels`` steps of
    ``alpha / levels``. d/dx = 1 where 0 <= x <= alpha; d/d alpha = 1 where x >= alpha (STE through
    the rounding), summed over elements."""

    @staticmethod
    def forward(ctx, x, alpha, levels: float):
        scale = alpha / levels
        q = torch.round(x / scale).clamp_(0.0, levels)
        ctx.save_for_backward((x >= 0) & (x <= alpha), x >= alpha)
        return q * scale

    @staticmethod
    def backward(ctx, grad):
        inside, above = ctx.saved_tensors
        return grad * inside, (grad * above).sum().reshape(1), None


def pact_quant(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """PACT activation quantization to unsigned ``bits`` with learnable clip ``alpha`` (shape (1,))."""
    return _PACT.apply(x, alpha, float(2 ** bits - 1))


# MSE-optimal clipping of a unit Gaussian for b bits (QuEST's OPTIMAL_GAUSSIAN_SCALES): clip at alpha_b * RMS
GAUSSIAN_MSE_CLIP = {1: 0.79788, 2: 1.49353, 3: 2.05107, 4: 2.51393, 5: 2.91609, 6: 3.27660, 7: 3.60105,
                     8: 3.88494}
