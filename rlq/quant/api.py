"""The quantization API: ``QuantConfig``, ``quantize_``, ``calibrate`` (PTQ) and the integer view of a
quantized layer.

Rule for online and target networks (the agents follow it; see ``Agent.quantize``)
    Both networks are converted with the same config and hold fp32 "shadow" weights. Quantization is
    switched on for both at the same step (``quant.start_step``), so bootstrap targets come from the
    same fake-quantized function the deployed policy computes (QuaRL's quantization delay, then a
    quantized target). Quantizer state (learned steps, PACT clips, EMA ranges, the enabled flag) is
    part of each network's state dict: a hard target update copies it; a soft (Polyak) update averages
    the learned parameters with the weights and copies the observer buffers. Max-based weight scales
    are never stored: they are recomputed from the (averaged) shadow weights. Observers only update on
    the online network's loss forward, so the target network's ranges change only through updates.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from rlq.quant.layers import QUANT_ENSEMBLE_LAYERS, QUANT_LAYERS, SWAPS, QuantConv2d, QuantSequential
from rlq.quant.quantizers import ACT_MODES, WEIGHT_MODES, ActQuantizer, WeightQuantizer

CALIBRATION_METHODS = ("minmax", "percentile", "mse")


@dataclass
class QuantConfig:
    """How to quantize a network (the ``quant:`` config group).

    ``weight_bits`` / ``act_bits``: bits of weights and layer inputs; ``first_bits`` / ``last_bits``:
    override both for the first layer(s) (the ones reading the observation) and the last layer(s) (the
    ones producing the outputs), ``None`` to use the general bits. ``start_step``: when QAT starts -- a
    value below 1 is a fraction of ``total_steps``, 1 or more an env step (0: from the start).
    """

    name: str = "none"
    weight_bits: int = 8
    act_bits: int = 8
    first_bits: int | None = 8
    last_bits: int | None = 8
    weight_mode: str = "max"
    act_mode: str = "ema"
    momentum: float = 0.99
    trust: float = 1.0
    start_step: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    @classmethod
    def from_cfg(cls, cfg: Any) -> "QuantConfig":
        """From a config node / dict (unknown keys raise a one-line ValueError)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, QuantConfig):
            return cfg
        d = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown quant key(s) {bad}: valid keys are {sorted(known)}")
        q = cls(**d)
        q.validate()
        return q

    def validate(self) -> None:
        if self.weight_mode not in WEIGHT_MODES:
            raise ValueError(f"quant.weight_mode={self.weight_mode!r}: choose one of {', '.join(WEIGHT_MODES)}")
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"quant.act_mode={self.act_mode!r}: choose one of {', '.join(ACT_MODES)}")
        for key in ("weight_bits", "first_bits", "last_bits"):
            v = getattr(self, key)
            if v is not None and v not in range(1, 9):
                raise ValueError(f"quant.{key}={v}: weight bits must be an integer in 1..8")
        if self.act_bits not in range(2, 9):
            raise ValueError(f"quant.act_bits={self.act_bits}: activation bits must be an integer in 2..8")
        for key in ("first_bits", "last_bits"):
            v = getattr(self, key)
            if v is not None and v < 2:
                raise ValueError(f"quant.{key}={v}: first/last layers need >= 2 bits (their inputs use them too)")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"quant.momentum={self.momentum}: must be in [0, 1)")
        if self.start_step < 0:
            raise ValueError(f"quant.start_step={self.start_step}: must be >= 0 (a fraction below 1, or a step)")

    def start_at(self, total_steps: int) -> int:
        """The env step at which quantization switches on."""
        return int(round(self.start_step * total_steps)) if self.start_step < 1 else int(self.start_step)


def quant_layers(module: nn.Module) -> Iterator[nn.Module]:
    """Every fake-quant layer in ``module``."""
    return (m for m in module.modules() if isinstance(m, QUANT_LAYERS))


def _swap_target(m: nn.Module) -> type[nn.Module] | None:
    if isinstance(m, QUANT_LAYERS):
        return None
    for float_cls, quant_cls in SWAPS:
        if type(m) is float_cls:
            return quant_cls
    return None


def layer_roles(module: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None
                ) -> dict[int, set[str]]:
    """``{id(layer): {"first", "last"}}`` for the layers to be swapped.

    With example inputs the roles come from the autograd graph of one forward pass: a layer is *first*
    when no other layer precedes it on any path from the inputs, *last* when its output reaches a
    network output without passing through another layer (both streams of a dueling head are last).
    Without inputs: the first and last such layer in module order.
    """
    layers = [m for m in module.modules() if _swap_target(m) is not None or isinstance(m, QUANT_LAYERS)]
    roles: dict[int, set[str]] = {id(m): set() for m in layers}
    if not layers:
        return roles
    if example_inputs is None:
        roles[id(layers[0])].add("first")
        roles[id(layers[-1])].add("last")
        return roles
    inputs = (example_inputs,) if torch.is_tensor(example_inputs) else tuple(example_inputs)
    seen: dict[int, tuple[Any, Any]] = {}  # id(layer) -> (input grad_fn, output grad_fn)

    def hook(m, args, out):
        seen[id(m)] = (args[0].grad_fn if torch.is_tensor(args[0]) else None, out.grad_fn)

    params = [p for p in module.parameters()]
    saved_flags = [p.requires_grad for p in params]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            out = module(*inputs)
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, saved_flags):
            p.requires_grad_(f)
    layer_of_output = {fn: lid for lid, (_, fn) in seen.items() if fn is not None}

    def reached_layers(start_fns) -> set[int]:
        found, stack, visited = set(), [f for f in start_fns if f is not None], set()
        while stack:
            fn = stack.pop()
            if fn in visited:
                continue
            visited.add(fn)
            if fn in layer_of_output:
                found.add(layer_of_output[fn])
                continue
            stack.extend(nf for nf, _ in fn.next_functions if nf is not None)
        return found

    outs = [out] if torch.is_tensor(out) else [o for o in (out.values() if isinstance(out, dict) else out)
                                               if torch.is_tensor(o)]
    for lid in reached_layers([o.grad_fn for o in outs]):
        roles[lid].add("last")
    for lid, (in_fn, _) in seen.items():
        if not reached_layers([in_fn]):
            roles[lid].add("first")
    return roles


def quantize_(module: nn.Module, config: QuantConfig | Any,
              example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
              pixel_input: bool = False) -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` / ``NoisyLinear`` in ``module`` for its fake-quant
    subclass, in place (parameters keep their identity), and return ``module``. A no-op for
    ``quant=none``. Quantization starts disabled: call :func:`set_quant_enabled` (agents do this at
    ``quant.start_step``). ``example_inputs`` lets the first/last layers be found from the graph.
    ``pixel_input``: the first layers read uint8 pixels divided by 255 (the Nature CNN): their input
    grid is fixed to [0, 1] in 255 steps, so the codes are the pixels themselves (needs 8-bit inputs)."""
    config = QuantConfig.from_cfg(config)
    if not config.enabled:
        return module
    roles = layer_roles(module, example_inputs)
    kw = dict(weight_mode=config.weight_mode, act_mode=config.act_mode, momentum=config.momentum,
              trust=config.trust)
    for m in list(module.modules()):
        cls = _swap_target(m)
        if cls is None:
            continue
        wbits, abits = config.weight_bits, config.act_bits
        r = roles.get(id(m), set())
        if "first" in r and config.first_bits is not None:
            wbits, abits = config.first_bits, config.first_bits
        if "last" in r and config.last_bits is not None:
            wbits = config.last_bits
            if "first" not in r:  # a single-layer net keeps the first layer's input bits
                abits = config.last_bits
        m.__class__ = cls
        m._init_quant(wbits, abits, **kw)
        if pixel_input and "first" in r:
            if abits != 8:
                raise ValueError(f"pixel inputs need 8-bit first-layer activations, got {abits} "
                                 "(set quant.first_bits=8)")
            m.act.set_range(0.0, 1.0, on_grid=True)
    for m in module.modules():  # chains of QuantLinear + ReLU: one autograd node per training forward
        if type(m) is nn.Sequential and QuantSequential.can_fuse(m.children()):
            m.__class__ = QuantSequential
    return module


def set_quant_enabled(module: nn.Module, enabled: bool = True) -> int:
    """Switch fake quantization on (or off) in every quant layer; returns how many layers."""
    n = 0
    for m in quant_layers(module):
        m.set_quant_enabled(enabled)
        n += 1
    return n


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` has quant layers with quantization switched on."""
    return any(m.quant_enabled for m in quant_layers(module))


@torch.no_grad()
def _quant_layers_and_observations(net: nn.Module, observations: np.ndarray | torch.Tensor, what: str
                                   ) -> tuple[list[tuple[str, nn.Module]], torch.Tensor]:
    """The quant layers of ``net`` (name, module) in module order and the observations as a tensor, or the
    one-line ValueError that ``what`` (a PTQ function) raises when either is missing."""
    layers = [(name, m) for name, m in net.named_modules() if isinstance(m, QUANT_LAYERS)]
    if not layers:
        raise ValueError(f"{what}() needs a network converted with quantize_() (no quant layers found)")
    obs = torch.as_tensor(observations)
    if len(obs) == 0:
        raise ValueError(f"{what}() got no observations")
    return layers, obs


def calibrate(net: nn.Module, observations: np.ndarray | torch.Tensor, method: str = "minmax",
              percentile: float = 99.99, batch_size: int = 256, forward=None,
              max_samples: int = 1_000_000) -> dict[str, tuple[float, float]]:
    """Post-training quantization: set every activation range of a ``quantize_``-d network from
    observations (e.g. replay-buffer states), freeze the observers and switch quantization on.

    ``method``: ``minmax`` (observed extremes), ``percentile`` (the ``percentile``-th / (100 - p)-th
    percentiles), ``mse`` (the clip of [min, max] minimising the mean squared quantization error, a grid
    of 100 ratios). Ranges are measured with the float network (quantization off), layer inputs as
    the float network produces them. ``forward``: how to call the net (default ``net(obs)``).
    Returns ``{layer name: (min, max)}``.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    layers, obs = _quant_layers_and_observations(net, observations, "calibrate")
    layers = dict(layers)
    forward = forward or net
    set_quant_enabled(net, False)
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    per_batch = max(1, max_samples // max(1, math.ceil(len(obs) / batch_size)))
    gen = torch.Generator().manual_seed(0)

    def grab(name):
        def hook(m, args):
            x = args[0].detach().float().flatten()
            if x.numel() > per_batch:
                x = x[torch.randint(x.numel(), (per_batch,), generator=gen)]
            samples[name].append(x)
        return hook

    handles = [m.register_forward_pre_hook(grab(name)) for name, m in layers.items()]
    try:
        for i in range(0, len(obs), batch_size):
            forward(obs[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    ranges = {}
    for name, m in layers.items():
        if m.act.on_grid:  # pixel inputs: the grid is fixed, nothing to calibrate
            ranges[name] = (m.act.min_val, m.act.max_val)
            continue
        x = torch.cat(samples[name])
        lo, hi = _calibrated_range(x, m.act.q_max, method, percentile)
        m.act.set_range(lo, hi)
        ranges[name] = (lo, hi)
    set_quant_enabled(net, True)
    return ranges


def _channel_means(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Mean of a layer's output per output channel, shaped like its bias: ``(B, out)`` linear, ``(k, B, out)``
    ensemble linear, ``(B, C, H, W)`` convolution (``C = n * out`` member-major for an ensemble)."""
    y = y.detach().double()
    if isinstance(m, (QuantConv2d, *[t for t in QUANT_ENSEMBLE_LAYERS if t.__name__.endswith("Conv2d")])):
        return y.mean((0, 2, 3))
    if isinstance(m, QUANT_ENSEMBLE_LAYERS):  # ensemble linear: (k, B, out) -> (k, out)
        return y.mean(1)
    return y.reshape(-1, y.shape[-1]).mean(0)


def bias_correct(net: nn.Module, observations: np.ndarray | torch.Tensor, batch_size: int = 256,
                 forward=None) -> dict[str, float]:
    """Empirical bias correction of a post-training-quantized network (Nagel et al. 2019, "Data-Free
    Quantization Through Weight Equalization and Bias Correction", section 4.2, the empirical form): layer by
    layer in forward order, the mean output of every channel of the quantized network is set to the float
    network's on the observations, by adding the difference to the layer's bias. Quantization error that is
    systematic (an output channel moved the same way on every state) goes; what is left is zero-mean. Each
    layer is corrected with the earlier layers already corrected, so the shift they pass on is included.

    The bias is a float in the integer deployment as well (an int32 at the accumulator's scale), so the
    correction changes no grid and exports as any bias does. Call it after :func:`calibrate` (activation
    ranges set, quantization on); the quantizers' state is not touched. Returns ``{layer name: largest
    |correction|}``."""
    layers, obs = _quant_layers_and_observations(net, observations, "bias_correct")
    forward = forward or net
    was_training = net.training
    flags = [(m.act.enabled, m.wq.enabled) for _, m in layers]
    net.eval()

    def channel_means(targets: list[nn.Module], quant: bool) -> list[torch.Tensor]:
        for (_, m), (act_on, w_on) in zip(layers, flags):  # (the flags only: no quantizer re-initialisation)
            m.act.enabled, m.wq.enabled = act_on and quant, w_on and quant
        sums: list = [0.0] * len(targets)
        seen: list[torch.Tensor | None] = [None] * len(targets)

        def grab(j):
            def hook(m, args, y):
                seen[j] = _channel_means(m, y)
            return hook

        hooks = [m.register_forward_hook(grab(j)) for j, m in enumerate(targets)]
        try:
            with torch.no_grad():
                for i in range(0, len(obs), batch_size):
                    chunk = obs[i:i + batch_size]
                    seen[:] = [None] * len(targets)
                    forward(chunk)
                    sums = [acc if y is None else acc + y * len(chunk) for acc, y in zip(sums, seen)]
        finally:
            for h in hooks:
                h.remove()
        return [None if isinstance(acc, float) else acc / len(obs) for acc in sums]  # None: layer never ran

    corrections = {}
    try:
        biased = [(name, m, m.bias_mu if hasattr(m, "bias_mu") else m.bias) for name, m in layers]
        biased = [(name, m, b) for name, m, b in biased if b is not None]
        reference = channel_means([m for _, m, _ in biased], False)  # the float network, before any change
        for (name, m, bias), want in zip(biased, reference):
            if want is None:  # not on the path ``forward`` takes
                continue
            delta = (want - channel_means([m], True)[0]).reshape(bias.shape)
            with torch.no_grad():
                bias.add_(delta.to(bias.dtype))
            corrections[name] = float(delta.abs().max())
    finally:
        for (_, m), (act_on, w_on) in zip(layers, flags):
            m.act.enabled, m.wq.enabled = act_on, w_on
        net.train(was_training)
    return corrections


def _flat_outputs(out: Any) -> torch.Tensor:
    """A network's output(s) as one flat tensor (a SAC actor returns a tuple)."""
    if isinstance(out, (tuple, list)):
        return torch.cat([_flat_outputs(o) for o in out])
    return out.detach().float().flatten()


def equalize_(net: nn.Module, observations: np.ndarray | torch.Tensor, alpha: float = 0.5,
              forward=None, max_samples: int = 4096) -> dict[str, float]:
    """Cross-layer scaling of a **float** network before post-training quantization, in place: for each
    ``Linear -> ReLU -> Linear(s)`` pair, hidden unit ``j`` is divided by ``s_j`` in the producing layer (its
    weight row and bias) and multiplied back in every consuming layer (its weight column). ReLU is positively
    homogeneous, so the network computes the same function. The scales follow SmoothQuant (Xiao et al. 2023)
    / the cross-layer equalization of Nagel et al. 2019: ``s_j = max|h_j|^alpha / max|W_:,j|^(1 - alpha)``
    (activation maximum over the observations, weight maximum over the consumers' column ``j``), so hidden
    units with a large range stop setting a per-tensor activation grid that is too coarse for all the others;
    the producing layer's per-channel weight grid is unchanged by a row scale. ``alpha = 0`` equalizes the
    weights only, ``1`` the activations only.

    Consumers are found by tracing, not assumed: a ``Linear`` consumes a producer when its input is exactly the
    ReLU of that producer's output on the observations (so a dueling head's two streams are both found).
    Convolutions and ensemble layers are left as they are. The function is checked afterwards on the
    observations (relative error < 1e-4); if it changed, the original weights are restored and ValueError is
    raised. Call it on the float network, then :func:`quantize_` and :func:`calibrate`. Returns
    ``{producer name: largest scale / smallest scale}``."""
    if any(True for _ in quant_layers(net)):
        raise ValueError("equalize_() rescales a float network: call it before quantize_()")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"equalize_(alpha={alpha}) is out of range: choose 0 <= alpha <= 1")
    obs = torch.as_tensor(observations)[:max_samples]
    if len(obs) == 0:
        raise ValueError("equalize_() got no observations")
    forward = forward or net
    linears = [(name, m) for name, m in net.named_modules() if type(m) is nn.Linear]
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(m, args, y):
            ins[name], outs[name] = args[0].detach(), y.detach()
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in linears]
    try:
        with torch.no_grad():
            before = forward(obs)
    finally:
        for h in handles:
            h.remove()
    saved = {name: (m.weight.detach().clone(), m.bias.detach().clone() if m.bias is not None else None)
             for name, m in linears}
    mods = dict(linears)
    ratios = {}
    with torch.no_grad():
        for name, prod in linears:
            if name not in outs:
                continue
            h = outs[name].relu()
            consumers = [mods[c] for c, x in ins.items() if c != name and x.shape == h.shape and torch.equal(x, h)]
            if not consumers:
                continue
            amax = h.reshape(-1, h.shape[-1]).amax(0)
            wmax = torch.stack([c.weight.abs().amax(0) for c in consumers]).amax(0)
            live = (amax > 0) & (wmax > 0)  # dead units keep scale 1
            s = torch.ones_like(amax)
            s[live] = amax[live].pow(alpha) / wmax[live].pow(1.0 - alpha)
            s[live] = s[live] / s[live].log().mean().exp()  # geometric mean 1 (the grids are scale-free)
            prod.weight.div_(s[:, None])
            if prod.bias is not None:
                prod.bias.div_(s)
            for c in consumers:
                c.weight.mul_(s[None, :])
            ratios[name] = float(s[live].max() / s[live].min()) if bool(live.any()) else 1.0
        after = _flat_outputs(forward(obs))
        before = _flat_outputs(before)
        err = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
        if not err < 1e-4:
            for name, m in linears:
                m.weight.copy_(saved[name][0])
                if m.bias is not None:
                    m.bias.copy_(saved[name][1])
            raise ValueError(f"equalize_() would change this network's outputs (relative error {err:.2e}): a hidden "
                             "layer's ReLU output is also used by something other than Linear layers; weights restored")
    return ratios


def _calibrated_range(x: torch.Tensor, q_max: int, method: str, percentile: float) -> tuple[float, float]:
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if method == "percentile":
        k = torch.tensor([(100 - percentile) / 100, percentile / 100])
        sub = x if x.numel() <= 16_000_000 else x[:16_000_000]
        qlo, qhi = torch.quantile(sub, k).tolist()
        lo, hi = min(qlo, 0.0), max(qhi, 0.0)
    elif method == "mse":
        best, best_err = (lo, hi), math.inf
        for r in torch.linspace(0.05, 1.0, 100).tolist():
            clo, chi = lo * r, hi * r
            s = max((chi - clo) / q_max, 1e-8)
            z = min(max(round(-clo / s), 0), q_max)
            xq = (torch.round(x / s) + z).clamp(0, q_max).sub(z).mul(s)
            err = float((xq - x).pow(2).mean())
            if err < best_err:
                best, best_err = (clo, chi), err
        lo, hi = best
    return lo, hi


def copy_quant_state(target: nn.Module, source: nn.Module) -> None:
    """Copy the observer statistics and flags of every quantizer (not the learned parameters) from
    ``source`` to ``target``, two networks of the same structure (soft target updates use this)."""
    for t, s in zip(target.modules(), source.modules()):
        if isinstance(s, (ActQuantizer, WeightQuantizer)):
            t.set_extra_state(s.get_extra_state())


@dataclass
class IntegerLayer:
    """The integer view of one quantized layer -- exactly what the deployment computes:

    ``q_x = clamp(rint(x / in_scale) + in_zero_point, 0, 2^in_bits - 1)`` (float32 division),
    ``acc = sum_k (q_x - in_zero_point) * weight`` (int32), ``y = float32(acc) * out_scale + bias`` with
    ``out_scale = float32(in_scale * w_scale)`` per output channel.
    """

    kind: str                 # "linear" | "conv2d"
    weight: np.ndarray        # int8 codes, (out, in) or (out, in, kh, kw)
    w_scale: np.ndarray       # float32 (out,)
    weight_bits: int
    in_scale: np.float32
    in_zero_point: int
    in_bits: int
    bias: np.ndarray          # float32 (out,)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def out_scale(self) -> np.ndarray:
        return (np.float32(self.in_scale) * self.w_scale).astype(np.float32)


def integer_layer(layer: nn.Module) -> IntegerLayer:
    """Integer weights, scales and zero point of a fake-quant layer (quantization must be on)."""
    if not isinstance(layer, QUANT_LAYERS):
        raise TypeError(f"integer_layer() needs a quant layer, got {type(layer).__name__}")
    if isinstance(layer, QUANT_ENSEMBLE_LAYERS):
        raise ValueError(f"integer_layer(): a {type(layer).__name__} holds {layer.n} layers (an ensemble); export "
                         "folds a Q-ensemble into one network first (rlq.export)")
    if not layer.quant_enabled:
        raise ValueError("integer_layer(): quantization is off for this layer (enable it or calibrate first)")
    w = layer.quant_weight()
    q, s = layer.wq.integer(w)
    in_scale, in_zp = layer.act.qparams()  # python floats, the scale a float32 value
    bias = layer.bias_mu if hasattr(layer, "bias_mu") else layer.bias
    bias_np = np.zeros(w.shape[0], np.float32) if bias is None else bias.detach().float().cpu().numpy()
    conv = isinstance(layer, QuantConv2d)
    if conv and (layer.groups != 1 or tuple(layer.dilation) != (1, 1) or layer.padding_mode != "zeros"):
        raise ValueError("integer_layer(): only plain convolutions (groups=1, dilation=1, zero padding)")
    return IntegerLayer(
        kind="conv2d" if conv else "linear",
        weight=q.cpu().numpy(), w_scale=s.detach().cpu().numpy().astype(np.float32),
        weight_bits=layer.wq.bits, in_scale=np.float32(in_scale), in_zero_point=int(in_zp),
        in_bits=layer.act.bits, bias=bias_np,
        stride=tuple(layer.stride) if conv else (1, 1), padding=tuple(layer.padding) if conv else (0, 0))
