"""Deployment of low-bit policies (``FORMAT.md``): policy files, a numpy reference backend and compiled CPU
kernels that run a whole policy in one native call, bit-exact with the reference. Imports numpy,
safetensors and ctypes only, never torch.

>>> policy = load_policy("pong.rlqp")          # backend="auto": cpu if a C compiler works, else reference
>>> policy.act(obs)                            # greedy actions (int64) or continuous actions (float32)
"""
from __future__ import annotations

import os
import warnings

from .format import PolicyFormatError, pack_int4, read_policy, save_policy, unpack_int4, validate
from .reference import Policy, ReferencePolicy

__all__ = ["load_policy", "save_policy", "read_policy", "validate", "PolicyFormatError", "Policy",
           "ReferencePolicy", "pack_int4", "unpack_int4", "BACKENDS"]

BACKENDS = ("auto", "cpu", "reference", "triton")


def load_policy(path: str | os.PathLike, backend: str = "auto", isa: str | None = None) -> Policy:
    """Read and validate a policy file and prepare it on a backend.

    ``backend``: ``"reference"`` (numpy), ``"cpu"`` (compiled C kernels; ``isa`` or ``$RLQ_DEPLOY_ISA``
    forces ``scalar``/``avx2``/``avx512vnni``), ``"auto"`` (cpu when a C compiler is available and the
    build works, else reference with a warning), ``"triton"`` (Triton kernels on a GPU, or on the CPU under
    ``TRITON_INTERPRET=1``; needs torch and triton, the only backend that imports torch)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported (allowed: {', '.join(BACKENDS)})")
    graph, tensors = read_policy(path)
    if backend == "triton":
        if isa is not None:
            raise ValueError("isa= applies to backend='cpu' (or 'auto'), not 'triton'")
        try:
            from .triton_backend import TritonPolicy
        except ImportError as e:
            raise ImportError(f"backend='triton' needs triton and torch (pip install \"rlq[triton]\"): {e}") from None
        return TritonPolicy(graph, tensors)
    if backend == "reference":
        if isa is not None:
            raise ValueError("isa= applies to backend='cpu' (or 'auto'), not 'reference'")
        return ReferencePolicy(graph, tensors)
    from .cpu import CpuPolicy, KernelBuildError, load_library

    try:
        lib = load_library()
    except KernelBuildError as e:
        if backend == "cpu":
            raise
        warnings.warn(f"rlq.deploy: CPU kernels unavailable ({e}); using the slow numpy reference backend",
                      RuntimeWarning, stacklevel=2)
        return ReferencePolicy(graph, tensors)
    return CpuPolicy(graph, tensors, isa=isa, library=lib)
