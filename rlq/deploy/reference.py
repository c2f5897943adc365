"""Integer reference math of the deployed policies (numpy only, no torch): the source of truth that every
backend reproduces bit for bit.

Per quantized layer (see ``rlq.quant.IntegerLayer``)::

    q_x = clamp(rint(x / s_x) + z_x, 0, 2^b - 1)          float32 division, round half to even
    acc = sum_k (q_x[k] - z_x) * w[c, k]                   exact integer (int32 range)
    y   = float32(acc) * out_scale[c] + bias[c]            two float32 roundings, no fused multiply-add

``out_scale[c] = float32(s_x * s_w[c])`` is stored, not recomputed.
"""
from __future__ import annotations

import numpy as np


def quantize_input(x: np.ndarray, scale: np.float32, zero_point: int, bits: int) -> np.ndarray:
    """float32 activations -> integer codes (int32 array) in [0, 2^bits - 1]."""
    q = np.rint(np.asarray(x, np.float32) / np.float32(scale)) + np.float32(zero_point)
    return np.clip(q, 0, 2 ** bits - 1).astype(np.int32)


def linear_acc(q_x: np.ndarray, zero_point: int, weight: np.ndarray) -> np.ndarray:
    """int32 accumulators of a linear layer: (B, in) codes x (out, in) int8 weights -> (B, out)."""
    acc = (q_x.astype(np.int64) - zero_point) @ weight.astype(np.int64).T
    return _to_int32(acc)


def conv2d_acc(q_x: np.ndarray, zero_point: int, weight: np.ndarray, stride: tuple[int, int],
               padding: tuple[int, int] = (0, 0)) -> np.ndarray:
    """int32 accumulators of a convolution: (B, C, H, W) codes, (O, C, kh, kw) weights -> (B, O, H', W').
    Padding uses the zero point (the code of the real value 0)."""
    x = q_x.astype(np.int64) - zero_point
    ph, pw = padding
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    sh, sw = stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    cols = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]  # B,C,oh,ow,kh,kw
    cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(b, oh * ow, c * kh * kw)
    acc = cols @ weight.reshape(o, -1).astype(np.int64).T  # B, oh*ow, O
    return _to_int32(acc.transpose(0, 2, 1).reshape(b, o, oh, ow))


def dequantize(acc: np.ndarray, out_scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``float32(acc) * out_scale[c] + bias[c]`` along the channel axis (axis 1)."""
    shape = (1, -1) + (1,) * (acc.ndim - 2)
    y = acc.astype(np.float32) * np.asarray(out_scale, np.float32).reshape(shape)
    return (y + np.asarray(bias, np.float32).reshape(shape)).astype(np.float32)


def _to_int32(acc: np.ndarray) -> np.ndarray:
    if acc.size and (acc.max() > np.iinfo(np.int32).max or acc.min() < np.iinfo(np.int32).min):
        raise OverflowError("integer accumulator exceeds int32")
    return acc.astype(np.int32)
