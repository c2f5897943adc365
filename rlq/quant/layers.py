"""Fake-quant layers. Each is a subclass of the layer it replaces (``QuantLinear`` is an ``nn.Linear``),
so :func:`rlq.quant.quantize_` can convert a module *in place*: the weight and bias parameters are the
same objects (optimizers keep working), their state-dict keys do not change, and the quantizers add
``act.*`` (input quantizer) and ``wq.*`` (weight quantizer) entries.

Forward (when enabled): ``y = op(act(x), wq(W)) + b`` -- the input and the weights are fake-quantized,
the bias and the output stay in float (the integer deployment dequantizes the int32 accumulator,
``y = float(acc) * (s_x * s_w[c]) + b[c]``). Activation functions stay outside the layer.

Hot paths. The training forward of ``QuantLinear`` (2-d inputs) and ``QuantConv2d`` is one autograd node
(:class:`rlq.quant.functions.QuantLayerFn`: input and weight quantizers, matmul or convolution, and
their gradients), with the same values and gradients as the composed path; a chain of ``QuantLinear`` and
ReLU layers (:class:`QuantSequential`, e.g. an MLP encoder, with a Q-network's linear head) is one autograd
node for the whole chain (:class:`rlq.quant.functions.QuantMLPFn`), again bit for bit. Forwards without autograd
(target networks, acting) reuse the weight quantizer's cached fake-quant weights while the weights are
unchanged (see ``WeightQuantizer``), so a target network's weights are quantized once per target update.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlq.nets.encoders import has_hooks
from rlq.nets.ensemble import EnsembleConv2d, EnsembleLinear
from rlq.nets.noisy import NoisyLinear
from rlq.quant.functions import QuantLayerFn, QuantMLPFn
from rlq.quant.quantizers import ActQuantizer, WeightQuantizer


class _QuantMixin:
    """Shared state: ``act`` (input quantizer) and ``wq`` (weight quantizer)."""

    act: ActQuantizer
    wq: WeightQuantizer

    def _init_quant(self, weight_bits: int, act_bits: int, weight_mode: str = "max", act_mode: str = "ema",
                    momentum: float = 0.99, trust: float = 1.0) -> None:
        channels = self.quant_weight().shape[0]
        self.act = ActQuantizer(act_bits, act_mode, momentum)
        self.wq = WeightQuantizer(weight_bits, weight_mode, channels, trust)
        dev = self.quant_weight().device
        self.act.to(dev), self.wq.to(dev)
        # the same two submodules as a plain attribute: a submodule lookup goes through nn.Module.__getattr__
        # (a Python function), and the hot paths below read them several times per forward
        self.__dict__["_q"] = (self.act, self.wq)

    def quant_weight(self) -> torch.Tensor:
        return self.weight

    def set_quant_enabled(self, enabled: bool) -> None:
        if enabled:
            self.wq.init_from(self.quant_weight())
            self.act.init_from_observer()
        self.act.enabled = self.wq.enabled = bool(enabled)

    @property
    def quant_enabled(self) -> bool:
        return self.wq.enabled

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused training forward (None: use the composed path). Frozen weights (e.g. critics held
        fixed during an actor loss) take their cached fake-quant copy instead."""
        (act, wq), w = self._q, self.weight
        if not (act.enabled and wq.enabled) or torch.is_autocast_enabled(x.device.type):
            return None
        if not w.requires_grad and (wq.step is None or not wq.step.requires_grad):
            with torch.no_grad():
                w_hat = wq.forward(w)
            return self.op_fwd(act.forward(x), w_hat, self.bias)
        info = act.train_info(x)
        # (the fake-quant weights are cached: the next no-grad forward, e.g. Double DQN's argmax, reuses them)
        return QuantLayerFn.apply(x, w, self.bias, act.train_param(), wq.train_param(w), self, info)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized input and weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 8,
                 act_bits: int = 8, **quant_kw):
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_quant(weight_bits, act_bits, **quant_kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act, wq = self._q
        if not (act.enabled or wq.enabled):  # before quant.start_step: a float layer; the observer observes
            act.observe_if_training(x)
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and x.dim() == 2:
            y = self._train_forward(x)
            if y is not None:
                return y
        # (the quantizers' forward called directly: Module.__call__ costs microseconds on this path)
        return F.linear(act.forward(x), wq.forward(self.weight), self.bias)

    def op_fwd(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def op_bwd(self, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, need_x: bool, need_w: bool, need_b: bool):
        return g @ w if need_x else None, g.t() @ x if need_w else None, g.sum(0) if need_b else None


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input and weights (zero padding maps to the zero point)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, weight_bits: int = 8, act_bits: int = 8,
                 quant_kw: dict | None = None, **conv_kw):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, **conv_kw)
        self._init_quant(weight_bits, act_bits, **(quant_kw or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act, wq = self._q
        if not (act.enabled or wq.enabled):  # before quant.start_step: a float layer; the observer observes
            act.observe_if_training(x)
            return self._conv_forward(x, self.weight, self.bias)
        if torch.is_grad_enabled() and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            y = self._train_forward(x)
            if y is not None:
                return y
        return self._conv_forward(act.forward(x), wq.forward(self.weight), self.bias)

    def op_fwd(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def op_bwd(self, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, need_x: bool, need_w: bool, need_b: bool):
        return torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]] if need_b else None, self.stride,
                                                   self.padding, self.dilation, False, [0, 0], self.groups,
                                                   [need_x, need_w, need_b])


class QuantNoisyLinear(_QuantMixin, NoisyLinear):
    """``NoisyLinear`` whose mean weights (the deployed weights) and input are fake-quantized; the noise
    term ``eps_out * (sigma (eps_in * x_hat))`` used during training is added in float."""

    def quant_weight(self) -> torch.Tensor:
        return self.weight_mu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        w = self.wq(self.weight_mu)
        if self.noisy:
            bias = self.bias_mu + self.bias_sigma * self.epsilon_out
            return F.linear(x, w, bias) + F.linear(x * self.epsilon_in, self.weight_sigma) * self.epsilon_out
        return F.linear(x, w, self.bias_mu)


class _QuantEnsembleMixin(_QuantMixin):
    """Ensemble layers (``rlq.nets.ensemble``): per-member per-output-channel weight scales (the stacked
    ``(n, out, ...)`` weight is quantized as ``n * out`` channels) and one activation range per layer input,
    shared by the members (the input of a first layer is the same observation for all of them)."""

    def quant_weight(self) -> torch.Tensor:
        return self.weight.flatten(0, 1)

    def ensemble_weight(self) -> torch.Tensor:
        return self.wq(self.quant_weight()).view_as(self.weight)

    def ensemble_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


class QuantEnsembleLinear(_QuantEnsembleMixin, EnsembleLinear):
    """``EnsembleLinear`` with fake-quantized input and weights."""


class QuantEnsembleConv2d(_QuantEnsembleMixin, EnsembleConv2d):
    """``EnsembleConv2d`` with fake-quantized input and weights."""


class QuantSequential(nn.Sequential):
    """An ``nn.Sequential`` of :class:`QuantLinear` layers and ReLUs (e.g. an MLP encoder) whose
    training forward is one autograd node (:class:`rlq.quant.functions.QuantMLPFn`) instead of one per
    layer and per ReLU: the same values and gradients, bit for bit, with the per-node costs paid once
    (on the 256-unit MLPs of RL those costs, not arithmetic, are most of what QAT adds to an update).

    :func:`rlq.quant.quantize_` converts such a Sequential in place (its children and state-dict keys do
    not change). Every other forward -- no autograd, quantization off, inputs that are not 2-d, autocast,
    frozen weights or learned ranges, hooks on a child -- runs the children one by one as
    ``nn.Sequential`` does. ``fuse = False`` (on the instance or the class) turns the fused path off.
    """

    fuse = True

    @staticmethod
    def can_fuse(children) -> bool:
        """Whether a Sequential's children fit the fused path's pattern: QuantLinear layers, each
        followed by at most one ReLU, the first child a layer."""
        prev = None
        for c in children:
            if type(c) is QuantLinear:
                prev = c
            elif type(c) is nn.ReLU and isinstance(prev, QuantLinear) and not c.inplace:
                prev = c
            else:
                return False
        return prev is not None

    def _plan(self) -> tuple | None:
        """``((layer, relu_after), ...)`` for the current children (None: they do not fit the pattern),
        cached while the children are the same modules."""
        children = tuple(self._modules.values())
        cached = self.__dict__.get("_fused_plan")
        if cached is not None and cached[0] == children:
            return cached[1]
        plan = None
        if self.can_fuse(children):
            plan = tuple((c, i + 1 < len(children) and type(children[i + 1]) is nn.ReLU)
                         for i, c in enumerate(children) if type(c) is QuantLinear)
        self.__dict__["_fused_plan"] = (children, plan)
        return plan

    def _hooked(self) -> bool:
        """Whether a hook (on this module, a child, or global) must see the children run."""
        return has_hooks(self, *self._modules.values())

    @staticmethod
    def _fusable_layer(layer: nn.Module) -> bool:
        """Whether a QuantLinear's training forward can be part of a fused chain now (quantization on, its
        weights and learned ranges trained: frozen ones take the layer's own path)."""
        act, wq = layer._q
        a_param = act.train_param()
        return (act.enabled and wq.enabled and layer.weight.requires_grad
                and (wq.step is None or wq.step.requires_grad) and (a_param is None or a_param.requires_grad))

    def fused_forward(self, x: torch.Tensor, tail: nn.Module | None = None) -> torch.Tensor | None:
        """The fused training forward of the children, then of ``tail`` (a QuantLinear the output feeds,
        e.g. a Q-head; its own hooks are the caller's to check), or None when this forward cannot take the
        fused path (then nothing has run)."""
        if not (self.fuse and torch.is_grad_enabled()) or x.dim() != 2 or torch.is_autocast_enabled(x.device.type):
            return None
        if (plan := self._plan()) is None or self._hooked():
            return None
        if tail is not None:
            if type(tail) is not QuantLinear:
                return None
            plan = plan + ((tail, False),)
        params = []
        for layer, _ in plan:
            if not self._fusable_layer(layer):
                return None
            params += [layer.weight, layer.bias, layer.wq.train_param(layer.weight), layer.act.train_param()]
        return QuantMLPFn.apply(x, plan, *params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused_forward(x)
        if y is not None:
            return y
        if self._hooked():
            return super().forward(x)
        for m in self._modules.values():  # (nn.Sequential's loop without Module.__call__ per child)
            x = m.forward(x)
        return x


QUANT_LAYERS = (QuantLinear, QuantConv2d, QuantNoisyLinear, QuantEnsembleLinear, QuantEnsembleConv2d)
QUANT_ENSEMBLE_LAYERS = (QuantEnsembleLinear, QuantEnsembleConv2d)
# float layer type -> its fake-quant subclass (most specific first: NoisyLinear is not an nn.Linear)
SWAPS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (NoisyLinear, QuantNoisyLinear), (nn.Linear, QuantLinear), (nn.Conv2d, QuantConv2d),
    (EnsembleLinear, QuantEnsembleLinear), (EnsembleConv2d, QuantEnsembleConv2d))
