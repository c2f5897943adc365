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
    ``round(x / s) + z`` lies inside [q_min, q_max] and is 0 where the value was clamped.
    Computed as ``clamp(round(x / s), q_min - z, q_max - z) * s`` (identical for integer z)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point: float, q_min: float, q_max: float, clip_grad: bool):
        q = torch.round(x / scale)
        c = q.clamp(q_min - zero_point, q_max - zero_point)
        ctx.clip_grad = clip_grad
        if clip_grad:
            ctx.save_for_backward(c == q)
        return c * scale

    @staticmethod
    def backward(ctx, grad):
        if ctx.clip_grad:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None, None, None, None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float, zero_point: float, q_min: int, q_max: int,
               clip_grad: bool = True) -> torch.Tensor:
    """``(clamp(round(x / s) + z, q_min, q_max) - z) * s`` with the clipped STE (no gradient to s, z).
    ``clip_grad=False``: a plain STE, for grids that never clip (max-based weight scales)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or torch.is_tensor(scale) and scale.requires_grad)):
        # no autograd graph (target network, acting): three in-place ops, no autograd.Function overhead
        z = float(zero_point)
        return torch.round(x / scale).clamp_(q_min - z, q_max - z).mul_(scale)
    return _FakeQuantSTE.apply(x, scale, float(zero_point), float(q_min), float(q_max), bool(clip_grad))


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


class _QuantLinearFn(torch.autograd.Function):
    """A whole fake-quant linear layer in one autograd node, for the common case of a fixed input grid
    (EMA range) and max-based weight scales: ``y = (clamp(round(x / s_x), -z, q_max - z) s_x)
    (round(W / s_w) s_w)^T + b``. Gradients: clipped STE for x, plain STE for W (never clipped).
    Computes exactly what the composed quantizers compute, with far fewer autograd nodes."""

    @staticmethod
    def forward(ctx, x, weight, bias, s_x: float, z_x: float, q_max_x: float, s_w):
        q = torch.round(x / s_x)
        c = q.clamp(-z_x, q_max_x - z_x)
        inside = c == q
        xq = c.mul_(s_x)
        wq = torch.round(weight / s_w).mul_(s_w)
        ctx.save_for_backward(xq, wq, inside)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(wq)
        y = torch.addmm(bias, xq, wq.t()) if bias is not None else xq @ wq.t()
        return y, wq

    @staticmethod
    def backward(ctx, grad, _grad_wq):
        xq, wq, inside = ctx.saved_tensors
        gx = (grad @ wq).mul_(inside) if ctx.needs_input_grad[0] else None
        gw = grad.t() @ xq if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None, None


def quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s_x: float, z_x: float,
                 q_max_x: int, s_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused fake-quant linear layer (2-d input; see :class:`_QuantLinearFn`): (output, fake-quant
    weights, the latter without gradient)."""
    return _QuantLinearFn.apply(x, weight, bias, float(s_x), float(z_x), float(q_max_x), s_w)


# MSE-optimal clipping of a unit Gaussian for b bits (QuEST's OPTIMAL_GAUSSIAN_SCALES): clip at alpha_b * RMS
GAUSSIAN_MSE_CLIP = {1: 0.79788, 2: 1.49353, 3: 2.05107, 4: 2.51393, 5: 2.91609, 6: 3.27660, 7: 3.60105,
                     8: 3.88494}
