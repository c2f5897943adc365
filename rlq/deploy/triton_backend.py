"""The Triton backend: the quantized layers of a policy file as Triton kernels (GPUs; on a CPU under
``TRITON_INTERPRET=1``, which is how the tests check it), bit-exact with the numpy reference.

Each ``linear`` / ``conv2d`` node is one kernel launch, :func:`_qgemm`: a tile of output rows x channels
quantizes its float32 inputs (``x / in_scale`` as an IEEE division, round half to even, ``+ zero_point``,
clamp, NaN to code 0), multiplies the centred codes with the int8 (or in-kernel unpacked int4) weights
and sums them in int32, then runs FORMAT.md's epilogue ``float32(acc) * out_scale + bias`` and the ReLU.
Kernels are launched with ``enable_fp_fusion=False`` so no multiply-add is contracted into an FMA. A
convolution is ``unfold`` (im2col, exact data movement on the device; padding with real 0.0 quantizes to
the zero point as FORMAT.md requires) followed by the same kernel. The float heads (dueling, C51's
expected value, tanh_bound: a few thousand flops on ``(B, A)`` outputs, the last nodes of a graph whose output
goes to the host anyway) run on the host with the reference's own functions, so their float32 operation order
(sums in index order, ``rlq_exp``/``rlq_tanh``) is FORMAT.md's by construction.

Rounding: :func:`_rint` is ``(x + 2^23) - 2^23`` (sign-matched), which rounds half to even through the
hardware's round-to-nearest-even add; it is valid in the interpreter (numpy float32) and on a GPU (no
fast-math, no fusion). libdevice's ``rint`` is not used: the interpreter cannot run ``extern_elementwise``.
Division is ``tl.math.div_rn`` (IEEE, correctly rounded; a plain ``/`` may lower to an approximate
``div.full.f32`` on NVIDIA GPUs). ``enable_fp_fusion=False`` is a launch option of the CUDA and HIP backends
(``CUDAOptions.enable_fp_fusion``; without it Triton 3.9 warns and fuses by default); the interpreter
ignores launch options, so the tests also check that the option still exists.

This module imports torch and triton (the rest of ``rlq.deploy`` imports neither); ``pip install
"rlq[triton]"``. It is written for correctness first: the int32 products are formed elementwise (a GPU
``tl.dot`` has no int8 x uint8 -> int32 mode for codes up to 255), not for peak GPU speed.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from .format import weight_codes
from .reference import Policy, c51, dueling, preprocess, tanh_bound

BLOCK_M, BLOCK_N, BLOCK_K = 16, 16, 32


@triton.jit
def _rint(x):
    """Round half to even for float32 (``|x| >= 2^23`` is already integral): adding and subtracting 2^23
    rounds to an integer with the hardware's round-to-nearest-even."""
    c = tl.where(x >= 0, 8388608.0, -8388608.0)
    r = (x + c) - c
    return tl.where(tl.abs(x) < 8388608.0, r, x)


@triton.jit
def _qgemm(X, W, OS, BIAS, Y, M, N, K, KW, stride_x, stride_y, in_scale, zp, zpi, qmax,
           RELU: tl.constexpr, INT4: tl.constexpr,
           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)   # row offsets: M * K passes 2^31 for big conv batches
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        xmask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(X + rm[:, None] * stride_x + rk[None, :], mask=xmask, other=0.0)
        q = _rint(tl.math.div_rn(x, in_scale)) + zp
        q = tl.where(q != q, 0.0, q)  # noqa: PLR0124  (NaN -> code 0, as the reference's fmax)
        q = tl.minimum(tl.maximum(q, 0.0), qmax)
        a = tl.where(xmask, q.to(tl.int32) - zpi, 0)
        wmask = (rn[:, None] < N) & (rk[None, :] < K)
        if INT4:
            byte = tl.load(W + rn[:, None] * KW + rk[None, :] // 2, mask=wmask, other=136).to(tl.int32)
            nib = tl.where(rk[None, :] % 2 == 0, byte & 15, (byte >> 4) & 15)
            w = nib - 8
        else:
            w = tl.load(W + rn[:, None] * KW + rk[None, :], mask=wmask, other=0).to(tl.int32)
        w = tl.where(wmask, w, 0)
        acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
    os_ = tl.load(OS + rn, mask=rn < N, other=0.0)
    bias = tl.load(BIAS + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * os_[None, :]
    y = y + bias[None, :]
    if RELU:
        y = tl.where(y > 0, y, 0.0)
    tl.store(Y + rm[:, None] * stride_y + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))


# Triton picks the interpreter when a kernel is decorated (at this module's import), not at launch
_INTERPRETED = type(_qgemm).__name__ == "InterpretedFunction"


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _INTERPRETED:
        return torch.device("cpu")
    set_late = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on")
    late = " (it was set after rlq.deploy.triton_backend was imported)" if set_late else ""
    raise RuntimeError("backend='triton' needs a CUDA GPU, or TRITON_INTERPRET=1 set before triton is imported to "
                       f"run its kernels on the CPU (slow; for tests){late}")


class TritonPolicy(Policy):
    """A policy whose quantized layers run as Triton kernels (see the module docstring)."""

    backend = "triton"

    def __init__(self, graph: dict, tensors: dict[str, np.ndarray]):
        super().__init__(graph, tensors)
        self.device = _device()
        self.layers: dict[str, dict] = {}
        for node in graph["nodes"]:
            if node["op"] not in ("linear", "conv2d"):
                continue
            name = node["name"]
            int4 = node["weight_format"] == "int4"
            w = tensors[f"{name}.weight"]
            if not int4:
                w = weight_codes(node, tensors)
            self.layers[name] = {
                "w": torch.as_tensor(np.ascontiguousarray(w)).to(self.device),
                "k": int(weight_codes(node, tensors).shape[1]),
                "os": torch.as_tensor(tensors[f"{name}.out_scale"]).to(self.device),
                "bias": torch.as_tensor(tensors[f"{name}.bias"]).to(self.device),
                "int4": int4,
            }

    def _layer(self, node: dict, x: torch.Tensor) -> torch.Tensor:
        L = self.layers[node["name"]]
        if node["op"] == "conv2d":
            kh, kw = node["kernel"]
            cols = torch.nn.functional.unfold(x, (kh, kw), padding=tuple(node["padding"]), stride=tuple(node["stride"]))
            a = cols.transpose(1, 2).reshape(-1, cols.shape[1]).contiguous()   # (B * L, C * kh * kw)
        else:
            a = x.contiguous()
        m, k = a.shape
        n = int(L["os"].shape[0])
        y = torch.empty((m, n), dtype=torch.float32, device=self.device)
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        _qgemm[grid](a, L["w"], L["os"], L["bias"], y, m, n, k, L["w"].shape[1], a.stride(0), y.stride(0),
                     float(np.float32(node["in_scale"])), float(node["in_zero_point"]), int(node["in_zero_point"]),
                     float(2 ** int(node["in_bits"]) - 1), RELU=bool(node["relu"]), INT4=L["int4"],
                     BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, enable_fp_fusion=False)
        if node["op"] == "conv2d":
            oh, ow = node["out_hw"]
            y = y.reshape(x.shape[0], oh * ow, n).transpose(1, 2).reshape(x.shape[0], n, oh, ow)
        return y

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, self.n_outputs), np.float32)
        values: dict[str, torch.Tensor | np.ndarray] = {
            "obs": torch.as_tensor(preprocess(self.graph, batch)).to(self.device)}

        def host(name: str) -> np.ndarray:
            v = values[name]
            return v.cpu().numpy() if torch.is_tensor(v) else v

        for node in self.graph["nodes"]:
            op, ins = node["op"], node["inputs"]
            if op in ("linear", "conv2d"):
                x = values[ins[0]]
                x = x if torch.is_tensor(x) else torch.as_tensor(x).to(self.device)
                out = self._layer(node, x)
            elif op == "flatten":
                x = values[ins[0]]
                out = x.reshape(x.shape[0], -1)
            elif op == "dueling":
                out = dueling(host(ins[0]), host(ins[1]))
            elif op == "c51":
                out = c51(node, self.tensors, [host(i) for i in ins])
            else:  # tanh_bound
                out = tanh_bound(node, self.tensors, host(ins[0]))
            values[node["name"]] = out
        (name,) = self.graph["outputs"].values()
        return np.ascontiguousarray(host(name), np.float32)
