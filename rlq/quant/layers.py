"""Fake-quant layers. Each is a subclass of the layer it replaces (``QuantLinear`` is an ``nn.Linear``),
so :func:`rlq.quant.quantize_` can convert a module *in place*: the weight and bias parameters are the
same objects (optimizers keep working), their state-dict keys do not change, and the quantizers add
``act.*`` (input quantizer) and ``wq.*`` (weight quantizer) entries.

Forward (when enabled): ``y = op(act(x), wq(W)) + b`` -- the input and the weights are fake-quantized,
the bias and the output stay in float (the integer deployment dequantizes the int32 accumulator,
``y = float(acc) * (s_x * s_w[c]) + b[c]``). Activation functions stay outside the layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlq.nets.ensemble import EnsembleConv2d, EnsembleLinear
from rlq.nets.noisy import NoisyLinear
from rlq.quant.functions import quant_linear
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


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized input and weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 8,
                 act_bits: int = 8, **quant_kw):
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_quant(weight_bits, act_bits, **quant_kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act, wq = self.act, self.wq
        if (wq.enabled and torch.is_grad_enabled() and x.dim() == 2 and act.initialized
                and act.effective_mode == "ema" and wq.mode == "max" and wq.bits > 1):
            # training forward of the default config: one fused autograd node (same numbers)
            act.observe_if_training(x)
            s_x, z_x = act.qparams()
            y, w_hat = quant_linear(x, self.weight, self.bias, s_x, z_x, act.q_max, wq.scale(self.weight))
            wq.remember(self.weight, w_hat)  # the next no-grad forward (e.g. Double DQN's argmax) reuses it
            return y
        return F.linear(act(x), wq(self.weight), self.bias)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input and weights (zero padding maps to the zero point)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, weight_bits: int = 8, act_bits: int = 8,
                 quant_kw: dict | None = None, **conv_kw):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, **conv_kw)
        self._init_quant(weight_bits, act_bits, **(quant_kw or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act(x), self.wq(self.weight), self.bias)


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


QUANT_LAYERS = (QuantLinear, QuantConv2d, QuantNoisyLinear, QuantEnsembleLinear, QuantEnsembleConv2d)
QUANT_ENSEMBLE_LAYERS = (QuantEnsembleLinear, QuantEnsembleConv2d)
# float layer type -> its fake-quant subclass (most specific first: NoisyLinear is not an nn.Linear)
SWAPS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (NoisyLinear, QuantNoisyLinear), (nn.Linear, QuantLinear), (nn.Conv2d, QuantConv2d),
    (EnsembleLinear, QuantEnsembleLinear), (EnsembleConv2d, QuantEnsembleConv2d))
