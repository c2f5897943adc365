"""The fused native training step of an MLP Q-ensemble in bf16 (``ensemble_step.c``, compiled on first use).

At the Q-ensemble's CartPole size (N = 10 members of 4 -> 256 -> 256 -> 2, batch 64) the torch update with
bf16 products spends less than half its time in the products: weight and gradient casts, the elementwise ops
of the forward, loss and backward, autograd's bookkeeping and the per-member clip take the rest
(``experiments/results/bench_ensemble.md``, ``--profile``). :class:`NativeEnsembleStep` does all of it but
the optimizer in one call per update: every member's forward, the Huber loss at the taken actions against
given targets, the backward into the parameters' fp32 ``.grad`` buffers and each member's gradient-norm clip,
member after member (one member's weights and activations stay in L2 cache). :meth:`forward` does the
target's (and Double DQN's) forwards of any subset of members.

Numerics are those of ``agent.amp=bf16`` (bf16 operands, fp32 accumulation, fp32 parameters, gradients,
losses and targets); ``ensemble_step.c`` says exactly what is rounded where. Two instruction-set paths give
the same bits: ``avx512bf16`` (vdpbf16ps) and ``scalar`` (portable C that computes what vdpbf16ps computes).
The scalar path is for tests and CPUs without AVX512-BF16; it is slower than torch, so ``agent.native_step:
auto`` uses the native step only where the CPU has AVX512-BF16.

Building: as the fake-quant loops (``rlq.quant.native.build_native``: the system C compiler, ``-O3
-march=native``, the kernel cache); ``RLQ_ENSEMBLE_NATIVE=0`` disables it. :func:`status` says why it is not
available.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

SOURCE = Path(__file__).with_name("ensemble_step.c")
ABI = 2
ISAS = ("scalar", "avx512bf16")
MAX_LAYERS = 64  # (ensemble_step.c's per-call layer table)


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str]:
    """Build and load the library once per process: ``(library or None, status)``."""
    from rlq.quant.native import build_native
    lib, why = build_native(SOURCE, "rlq_ensemble_step", "RLQ_ENSEMBLE_NATIVE", ABI)
    if lib is None:
        return None, why
    vp, i64, f, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.rlq_ens_abi.restype, lib.rlq_ens_abi.argtypes = ci, []
    if lib.rlq_ens_abi() != ABI:
        return None, f"not used ({lib._name} has ABI {lib.rlq_ens_abi()}, need {ABI})"
    lib.rlq_ens_has_bf16.restype, lib.rlq_ens_has_bf16.argtypes = ci, []
    lib.rlq_ens_work_bytes.restype, lib.rlq_ens_work_bytes.argtypes = i64, [ci, vp, i64, ci]
    lib.rlq_ens_to_bf16.restype, lib.rlq_ens_to_bf16.argtypes = None, [ci, vp, i64, vp]
    lib.rlq_ens_forward.restype = ci
    lib.rlq_ens_forward.argtypes = [ci, ci, ci, vp, ci, vp, vp, vp, i64, vp, vp, vp]
    lib.rlq_ens_step.restype = ci
    lib.rlq_ens_step.argtypes = [ci, ci, ci, vp, vp, vp, vp, vp, i64, vp, vp, vp, vp, f, vp, vp, vp, vp]
    return lib, f"native ({Path(lib._name).name}; {', '.join(available_isas(lib))})"


def lib() -> ctypes.CDLL | None:
    """The loaded library, or None."""
    return _loaded()[0]


def status() -> str:
    """Whether the native step is available, with its instruction-set paths (or why not)."""
    return _loaded()[1]


def available_isas(lb: ctypes.CDLL | None = None) -> list[str]:
    lb = lb or lib()
    if lb is None:
        return []
    return ["scalar"] + (["avx512bf16"] if lb.rlq_ens_has_bf16() else [])


def _resolve(isa: str | None) -> tuple[ctypes.CDLL, str]:
    """The library and the instruction-set path ``isa`` (None: the best available), or a one-line error."""
    lb = lib()
    if lb is None:
        raise RuntimeError(f"the native ensemble step is not available: {status()}")
    have = available_isas(lb)
    isa = isa or have[-1]
    if isa not in ISAS:
        raise ValueError(f"isa={isa!r} is not an instruction-set path: choose one of {', '.join(ISAS)}")
    if isa not in have:
        raise RuntimeError(f"isa={isa!r} is not available on this CPU/build (available: {', '.join(have)})")
    return lb, isa


def to_bf16(x: torch.Tensor, isa: str = "scalar") -> torch.Tensor:
    """``x`` (float32) through the native step's bf16 conversion (round to nearest even, NaN kept, subnormals to
    signed zero), for tests."""
    lb, isa = _resolve(isa)
    src = x.float().contiguous()
    out = torch.empty(src.shape, dtype=torch.int16)
    lb.rlq_ens_to_bf16(ISAS.index(isa), src.data_ptr(), src.numel(), out.data_ptr())
    return out.view(torch.bfloat16)


def _ptrs(ts: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


class NativeEnsembleStep:
    """The fused step for an ensemble whose Q-network is a stack of ``EnsembleLinear`` layers with ReLUs
    between them (``EnsembleQNetwork`` over ``EnsembleMLPEncoder``; :func:`ensemble_linears` finds them).

    ``isa``: ``avx512bf16`` or ``scalar`` (default: the best this CPU and build have)."""

    def __init__(self, layers: list[nn.Module], isa: str | None = None):
        self.lib, self.isa = _resolve(isa)
        self._isa = ISAS.index(self.isa)
        self.n = layers[0].n
        self.dims = [layers[0].in_features] + [lin.out_features for lin in layers]
        if len(layers) > MAX_LAYERS:
            raise ValueError(f"the native ensemble step takes up to {MAX_LAYERS} layers, this network has {len(layers)}")
        for a, b in zip(layers[:-1], layers[1:]):
            if a.out_features != b.in_features or a.n != b.n:
                raise ValueError("the native ensemble step needs a chain of EnsembleLinear layers of one ensemble")
        self._dims = (ctypes.c_int64 * len(self.dims))(*self.dims)
        self._work: dict[tuple[int, int], torch.Tensor] = {}

    def _workspace(self, batch: int, step: int) -> torch.Tensor:
        w = self._work.get((batch, step))
        if w is None:
            nbytes = self.lib.rlq_ens_work_bytes(len(self.dims) - 1, self._dims, batch, step)
            w = self._work[(batch, step)] = torch.empty(nbytes + 64, dtype=torch.uint8)
        return w

    @staticmethod
    def _params(layers: list[nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ws, bs = [lin.weight for lin in layers], [lin.bias for lin in layers]
        for t in (*ws, *bs):
            if not (t.is_cpu and t.dtype is torch.float32 and t.is_contiguous()):
                raise ValueError("the native ensemble step needs contiguous float32 CPU parameters")
        return ws, bs

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1).float().contiguous()
        if x.shape[1] != self.dims[0]:
            raise ValueError(f"the ensemble's first layer takes {self.dims[0]} inputs, got observations of "
                             f"{x.shape[1]} values")
        return x

    def forward(self, layers: list[nn.Module], x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """``(k, B, A)`` fp32 Q-values of the selected members (all by default) for ``x (B, obs_dim)``."""
        ws, bs = self._params(layers)
        x = self._rows(x)
        b = x.shape[0]
        idx = None if members is None else members.to(torch.int64).contiguous()
        k = self.n if idx is None else int(idx.numel())
        out = torch.empty(k, b, self.dims[-1])
        rc = self.lib.rlq_ens_forward(self._isa, self.n, k, None if idx is None else idx.data_ptr(), len(ws), self._dims,
                                      _ptrs(ws), _ptrs(bs), b, x.data_ptr(), out.data_ptr(),
                                      self._workspace(b, 0).data_ptr() + 63 & ~63)
        if rc:
            raise ValueError(f"native ensemble forward: a member index is outside [0, {self.n}) or the batch is empty")
        return out

    def step(self, layers: list[nn.Module], obs: torch.Tensor, action: torch.Tensor, target: torch.Tensor,
             weights: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward, loss, backward and per-member clip (module docstring); the gradients are written into the
        layers' ``.grad`` (allocated here when missing). Returns ``(q (n, B), loss (n,), norms (n,))``: the
        taken actions' Q-values, each member's weighted mean Huber loss, and each member's gradient norm before
        clipping (``max_norm <= 0`` or infinite: no clipping)."""
        ws, bs = self._params(layers)
        for p in (*ws, *bs):
            if p.grad is None:
                p.grad = torch.empty_like(p)
        obs = self._rows(obs)
        b = obs.shape[0]
        act = action.to(torch.int64).contiguous()
        y, wt = target.float().contiguous(), weights.float().contiguous()
        if not act.numel() == y.numel() == wt.numel() == b:
            raise ValueError(f"native ensemble step: {b} observations but {act.numel()} actions, {y.numel()} targets "
                             f"and {wt.numel()} weights")
        q, loss, norms = torch.empty(self.n, b), torch.empty(self.n), torch.empty(self.n)
        rc = self.lib.rlq_ens_step(self._isa, self.n, len(ws), self._dims, _ptrs(ws), _ptrs(bs),
                                   _ptrs([p.grad for p in ws]), _ptrs([p.grad for p in bs]), b, obs.data_ptr(),
                                   act.data_ptr(), y.data_ptr(), wt.data_ptr(), float(max_norm), q.data_ptr(),
                                   loss.data_ptr(), norms.data_ptr(), self._workspace(b, 1).data_ptr() + 63 & ~63)
        if rc:
            raise ValueError(f"native ensemble step: an action is outside [0, {self.dims[-1]}) or the batch is empty")
        return q, loss, norms


def ensemble_linears(net: nn.Module) -> list[nn.Module] | None:
    """The ``EnsembleLinear`` chain of an MLP ``EnsembleQNetwork`` (encoder layers, then head layers), or None
    when the network is anything else (a CNN ensemble, fake-quant layers)."""
    from rlq.nets.ensemble import EnsembleLinear, EnsembleMLPEncoder, EnsembleQNetwork
    if not isinstance(net, EnsembleQNetwork) or not isinstance(net.encoder, EnsembleMLPEncoder):
        return None
    layers = [*net.encoder.layers, *net.head]
    if any(type(lin) is not EnsembleLinear for lin in layers):
        return None
    return layers
