"""Fake-quantization autograd functions.

One rounding rule everywhere: ``torch.round`` (round half to even), the rule the integer deployment
(numpy ``rint``, C ``nearbyintf``) uses too. One quantization formula everywhere, with division by the
scale (not multiplication by its inverse), so that the integer deployment can reproduce it exactly::

    q     = clamp(round(x / s) + z, q_min, q_max)          # the integer code
    x_hat = (q - z) * s                                     # what the network computes with

``s`` and ``z`` broadcast against ``x`` (a scalar per tensor, or (C, 1, ...) per output channel).

Each estimator is written once, as a forward function (``*_fwd``: the fake-quant values and what its
backward needs) and a backward function (``*_bwd``). The single-quantizer autograd Functions below
(``fake_quant``, ``lsq_quant``, ``pact_quant``, ``trust_quant``) and the fused layer Function
(:class:`QuantLayerFn`: input quantizer + weight quantizer + matmul/convolution in one autograd node,
used by :class:`rlq.quant.QuantLinear` / :class:`rlq.quant.QuantConv2d` for their training forward)
call the same pieces, so the fused path computes exactly what the composed one does, with fewer
elementwise passes and far less per-op overhead (which is what QAT costs on the small networks of RL;
see ``experiments/bench_qat.py``).
"""
from __future__ import annotations

import torch

from rlq.quant import native

EPS = 1e-8      # smallest scale / step (learned steps and ranges are used as max(|p|, EPS))

# clip levels of the fixed-grid quantizer (``grid_fwd``)
NO_CLIP = 0     # the caller knows no value can leave the grid: no clamp, no mask (max-based weight scales)
CLAMP = 1       # clamp to the grid; no gradient mask needed
CLAMP_MASK = 2  # clamp and return the clipped-STE mask


# -- the estimators, forward and backward ------------------------------------------------------------
def grid_fwd(x: torch.Tensor, s, lo: float, hi: float, clip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fixed grid: ``clamp(round(x / s), lo, hi) * s`` (lo = q_min - z, hi = q_max - z) and, with
    ``clip=CLAMP_MASK``, the clipped-STE mask (where ``round(x / s)`` lies inside [lo, hi])."""
    if not torch.is_tensor(s) and (lb := native.usable(x)) is not None:
        return native.fq_grid(lb, x, s, lo, hi, clip != NO_CLIP, clip == CLAMP_MASK)
    q = (x / s).round_()  # (in place: one allocation, not two, per quantized tensor)
    if clip == NO_CLIP:
        return q.mul_(s), None
    if clip == CLAMP:
        return q.clamp_(lo, hi).mul_(s), None
    c = q.clamp(lo, hi)
    mask = c == q
    return c.mul_(s), mask


def lsq_fwd(x: torch.Tensor, s: torch.Tensor, lo: float, hi: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LSQ forward: ``(s * clamp(round(x / s), lo, hi), inside, d x_hat / d s)`` with inside = lo <= x/s <= hi
    and d x_hat / d s = round(x/s) - x/s inside, the bound outside. (``round(clamp(v)) == clamp(round(v))``
    for integer bounds; ``clamp(v) == v`` is ``lo <= v <= hi``.)"""
    v = x / s
    vc = v.clamp(lo, hi)
    inside = vc == v
    q = vc.round_()
    # d x_hat / d s written over v: -(v - q) is exactly q - v
    return q * s, inside, torch.where(inside, v.sub_(q).neg_(), q, out=v)


def lsq_bwd(grad: torch.Tensor, inside: torch.Tensor, ds: torch.Tensor, s_shape: torch.Size, grad_scale: float,
            inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ backward: (d/dx, d/ds summed to the step's shape and multiplied by ``grad_scale``).
    ``inplace``: ``grad`` is the caller's own tensor; the input gradient is written over it."""
    gs = (grad * ds).sum_to_size(s_shape) * grad_scale
    return (grad.mul_(inside) if inplace else grad * inside), gs


def step_chain(g_s: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Gradient of a raw learned parameter ``p`` used as ``s = max(|p|, EPS)`` (reshaped), from d/ds: what
    autograd's reshape, clamp_min and abs backward compute."""
    return torch.where(param.abs() >= EPS, g_s.reshape(param.shape), 0.0) * param.sgn()


def lsq_step_fwd(x: torch.Tensor, step: torch.Tensor, lo: float, hi: float
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """LSQ with the step given raw (``s = max(|step|, EPS)``; one step per row of ``x``, or one 0-d step for
    the tensor): (fake-quant values, what :func:`lsq_step_bwd` needs). The native loops keep only ``x`` and
    recompute ``x / s`` in the backward; the torch ops keep :func:`lsq_fwd`'s mask and d/ds."""
    if (lb := native.usable(x, step)) is not None:
        return native.fq_lsq(lb, x, step, EPS, lo, hi), (x,)
    s = step.abs().clamp_min(EPS)
    out, inside, ds = lsq_fwd(x, s.reshape((-1,) + (1,) * (x.dim() - 1)) if step.dim() else s, lo, hi)
    return out, (inside, ds)


def lsq_step_bwd(g: torch.Tensor, saved: tuple[torch.Tensor, ...], step: torch.Tensor, lo: float, hi: float,
                 grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/dx written over ``g``, d/d raw step) for :func:`lsq_step_fwd`."""
    if len(saved) == 1:  # the native forward
        return native.lsq_bwd(native.lib(), g, saved[0], step, EPS, lo, hi, grad_scale)
    s_shape = torch.Size((step.numel(),) + (1,) * (g.dim() - 1)) if step.dim() else torch.Size(())
    gx, gs = lsq_bwd(g, saved[0], saved[1], s_shape, grad_scale, inplace=True)
    return gx, step_chain(gs, step)


def pact_fwd(x: torch.Tensor, alpha: torch.Tensor, levels: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PACT forward: ``(round(clamp(x, 0, alpha) / (alpha / levels)) * alpha / levels, inside, above)``."""
    scale = alpha / levels
    q = torch.round(x / scale).clamp_(0.0, levels)
    return q * scale, (x >= 0) & (x <= alpha), x >= alpha


def pact_bwd(grad: torch.Tensor, inside: torch.Tensor, above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return grad * inside, (grad * above).sum().reshape(1)


def trust_fwd(x: torch.Tensor, s: torch.Tensor, zero_point, q_min: float, q_max: float, trust
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed grid with QuEST's trust mask: gradient only where ``|x_hat - x| <= trust``."""
    q = (torch.round(x / s) + zero_point).clamp_(q_min, q_max)
    out = (q - zero_point) * s
    return out, (out - x).abs() <= trust


# -- single-quantizer autograd Functions --------------------------------------------------------------
class _FakeQuantSTE(torch.autograd.Function):
    """Fixed grid, clipped straight-through estimator (Bengio et al. 2013): the gradient passes where
    ``round(x / s) + z`` lies inside [q_min, q_max] and is 0 where the value was clamped.
    Computed as ``clamp(round(x / s), q_min - z, q_max - z) * s`` (identical for integer z)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point: float, q_min: float, q_max: float, clip_grad: bool):
        out, inside = grid_fwd(x, scale, q_min - zero_point, q_max - zero_point, CLAMP_MASK if clip_grad else CLAMP)
        ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        if inside is not None:
            grad = grad * inside
        return grad, None, None, None, None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float, zero_point: float, q_min: int, q_max: int,
               clip_grad: bool = True) -> torch.Tensor:
    """``(clamp(round(x / s) + z, q_min, q_max) - z) * s`` with the clipped STE (no gradient to s, z).
    ``clip_grad=False``: a plain STE, for grids that never clip (max-based weight scales)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or torch.is_tensor(scale) and scale.requires_grad)):
        # no autograd graph (target network, acting): three in-place ops, no autograd.Function overhead
        z = float(zero_point)
        return grid_fwd(x, scale, q_min - z, q_max - z, CLAMP)[0]
    return _FakeQuantSTE.apply(x, scale, float(zero_point), float(q_min), float(q_max), bool(clip_grad))


class _TrustQuant(torch.autograd.Function):
    """Fixed grid, gradient only where the quantization error is within ``trust`` (QuEST's trust
    estimator, Panferov et al. 2025): elements that were clipped, or whose error exceeds the trust
    radius, get no gradient."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, q_min: float, q_max: float, trust):
        out, keep = trust_fwd(x, scale, zero_point, q_min, q_max, trust)
        ctx.save_for_backward(keep)
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
        out, inside, ds = lsq_fwd(x, s, lo, hi)
        ctx.save_for_backward(inside, ds)
        ctx.s_shape, ctx.grad_scale = s.shape, grad_scale
        return out

    @staticmethod
    def backward(ctx, grad):
        inside, ds = ctx.saved_tensors
        gx, gs = lsq_bwd(grad, inside, ds, ctx.s_shape, ctx.grad_scale)
        return gx, gs, None, None, None


def lsq_quant(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int, grad_scale: float) -> torch.Tensor:
    """LSQ fake quantization with a learnable ``step`` (see :class:`_LSQ`)."""
    return _LSQ.apply(x, step, float(lo), float(hi), float(grad_scale))


class _PACT(torch.autograd.Function):
    """PACT (Choi et al. 2018): ``y = clamp(x, 0, alpha)`` quantized on ``levels`` steps of
    ``alpha / levels``. d/dx = 1 where 0 <= x <= alpha; d/d alpha = 1 where x >= alpha (STE through
    the rounding), summed over elements."""

    @staticmethod
    def forward(ctx, x, alpha, levels: float):
        out, inside, above = pact_fwd(x, alpha, levels)
        ctx.save_for_backward(inside, above)
        return out

    @staticmethod
    def backward(ctx, grad):
        inside, above = ctx.saved_tensors
        gx, ga = pact_bwd(grad, inside, above)
        return gx, ga, None


def pact_quant(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """PACT activation quantization to unsigned ``bits`` with learnable clip ``alpha`` (shape (1,))."""
    return _PACT.apply(x, alpha, float(2 ** bits - 1))


# -- the fused layer ------------------------------------------------------------------------------------
class QuantLayerFn(torch.autograd.Function):
    """A whole fake-quant layer's training forward in one autograd node:
    ``y = op(act(x), wq(W)) + b`` with ``op`` the layer's matmul or convolution.

    ``layer`` is the :class:`rlq.quant.QuantLinear` / :class:`rlq.quant.QuantConv2d` itself: its input
    quantizer's ``train_fwd`` / ``train_bwd`` and its weight quantizer's ``train_fwd`` / ``train_bwd``
    provide the estimators (the same ``*_fwd`` / ``*_bwd`` functions as the single-quantizer
    Functions), its ``op_fwd`` / ``op_bwd`` the matmul or convolution and their gradients.
    ``a_param`` / ``w_param``: the raw learned input range (LSQ step, PACT alpha) and the raw LSQ weight
    steps (used as ``max(|p|, EPS)``; their gradients chain through that), or None; ``a_info``: the input quantizer's
    parameters for this batch (from ``ActQuantizer.train_info``). The fake-quant weights are handed to
    the weight quantizer's cache (``remember``) for the no-grad forwards that follow before the next
    optimizer step.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a_param, w_param, layer, a_info):
        need_x, need_w, _, need_a, need_s = ctx.needs_input_grad[:5]
        act, wquant = layer._q
        xq, a_saved = act.train_fwd(x, a_param, a_info, need_x or need_a)
        wq, w_saved = wquant.train_fwd(weight, w_param, need_w or need_s)
        wquant.remember(weight, wq)
        ctx.layer, ctx.has_bias, ctx.n_a, ctx.a_info = layer, bias is not None, len(a_saved), a_info
        ctx.save_for_backward(xq, wq, a_param, w_param, *a_saved, *w_saved)
        return layer.op_fwd(xq, wq, bias)

    @staticmethod
    def backward(ctx, grad):
        need_x, need_w, need_b, need_a, need_s = ctx.needs_input_grad[:5]
        xq, wq, a_param, w_param, *saved = ctx.saved_tensors
        n_a, layer = ctx.n_a, ctx.layer
        g_xq, g_wq, gb = layer.op_bwd(grad, xq, wq, need_x or need_a, need_w or need_s, need_b and ctx.has_bias)
        gx = ga = gw = gs = None
        act, wquant = layer._q
        if g_xq is not None:
            gx, ga = act.train_bwd(g_xq, saved[:n_a], ctx.a_info, a_param)
        if g_wq is not None:
            gw, gs = wquant.train_bwd(g_wq, saved[n_a:], w_param)
        return (gx if need_x else None, gw if need_w else None, gb, ga if need_a else None,
                gs if need_s else None, None, None)


class QuantMLPFn(torch.autograd.Function):
    """A chain of fake-quant linear layers, each optionally followed by a ReLU, in one autograd node.

    It computes what :class:`QuantLayerFn` computes layer by layer (observer update, input and weight
    quantizers with any of their estimators, matmul, and their gradients), and ReLU's own forward and
    backward (``threshold_backward`` on the ReLU's output), in the same order: values and gradients are the
    same bit for bit. What is saved is the per-node cost (one autograd node and one Python ``apply`` per
    layer and per ReLU, and the engine's work between them), paid once for the chain. Where a layer's
    input is a ReLU output on an EMA grid and the native loops run, its clipped-STE mask is not stored:
    the backward recomputes it from the saved ReLU output in the ReLU's own backward pass
    (``native.relu_grid_bwd``, the same values as the mask product followed by ``threshold_backward``).

    ``plan``: ``((layer, relu_after), ...)`` of :class:`rlq.quant.QuantLinear` layers
    (:class:`rlq.quant.layers.QuantSequential` checks that they can take this path, on training forwards
    only: the observers update as in a training forward, although a Function's forward itself runs without
    autograd); ``params``: per layer its weight, bias (or None), raw learned weight steps (LSQ, or
    None) and raw learned input range (LSQ step, PACT alpha, or None).
    """

    @staticmethod
    def forward(ctx, x, plan, *params):
        needs = ctx.needs_input_grad
        h, need_in, after_relu = x, needs[0], False
        tensors, layout = [], []
        for i, (layer, relu) in enumerate(plan):
            act, wquant = layer._q
            w, b, w_param, a_param = params[4 * i:4 * i + 4]
            need_in = need_in or needs[5 + 4 * i]  # the input's gradient: for x, or for the learned range
            info = act.train_info(h, grad_enabled=True)
            junction = after_relu and info[0] == "ema" and native.usable(h) is not None
            if junction:
                hq = native.fq_grid(native.lib(), h, info[1], info[2], info[3], info[4] != NO_CLIP, False)[0]
                a_saved = ()
            else:
                hq, a_saved = act.train_fwd(h, a_param, info, need_in)
            wq, w_saved = wquant.train_fwd(w, w_param, True)
            wquant.remember(w, wq)
            h = layer.op_fwd(hq, wq, b)
            if relu:
                h = torch.relu_(h)
            tensors += [hq, wq, *a_saved, *w_saved, *((h,) if relu else ())]
            layout.append((info, need_in, junction, len(a_saved), len(w_saved)))
            need_in, after_relu = True, relu
        ctx.plan, ctx.layout = plan, layout
        ctx.save_for_backward(*tensors, *params[2::4], *params[3::4])
        return h

    @staticmethod
    def backward(ctx, grad):
        saved, plan, layout, needs = ctx.saved_tensors, ctx.plan, ctx.layout, ctx.needs_input_grad
        n = len(plan)
        w_params, a_params = saved[len(saved) - 2 * n:len(saved) - n], saved[len(saved) - n:]
        chunks, k = [], 0  # the saved tensors of each layer
        for (_, relu), (_, _, _, n_a, n_w) in zip(plan, layout):
            m = 2 + n_a + n_w + relu
            chunks.append(saved[k:k + m])
            k += m
        grads = [None] * (4 * n)
        g, relu_done = grad, False
        for i in range(n - 1, -1, -1):
            (layer, relu), (info, need_in, junction, n_a, n_w), chunk = plan[i], layout[i], chunks[i]
            hq, wq = chunk[0], chunk[1]
            if relu and not relu_done:
                g = torch.ops.aten.threshold_backward(g, chunk[-1], 0)
            act, wquant = layer._q
            need_w, need_b, need_s, need_a = needs[2 + 4 * i:6 + 4 * i]
            g_hq, g_wq, gb = layer.op_bwd(g, hq, wq, need_in, need_w or need_s, need_b)
            if g_wq is not None:
                gw, gs = wquant.train_bwd(g_wq, chunk[2 + n_a:2 + n_a + n_w], w_params[i])
                grads[4 * i] = gw if need_w else None
                grads[4 * i + 2] = gs if need_s else None
            grads[4 * i + 1] = gb
            relu_done = junction
            if g_hq is None:
                g = None
            elif junction:  # this layer's input mask and the previous layer's ReLU backward, in one pass
                g = native.relu_grid_bwd(native.lib(), g_hq, chunks[i - 1][-1], info[1], info[2], info[3],
                                         info[4] != NO_CLIP)
            else:
                g, ga = act.train_bwd(g_hq, chunk[2:2 + n_a], info, a_params[i])
                grads[4 * i + 3] = ga if need_a else None
        return (g if needs[0] else None, None, *grads)


# MSE-optimal clipping of a unit Gaussian for b bits (QuEST's OPTIMAL_GAUSSIAN_SCALES): clip at alpha_b * RMS
GAUSSIAN_MSE_CLIP = {1: 0.79788, 2: 1.49353, 3: 2.05107, 4: 2.51393, 5: 2.91609, 6: 3.27660, 7: 3.60105,
                     8: 3.88494}
