"""Weight and activation quantizers: small modules holding the quantization state of one layer.

Weights: per-output-channel, symmetric, narrow range ``[-Q_P, Q_P]`` with ``Q_P = 2^(b-1) - 1`` (127 for
8 bits, 7 for 4, 1 for 2 bits = ternary), zero point 0. 1 bit (experimental) is binary ``{-s, +s}``.
Modes:

* ``max``   -- ``s_c = max_k |W[c, k]| / Q_P`` recomputed from the float ("shadow") weights at every
  forward; clipped STE (nothing is ever clipped, so a plain STE).
* ``lsq``   -- one learned step per channel (LSQ), initialised to ``2 mean|W_c| / sqrt(Q_P)`` when
  quantization starts, gradient scale ``1 / sqrt(N_c Q_P)``.
* ``quest`` -- MSE-optimal clipping of a Gaussian: ``s_c = alpha_b RMS(W_c) / Q_P`` with QuEST's
  ``alpha_b``, and QuEST's trust estimator (gradient only where ``|W_hat - W| <= trust * s / 2``).
  Without QuEST's Hadamard rotation (it cannot be folded across a ReLU into an integer kernel).

Activations: per-tensor, asymmetric unsigned ``[0, 2^b - 1]`` with a zero point (0 after a ReLU, where
the observed minimum is 0). An observer always tracks EMAs of the input's min, max and mean |x|
(updated on forward passes in training mode with autograd enabled, i.e. the online network's loss
forward -- never the target network's, never acting -- or during :func:`rlq.quant.calibrate`). Modes:

* ``ema``  -- scale and zero point from the EMA min/max (min clamped <= 0 <= max so 0 is exact).
* ``lsq``  -- learned step, initialised from the observer when quantization starts; the zero point is
  fixed then: 0 for non-negative inputs, ``2^(b-1)`` for signed ones (symmetric signed LSQ).
* ``pact`` -- learned clip ``alpha`` (init: the observed max) for non-negative inputs; a layer whose
  input is signed (e.g. a first layer on raw vector observations) falls back to ``ema``.

While ``enabled`` is False (before ``quant.start_step``) every quantizer is the identity but the
observers keep observing. Learned ranges are parameters; flags and observer statistics are plain
Python numbers (no tensor op per check on the hot path) kept in the module's *extra state*, so all of
it is saved in checkpoints, copied to a target network by ``load_state_dict`` and loaded by
evaluation. Scales are float32 values, so the exported scale is exactly the one used in training.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from rlq.quant import native
from rlq.quant.functions import (CLAMP, CLAMP_MASK, EPS, GAUSSIAN_MSE_CLIP, NO_CLIP, fake_quant, grid_fwd, lsq_quant,
                                 lsq_step_bwd, lsq_step_fwd, pact_bwd, pact_fwd, pact_quant, step_chain, trust_fwd,
                                 trust_quant)

WEIGHT_MODES = ("max", "lsq", "quest")
ACT_MODES = ("ema", "lsq", "pact")
_EPS = EPS


# Cache generation: bumped after every optimizer step anywhere. Fused optimizers (Adam(fused=True))
# update parameters without bumping their version counters, so a cached fake-quant weight of a trained
# parameter is only reused while both its version and this generation are unchanged. Parameters that do
# not require gradients (target networks, acting copies) change only through in-place copies
# (``load_state_dict``, Polyak's ``_foreach_lerp_``), which bump the version: their cache outlives
# optimizer steps, so a target network's weights are fake-quantized once per target update.
_GENERATION = [0]


def _bump_generation(*_args, **_kwargs) -> None:
    _GENERATION[0] += 1


register_optimizer_step_post_hook(_bump_generation)


def weight_qmax(bits: int) -> int:
    """Largest integer code of a narrow-range signed ``bits``-bit weight (1 for binary)."""
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


def f32(v: float) -> float:
    """``v`` rounded to the nearest float32 (scales are float32 numbers end to end)."""
    return float(np.float32(v))


class _StateMixin:
    """Flags and statistics as Python attributes, saved through ``get_extra_state``. They are set with
    ``object.__setattr__`` (``nn.Module.__setattr__`` costs several microseconds per assignment, and the
    observer assigns three numbers per training forward)."""

    _STATE: tuple[str, ...] = ()
    _PLAIN: frozenset[str] = frozenset()  # _STATE plus other plain attributes set on the hot path

    def __setattr__(self, name: str, value) -> None:
        if name in self._PLAIN:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def get_extra_state(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE}

    def set_extra_state(self, state: dict) -> None:
        for k in self._STATE:
            if k in state:
                setattr(self, k, type(getattr(self, k))(state[k]))


class WeightQuantizer(_StateMixin, nn.Module):
    """Per-output-channel symmetric fake quantization of a weight tensor (dim 0 = output channels)."""

    _STATE = ("enabled", "initialized")
    _PLAIN = frozenset(_STATE + ("_cache",))

    def __init__(self, bits: int, mode: str = "max", channels: int = 1, trust: float = 1.0):
        super().__init__()
        if mode not in WEIGHT_MODES:
            raise ValueError(f"unknown weight quantizer mode {mode!r}: choose one of {', '.join(WEIGHT_MODES)}")
        if bits not in range(1, 9):
            raise ValueError(f"weight bits must be in 1..8, got {bits}")
        self.bits, self.mode, self.trust = int(bits), mode, float(trust)
        self.q_max = weight_qmax(self.bits)
        self.enabled = False
        self.initialized = False
        self.step = nn.Parameter(torch.ones(channels)) if mode == "lsq" else None
        self._cache: tuple | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"

    def _shape(self, w: torch.Tensor) -> tuple[int, ...]:
        return (w.shape[0],) + (1,) * (w.dim() - 1)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """Per-channel scale, shaped to broadcast against ``w`` (detached for max/quest)."""
        if self.mode == "lsq":
            return self.step.abs().clamp_min(_EPS).reshape(self._shape(w))
        if self.bits > 1 and self.mode == "max":  # the default: max |w| per channel, no reshapes
            w, dims = (w.detach() if w.requires_grad else w), tuple(range(1, w.dim()))
            if w.numel() >= 1 << 16:  # large: max and -min read w twice but allocate nothing (2x faster)
                amax = torch.maximum(w.amax(dims, keepdim=True), w.amin(dims, keepdim=True).neg_())
            else:  # (vector_norm(inf, dim) and aminmax(dim) are 10x slower than either)
                amax = w.abs().amax(dims, keepdim=True)
            return amax.div_(self.q_max).clamp_min_(_EPS)
        if self.bits > 1 and (lb := native.usable(w)) is not None:  # quest (float rounding aside: same scales)
            return native.quest_scale(lb, w, GAUSSIAN_MSE_CLIP[self.bits], self.q_max, _EPS)
        flat = w.detach().reshape(w.shape[0], -1)
        if self.bits == 1:  # binary: s = mean |w| (XNOR-Net) or the Gaussian-optimal clip
            s = flat.abs().mean(1) if self.mode == "max" else GAUSSIAN_MSE_CLIP[1] * flat.pow(2).mean(1).sqrt()
        else:  # quest
            s = GAUSSIAN_MSE_CLIP[self.bits] * flat.pow(2).mean(1).sqrt() / self.q_max
        return s.clamp_min(_EPS).reshape(self._shape(w))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """Initialise learned steps from the current weights (LSQ: 2 mean|w| / sqrt(Q_P))."""
        if self.mode == "lsq" and not self.initialized:
            flat = w.detach().reshape(w.shape[0], -1)
            self.step.copy_((2 * flat.abs().mean(1) / math.sqrt(self.q_max)).clamp_min(_EPS))
        self.initialized = True

    def integer(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer codes as int8 with the weight's shape, per-channel float32 scale (C,))."""
        with torch.no_grad():
            s = self.scale(w)
            if self.bits == 1:
                q = torch.where(w >= 0, 1.0, -1.0)
            else:
                q = torch.round(w / s).clamp_(-self.q_max, self.q_max)
            return q.to(torch.int8), s.reshape(-1).float()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if not torch.is_grad_enabled():  # target net / acting: reuse while the weights are unchanged
            key = self._key(w)
            cache = self._cache
            if cache is not None and cache[0] == key:
                return cache[1]
            out = self._quant_nograd(w)
            self._cache = (key, out, w)
            return out
        self._cache = None
        return self._quant(w)

    def _key(self, w: torch.Tensor) -> tuple:
        """What identifies the weights a cached fake-quant copy was made from. The cache also holds ``w``
        itself, so its storage (and data pointer) cannot be reused by another tensor while cached; views
        (e.g. an ensemble's flattened weight) share the version counter of their base."""
        step = self.step
        trained = w.requires_grad or (step is not None and step.requires_grad)
        return (w.data_ptr(), w.shape, w.stride(), w._version, _GENERATION[0] if trained else None,
                None if step is None else step._version)

    def remember(self, w: torch.Tensor, w_hat: torch.Tensor) -> None:
        """Cache ``w_hat`` (the fake-quant weights computed by a fused training forward) for the
        no-grad forwards that follow before the next optimizer step."""
        self._cache = (self._key(w), w_hat.detach(), w)

    def _quant(self, w: torch.Tensor) -> torch.Tensor:
        """The composed training path (autograd through the single-quantizer Functions)."""
        s = self.scale(w)
        if self.bits == 1:  # sign with a clipped STE (gradient where |w| <= s)
            codes = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
            return codes * s + (w - w.detach()) * (w.abs() <= s)
        if self.mode == "lsq":
            return lsq_quant(w, s, -self.q_max, self.q_max, self._grad_scale(w))
        if self.mode == "quest":
            zero = torch.zeros((), dtype=w.dtype, device=w.device)
            return trust_quant(w, s, zero, -self.q_max, self.q_max, s * (0.5 * self.trust))
        # max-based scales never clip: a plain straight-through estimator
        return fake_quant(w, s, 0.0, -self.q_max, self.q_max, clip_grad=False)

    def _quant_nograd(self, w: torch.Tensor) -> torch.Tensor:
        """The same values as :meth:`_quant` without autograd bookkeeping (no masks)."""
        with torch.no_grad():
            if self.mode == "max" and self.bits > 1 and (lb := native.usable(w)) is not None:
                return native.fq_weight_max(lb, w, self.q_max, _EPS)[0]
            s = self.scale(w)
            if self.bits == 1:
                return torch.where(w >= 0, 1.0, -1.0).to(w.dtype).mul_(s)
            return grid_fwd(w, s, -self.q_max, self.q_max, NO_CLIP if self.mode == "max" else CLAMP)[0]

    def _grad_scale(self, w: torch.Tensor) -> float:
        """LSQ's step-gradient scale ``1 / sqrt(N_c Q_P)`` (N_c: weights per output channel)."""
        return 1.0 / math.sqrt(w.numel() // max(w.shape[0], 1) * self.q_max)

    # -- the fused layer's pieces (rlq.quant.functions.QuantLayerFn) ------------------------------------
    def train_param(self, w: torch.Tensor) -> torch.Tensor | None:
        """The parameter the fused layer's weight quantizer differentiates (LSQ's raw steps), or None."""
        return self.step if self.mode == "lsq" else None

    def train_fwd(self, w: torch.Tensor, step: torch.Tensor | None, need_grad: bool
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(fake-quant weights, tensors for :meth:`train_bwd`): the values of :meth:`_quant`."""
        if self.mode == "max" and self.bits > 1:  # never clipped: a plain STE, nothing to save
            if (lb := native.usable(w)) is not None:
                return native.fq_weight_max(lb, w, self.q_max, _EPS)[0], ()
            return grid_fwd(w, self.scale(w), -self.q_max, self.q_max, NO_CLIP)[0], ()
        if self.mode == "lsq" and self.bits > 1:
            return lsq_step_fwd(w, step, -self.q_max, self.q_max)
        s = self.scale(w).detach()
        if self.bits == 1:
            codes = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
            saved = ((w.abs() <= s, codes) if self.mode == "lsq" else (w.abs() <= s,)) if need_grad else ()
            return codes * s, saved
        trust = s * (0.5 * self.trust)  # quest
        if (lb := native.usable(w, s)) is not None:
            out, keep = native.fq_trust(lb, w, s, trust, -self.q_max, self.q_max)
        else:
            out, keep = trust_fwd(w, s, 0.0, -self.q_max, self.q_max, trust)
        return out, (keep,)

    def train_bwd(self, g: torch.Tensor, saved: tuple[torch.Tensor, ...], step: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d/dW, d/d raw step) from the gradient of the fake-quant weights (``g``, the fused layer's own
        tensor, is masked in place)."""
        if self.mode == "max" and self.bits > 1:
            return g, None
        if self.mode == "lsq" and self.bits > 1:
            return lsq_step_bwd(g, saved, step, -self.q_max, self.q_max, self._grad_scale(g))
        if self.bits == 1:
            gs = step_chain((g * saved[1]).sum_to_size(self._shape(g)), step) if self.mode == "lsq" else None
            return g * saved[0], gs
        return native.mask_mul(g, saved[0]), None  # quest


class ActQuantizer(_StateMixin, nn.Module):
    """Per-tensor asymmetric unsigned fake quantization of a layer's input, with an EMA observer."""

    _STATE = ("enabled", "initialized", "observed", "calibrating", "frozen", "signed_input", "min_val",
              "max_val", "mean_abs", "zero_point", "on_grid")
    _PLAIN = frozenset(_STATE + ("_qp",))

    def __init__(self, bits: int, mode: str = "ema", momentum: float = 0.99):
        super().__init__()
        if mode not in ACT_MODES:
            raise ValueError(f"unknown activation quantizer mode {mode!r}: choose one of {', '.join(ACT_MODES)}")
        if bits not in range(2, 9):
            raise ValueError(f"activation bits must be in 2..8, got {bits}")
        self.bits, self.mode, self.momentum = int(bits), mode, float(momentum)
        self.q_max = 2 ** self.bits - 1
        self.enabled = False
        self.initialized = False   # learned range set from the observer
        self.observed = False      # the observer has seen data
        self.calibrating = False   # observe regardless of mode / autograd (PTQ)
        self.frozen = False        # ranges fixed (PTQ): observer off
        self.signed_input = False  # set when learned ranges are initialised
        self.min_val = self.max_val = self.mean_abs = 0.0
        self.zero_point = 0.0      # lsq: fixed at init; ema: derived from the range; pact: 0
        self.on_grid = False       # inputs are known to be exact grid values (uint8 pixels / 255): identity
        self.step = nn.Parameter(torch.ones(())) if mode == "lsq" else None
        self.alpha = nn.Parameter(torch.ones(1)) if mode == "pact" else None
        self._qp: tuple = (None, None)  # (min, max) -> EMA (scale, zero point), the last one computed

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"

    # -- observer -------------------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> tuple[float, float]:
        """Update the statistics with a batch; returns the batch's (min, max)."""
        x = x.detach() if x.requires_grad else x
        lb = native.usable(x)
        lo, hi = native.minmax(lb, x) if lb is not None else (float(v) for v in torch.aminmax(x))
        need_abs = self.calibrating or (self.mode == "lsq" and not self.initialized)
        ma = float(x.abs().mean()) if need_abs else self.mean_abs
        if not self.observed:
            self.min_val, self.max_val, self.mean_abs = lo, hi, ma
            self.observed = True
        elif self.calibrating:  # calibration: the running min/max over all batches
            self.min_val, self.max_val = min(self.min_val, lo), max(self.max_val, hi)
            self.mean_abs += 0.1 * (ma - self.mean_abs)
        else:
            m = 1.0 - self.momentum
            self.min_val += m * (lo - self.min_val)
            self.max_val += m * (hi - self.max_val)
            self.mean_abs += m * (ma - self.mean_abs)
        return lo, hi

    @property
    def signed(self) -> bool:
        return self.min_val < 0

    @property
    def effective_mode(self) -> str:
        """The mode in use: PACT on a signed input falls back to the EMA range."""
        return "ema" if self.mode == "pact" and self.signed_input else self.mode

    # -- quantization parameters ------------------------------------------------------------------------
    def qparams(self) -> tuple[float, float]:
        """(scale, zero point) as Python floats (the scale a float32 value): what deployment uses."""
        mode = self.effective_mode
        if mode == "lsq":
            return f32(self.step.detach().abs().clamp_min(_EPS)), self.zero_point
        if mode == "pact":
            return f32(self.alpha.detach().abs().clamp_min(_EPS) / self.q_max), 0.0
        return self._ema_qparams()

    def _ema_qparams(self) -> tuple[float, float]:
        key = (self.min_val, self.max_val)
        if self._qp[0] == key:  # (a target network's ranges stay put between target updates)
            return self._qp[1]
        lo, hi = min(self.min_val, 0.0), max(self.max_val, 0.0)
        s = f32(max((hi - lo) / self.q_max, _EPS))
        qp = (s, float(min(max(round(-lo / s), 0), self.q_max)))
        self._qp = (key, qp)
        return qp

    @torch.no_grad()
    def init_from_observer(self) -> None:
        """Set learned ranges (LSQ step and zero point, PACT alpha) from the observed statistics."""
        if not self.observed:
            return
        self.signed_input = self.signed
        if self.mode == "lsq":
            self.zero_point = float(2 ** (self.bits - 1) if self.signed else 0)
            self.step.fill_(max(2 * self.mean_abs / math.sqrt(self.q_max - self.zero_point), _EPS))
        elif self.mode == "pact" and not self.signed:
            self.alpha.fill_(max(self.max_val, _EPS))
        self.initialized = True

    def set_range(self, lo: float, hi: float, on_grid: bool = False) -> None:
        """Fix the range to [lo, hi] (PTQ): the observer stops; learned ranges are set to match.
        ``on_grid``: the inputs are known to be exact grid values (e.g. uint8 pixels scaled by 1/255 on
        [0, 1] with 8 bits), so quantizing them is the identity and is skipped."""
        self.on_grid = bool(on_grid)
        self.min_val, self.max_val = float(lo), float(hi)
        self.mean_abs = max(abs(lo), abs(hi)) / 2
        self.observed = self.frozen = self.initialized = True
        self.signed_input = lo < 0
        with torch.no_grad():
            if self.mode == "lsq":
                z = 2 ** (self.bits - 1) if lo < 0 else 0
                self.zero_point = float(z)
                self.step.fill_(max(-lo / z if z else 0.0, hi / (self.q_max - z), _EPS))
            elif self.mode == "pact" and lo >= 0:
                self.alpha.fill_(max(hi, _EPS))

    def observe_if_training(self, x: torch.Tensor, grad_enabled: bool | None = None) -> tuple[float, float] | None:
        """Update the observer on a training forward (online loss forward) or during calibration;
        returns the batch's (min, max) when it observed. ``grad_enabled``: the autograd mode of the
        forward (default: the current one; a fused autograd Function's forward runs without it)."""
        if grad_enabled is None:
            grad_enabled = torch.is_grad_enabled()
        if not self.frozen and (self.calibrating or (self.training and grad_enabled)):
            return self.observe(x)
        return None

    def _lsq_grad_scale(self, x: torch.Tensor) -> float:
        """LSQ's step-gradient scale ``1 / sqrt(N_F Q_P)`` (N_F: features per sample)."""
        return 1.0 / math.sqrt(x.numel() // max(x.shape[0], 1) * (self.q_max - self.zero_point))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe_if_training(x)
        if not self.enabled or self.on_grid:
            return x
        if not self.initialized:
            self.init_from_observer()
        mode = self.effective_mode
        if mode == "lsq":
            z = self.zero_point
            if not torch.is_grad_enabled():  # target network / acting: the same values, no autograd node
                return lsq_step_fwd(x, self.step.detach(), -z, self.q_max - z)[0]
            return lsq_quant(x, self.step.abs().clamp_min(_EPS), -z, self.q_max - z, self._lsq_grad_scale(x))
        if mode == "pact":
            return pact_quant(x, self.alpha.abs().clamp_min(_EPS), self.bits)
        s, z = self._ema_qparams()
        return fake_quant(x, s, z, 0, self.q_max)

    # -- the fused layer's pieces (rlq.quant.functions.QuantLayerFn) ------------------------------------
    def train_info(self, x: torch.Tensor, grad_enabled: bool | None = None) -> tuple:
        """Observe a training batch and return this batch's quantization parameters for :meth:`train_fwd`:
        ``("id",)`` (inputs on the grid), ``("ema", s, lo, hi, clip)``, ``("lsq", lo, hi, grad_scale)``
        or ``("pact",)``. For the EMA grid, ``clip`` is ``NO_CLIP`` when the batch's observed min and max
        (with a margin far above float rounding) cannot round outside the grid: no clamp and no gradient
        mask are needed then, and the values are the same. ``grad_enabled``: as for
        :meth:`observe_if_training`."""
        rng = self.observe_if_training(x, grad_enabled)
        if self.on_grid:
            return ("id",)
        if not self.initialized:
            self.init_from_observer()
        mode = self.effective_mode
        if mode == "lsq":
            z = self.zero_point
            return ("lsq", -z, self.q_max - z, self._lsq_grad_scale(x))
        if mode == "pact":
            return ("pact",)
        s, z = self._ema_qparams()
        lo, hi = -z, self.q_max - z
        clip = CLAMP_MASK
        if rng is not None and lo - 0.499 < rng[0] / s and rng[1] / s < hi + 0.499:
            clip = NO_CLIP
        return ("ema", s, lo, hi, clip)

    def train_param(self) -> torch.Tensor | None:
        """The raw learned range the fused layer differentiates (LSQ step, PACT alpha), or None (also for
        inputs on the grid: the range is unused, and asking for its gradient would make the fused layer
        compute the input gradient of a first layer, e.g. a transposed convolution over Atari frames)."""
        if self.on_grid:
            return None
        mode = self.effective_mode
        return self.step if mode == "lsq" else self.alpha if mode == "pact" else None

    def train_fwd(self, x: torch.Tensor, param: torch.Tensor | None, info: tuple, need_grad: bool
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(fake-quant input, tensors for :meth:`train_bwd`): the values of :meth:`forward`."""
        kind = info[0]
        if kind == "ema":
            _, s, lo, hi, clip = info
            if clip == CLAMP_MASK and not need_grad:
                clip = CLAMP
            out, mask = grid_fwd(x, s, lo, hi, clip)
            return out, (() if mask is None else (mask,))
        if kind == "lsq":
            return lsq_step_fwd(x, param, info[1], info[2])
        if kind == "pact":
            out, inside, above = pact_fwd(x, param.abs().clamp_min(_EPS), float(self.q_max))
            return out, (inside, above)
        return x, ()

    def train_bwd(self, g: torch.Tensor, saved: tuple[torch.Tensor, ...], info: tuple, param: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d/dx, d/d raw learned range) from the gradient of the fake-quant input (``g``, the fused layer's
        own tensor, is masked in place)."""
        kind = info[0]
        if kind == "ema":
            if not saved:
                return g, None
            return native.mask_mul(g, saved[0]), None
        if kind == "lsq":
            return lsq_step_bwd(g, saved, param, info[1], info[2], info[3])
        if kind == "pact":
            gx, ga = pact_bwd(g, saved[0], saved[1])
            return gx, step_chain(ga, param)
        return g, None
