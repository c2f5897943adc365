"""Native fake-quantization loops for QAT on the CPU: ``fakequant.c``, compiled on first use.

The torch formulation of a fake-quant step is several elementwise ops, each a dispatch of a few microseconds
and a pass over the tensor; on the 256-unit MLPs of RL that per-op cost, not arithmetic, is what QAT adds to
a training step. These loops do each quantizer in one call (and one or two passes) with the same results as
the torch ops, bit for bit (see the C file: same float32 division, round half to even with signed zeros, NaN
handling, masks applied as products; tested in ``tests/test_quant.py``); only the LSQ step gradients and QuEST's RMS
weight scales, sums run in another order, agree to float rounding instead. ``rlq.quant.functions`` and the quantizers use
them for contiguous float32 CPU tensors and fall back to torch ops otherwise, or for large tensors when
torch has several threads (its ops then run in parallel).

Building: the system C compiler (as ``rlq.deploy.cpu``: ``$CC``, else ``cc``/``gcc``), flags
``-O3 -march=native -ffp-contract=off -fno-fast-math``, into the same kernel cache (``$RLQ_CACHE_DIR``, else
``~/.cache/rlq/kernels``) under a name that hashes the source, compiler, flags and this CPU's feature flags
(a cache shared by different machines never loads a build for another CPU), on x86-64 only. Nothing is
downloaded: the source ships with the package. No compiler (or a failing one), no C source, an unwritable
cache, another CPU architecture, or ``RLQ_QUANT_NATIVE=0``: the torch ops are used (same numbers, slower);
:func:`status` says which and why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fakequant.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-std=gnu11")
ABI = 5
PARALLEL_MIN = 1 << 18  # tensors at least this large use torch's ops when torch runs several threads

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status = "not loaded yet"


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_native(source: Path, prefix: str, env_var: str, abi: int) -> tuple[ctypes.CDLL | None, str]:
    """Compile ``source`` with :data:`FLAGS` (once per source, compiler, flags, ``abi`` and CPU feature flags) into
    the kernel cache as ``<prefix>_<hash>.so`` and load it. Returns ``(library, "")``, or ``(None, why)`` when
    ``$<env_var>=0``, the CPU is not x86-64, there is no (working) compiler, the source is missing or the cache
    is unwritable: the callers then use torch ops. Shared by the fake-quant loops and the fused ensemble step."""
    from rlq.deploy.cpu import KernelBuildError, _compile, cache_dir, compiler
    if os.environ.get(env_var, "1") == "0":
        return None, f"disabled ({env_var}=0)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"not built ({platform.machine()} is not x86-64)"
    cc = compiler()
    if cc is None:
        return None, "not built (no C compiler)"
    try:
        code = source.read_bytes()
    except OSError as e:  # (an installation without the C source)
        return None, f"not built (cannot read {source.name}: {e.strerror})"
    key = hashlib.sha256(b"\0".join([code, cc.encode(), " ".join(FLAGS).encode(), str(abi).encode(),
                                     _cpu_flags().encode()])).hexdigest()[:24]
    target = cache_dir() / f"{prefix}_{key}.so"
    try:
        if not target.is_file():
            _compile(cc, list(FLAGS), source, target)
        return ctypes.CDLL(str(target)), ""
    except (KernelBuildError, OSError) as e:
        return None, f"not built ({e})"


def _load() -> ctypes.CDLL | None:
    global _lib, _status
    lib, why = build_native(SOURCE, "rlq_fakequant", "RLQ_QUANT_NATIVE", ABI)
    if lib is None:
        _status = f"{why}: torch ops"
        return None
    target = Path(lib._name)
    vp, i64, f, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.rlq_fq_abi.restype, lib.rlq_fq_abi.argtypes = ci, []
    if lib.rlq_fq_abi() != ABI:
        _status = f"not used ({target} has ABI {lib.rlq_fq_abi()}, need {ABI}): torch ops"
        return None
    for name, args in (("rlq_minmax", [vp, i64, vp]),
                       ("rlq_fq_grid", [vp, i64, f, f, f, ci, vp, vp]),
                       ("rlq_fq_weight_max", [vp, i64, i64, f, f, vp, vp]),
                       ("rlq_fq_lsq", [vp, i64, i64, vp, f, f, f, vp]),
                       ("rlq_lsq_bwd", [vp, vp, i64, i64, vp, f, f, f, f, vp]),
                       ("rlq_mask_mul", [vp, vp, i64]),
                       ("rlq_relu_grid_bwd", [vp, vp, i64, f, f, f, ci]),
                       ("rlq_quest_scale", [vp, i64, i64, f, f, f, vp]),
                       ("rlq_fq_trust", [vp, i64, i64, vp, vp, f, f, vp, vp])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, args
    _status = f"native ({target.name})"
    return lib


def lib() -> ctypes.CDLL | None:
    """The loaded library, or None (torch ops are used)."""
    global _lib
    if _status == "not loaded yet":
        with _lock:
            if _status == "not loaded yet":
                _lib = _load()
    return _lib


def status() -> str:
    """Which implementation QAT uses (and why)."""
    lib()
    return _status


def usable(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library if every tensor is a contiguous float32 CPU tensor (the first one not empty, and not a large
    one while torch runs several threads), else None."""
    lb = _lib if _status != "not loaded yet" else lib()
    if lb is None:
        return None
    for t in tensors:
        if not (t.is_cpu and t.dtype is torch.float32 and t.is_contiguous()):
            return None
    n = tensors[0].numel()
    if n == 0 or (n >= PARALLEL_MIN and torch.get_num_threads() > 1):
        return None
    return lb


_mm_buf = threading.local()


def minmax(lb: ctypes.CDLL, x: torch.Tensor) -> tuple[float, float]:
    buf = getattr(_mm_buf, "buf", None)
    if buf is None:
        buf = _mm_buf.buf = (ctypes.c_float * 2)()
    lb.rlq_minmax(x.data_ptr(), x.numel(), buf)
    return buf[0], buf[1]


def fq_grid(lb: ctypes.CDLL, x: torch.Tensor, s: float, lo: float, hi: float, clamp: bool, mask: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = torch.empty_like(x)
    m = torch.empty(x.shape, dtype=torch.bool) if mask else None
    lb.rlq_fq_grid(x.data_ptr(), x.numel(), s, lo, hi, int(clamp), out.data_ptr(), None if m is None else m.data_ptr())
    return out, m


def fq_weight_max(lb: ctypes.CDLL, w: torch.Tensor, q_max: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(w)
    scale = torch.empty((w.shape[0],) + (1,) * (w.dim() - 1))
    lb.rlq_fq_weight_max(w.data_ptr(), w.shape[0], w.numel() // max(w.shape[0], 1), float(q_max), eps,
                         out.data_ptr(), scale.data_ptr())
    return out, scale


def fq_lsq(lb: ctypes.CDLL, x: torch.Tensor, step: torch.Tensor, eps: float, lo: float, hi: float) -> torch.Tensor:
    out = torch.empty_like(x)
    rows = step.numel()
    lb.rlq_fq_lsq(x.data_ptr(), rows, x.numel() // rows, step.data_ptr(), eps, lo, hi, out.data_ptr())
    return out


def lsq_bwd(lb: ctypes.CDLL, g: torch.Tensor, x: torch.Tensor, step: torch.Tensor, eps: float, lo: float, hi: float,
            grad_scale: float) -> torch.Tensor:
    """(d/dx, the raw step's gradient) from the forward's input ``x``; d/dx is ``g`` masked in place (a
    contiguous copy of ``g`` if it is not contiguous: the loop reads ``g`` and ``x`` in the same order)."""
    if not g.is_contiguous():
        g = g.contiguous()
    g_step = torch.empty_like(step)
    rows = step.numel()
    lb.rlq_lsq_bwd(g.data_ptr(), x.data_ptr(), rows, g.numel() // rows, step.data_ptr(), eps, lo, hi, grad_scale,
                   g_step.data_ptr())
    return g, g_step


def mask_mul(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``g * mask`` written over ``g`` (torch's ``mul_`` unless both are contiguous CPU tensors, g float32)."""
    lb = usable(g)
    if lb is None or not (mask.is_contiguous() and mask.is_cpu and mask.dtype is torch.bool
                          and mask.shape == g.shape):
        return g.mul_(mask)
    lb.rlq_mask_mul(g.data_ptr(), mask.data_ptr(), g.numel())
    return g


def relu_grid_bwd(lb: ctypes.CDLL, g: torch.Tensor, h: torch.Tensor, s: float, lo: float, hi: float, mask: bool
                  ) -> torch.Tensor:
    """The gradient at a ReLU output ``h`` from the gradient ``g`` of its fake-quantized copy (fixed grid
    ``s, lo, hi``; ``mask``: with the clipped STE's mask), written over ``g`` (both contiguous float32)."""
    lb.rlq_relu_grid_bwd(g.data_ptr(), h.data_ptr(), g.numel(), s, lo, hi, int(mask))
    return g


def quest_scale(lb: ctypes.CDLL, w: torch.Tensor, alpha: float, q_max: int, eps: float) -> torch.Tensor:
    """QuEST's per-output-channel scale ``max(alpha * rms(w[c]) / q_max, eps)``, shaped (C, 1, ...)."""
    scale = torch.empty((w.shape[0],) + (1,) * (w.dim() - 1))
    lb.rlq_quest_scale(w.data_ptr(), w.shape[0], w.numel() // max(w.shape[0], 1), alpha, float(q_max), eps,
                       scale.data_ptr())
    return scale


def fq_trust(lb: ctypes.CDLL, w: torch.Tensor, scale: torch.Tensor, trust: torch.Tensor, lo: float, hi: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fixed grid with QuEST's trust mask (``functions.trust_fwd`` with zero point 0)."""
    out = torch.empty_like(w)
    mask = torch.empty(w.shape, dtype=torch.bool)
    lb.rlq_fq_trust(w.data_ptr(), w.shape[0], w.numel() // max(w.shape[0], 1), scale.data_ptr(), trust.data_ptr(),
                    lo, hi, out.data_ptr(), mask.data_ptr())
    return out, mask
