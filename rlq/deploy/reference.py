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
    """float32 activations -> integer codes (int32 array) in [0, 2^bits - 1] (a NaN gives 0)."""
    with np.errstate(over="ignore", invalid="ignore"):  # huge x / tiny scales clamp to the end codes
        q = np.rint(np.asarray(x, np.float32) / np.float32(scale)) + np.float32(zero_point)
    # clamp; fmax maps a NaN (a NaN observation) to code 0, as every backend does
    return np.minimum(np.fmax(q, np.float32(0)), np.float32(2 ** bits - 1)).astype(np.int32)


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


# -- deterministic float32 transcendental functions (FORMAT.md "rlq_exp and rlq_tanh") ----------------------
_F = np.float32


def rlq_exp(x: np.ndarray | float) -> np.ndarray:
    """FORMAT.md's ``rlq_exp``, one float32 numpy operation per step (no ``np.exp``); NaN gives NaN."""
    x = np.asarray(x, np.float32)
    nan = np.isnan(x)
    with np.errstate(invalid="ignore", over="ignore"):
        xc = np.clip(np.where(nan, _F(0), x), _F(-87.0), _F(88.0)).astype(np.float32)
        n = np.rint(xc * _F(1.44269504))
        r = (xc - n * _F(0.693359375)) - n * _F(-2.12194440e-4)
        p = np.full_like(r, _F(1.9875691500e-4))
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = p * r + _F(c)
        y = (p * (r * r) + r) + _F(1.0)
        scale = ((n.astype(np.int32) + 127) << 23).astype(np.int32).view(np.float32)  # 2^n, exact
        out = y * scale
    return np.where(nan, x, out).astype(np.float32)


def rlq_tanh(x: np.ndarray | float) -> np.ndarray:
    """FORMAT.md's ``rlq_tanh``: ``sign(x)`` for ``|x| > 9``, else ``(e - 1) / (e + 1)``, ``e = rlq_exp(2x)``."""
    x = np.asarray(x, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        e = rlq_exp(_F(2.0) * x)
        t = (e - _F(1.0)) / (e + _F(1.0))
    return np.where(np.abs(x) > _F(9.0), np.sign(x), t).astype(np.float32)


# -- the graph (FORMAT.md), executed with the integer math above ------------------------------------------
def _seq_sum(parts: list[np.ndarray]) -> np.ndarray:
    """float32 sum in index order (numpy's own reductions sum pairwise)."""
    s = parts[0]
    for p in parts[1:]:
        s = s + p
    return s


def _relu(y: np.ndarray) -> np.ndarray:
    return np.where(y > 0, y, _F(0)).astype(np.float32)


def quant_layer(node: dict, tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """One ``linear`` / ``conv2d`` node of a validated graph on a float32 batch."""
    from .format import weight_codes

    zp, bits = int(node["in_zero_point"]), int(node["in_bits"])
    q = quantize_input(x, _F(node["in_scale"]), zp, bits)
    w = weight_codes(node, tensors)
    name = node["name"]
    if node["op"] == "linear":
        acc = linear_acc(q, zp, w)
    else:
        kh, kw = node["kernel"]
        w4 = w.reshape(int(node["out_channels"]), int(node["in_channels"]), int(kh), int(kw))
        acc = conv2d_acc(q, zp, w4, tuple(node["stride"]), tuple(node["padding"]))
    y = dequantize(acc, tensors[f"{name}.out_scale"], tensors[f"{name}.bias"])
    return _relu(y) if node["relu"] else y


def dueling(value: np.ndarray, adv: np.ndarray) -> np.ndarray:
    """``(v + adv[a]) - mean``, the mean a float32 sum in index order divided by ``float32(A)``."""
    a = adv.shape[1]
    mean = _seq_sum([adv[:, i] for i in range(a)]) / _F(a)
    return ((value[:, :1] + adv) - mean[:, None]).astype(np.float32)


def c51(node: dict, tensors: dict[str, np.ndarray], ins: list[np.ndarray]) -> np.ndarray:
    """Expected value of the softmax over atoms, per action (FORMAT.md ``c51``)."""
    a, z = int(node["actions"]), int(node["atoms"])
    b = ins[0].shape[0]
    if node["dueling"]:
        value, adv = ins[0], ins[1].reshape(b, a, z)
        mean = _seq_sum([adv[:, i, :] for i in range(a)]) / _F(a)            # (B, atoms)
        logits = (value[:, None, :] + adv) - mean[:, None, :]
    else:
        logits = ins[0].reshape(b, a, z)
    m = logits.max(axis=2, keepdims=True)                                     # exact (NaN propagates)
    e = rlq_exp(logits - m)
    s = _seq_sum([e[:, :, i] for i in range(z)])                              # (B, A)
    support = tensors[f"{node['name']}.support"]
    return _seq_sum([(e[:, :, i] / s) * support[i] for i in range(z)]).astype(np.float32)


def tanh_bound(node: dict, tensors: dict[str, np.ndarray], mean: np.ndarray) -> np.ndarray:
    """``low + ((rlq_tanh(mean) + 1) * 0.5) * (high - low)``, left to right in float32."""
    low, high = tensors[f"{node['name']}.low"], tensors[f"{node['name']}.high"]
    t = rlq_tanh(mean)
    return (low + ((t + _F(1.0)) * _F(0.5)) * (high - low)).astype(np.float32)


def preprocess(graph: dict, obs: np.ndarray) -> np.ndarray:
    """``float32(obs) / float32(divide)`` (IEEE float32 division)."""
    return (np.asarray(obs).astype(np.float32) / _F(graph["preprocess"]["divide"])).astype(np.float32)


def run_graph(graph: dict, tensors: dict[str, np.ndarray], obs: np.ndarray,
              keep: bool = False) -> np.ndarray | dict[str, np.ndarray]:
    """Execute a validated graph on a batch ``(B, *observation.shape)`` of observations of its dtype.
    Returns the output ``(B, A)`` float32 (``q_values`` or ``action_mean``), or every node's output with
    ``keep=True``."""
    values: dict[str, np.ndarray] = {"obs": preprocess(graph, obs)}
    for node in graph["nodes"]:
        ins = [values[i] for i in node["inputs"]]
        op = node["op"]
        if op in ("linear", "conv2d"):
            out = quant_layer(node, tensors, ins[0])
        elif op == "flatten":
            out = ins[0].reshape(ins[0].shape[0], -1)
        elif op == "dueling":
            out = dueling(ins[0], ins[1])
        elif op == "c51":
            out = c51(node, tensors, ins)
        elif op == "tanh_bound":
            out = tanh_bound(node, tensors, ins[0])
        else:  # validate() rejects unknown ops
            raise ValueError(f"unknown op {op!r}")
        values[node["name"]] = out
    if keep:
        return values
    (name,) = graph["outputs"].values()
    return values[name]


# -- the Policy object (shared by every backend) ------------------------------------------------------------
class Policy:
    """A loaded policy file: ``act(obs)``, and ``q_values(obs)`` (``act == "argmax"``) or
    ``action_mean(obs)`` (``act == "identity"``). ``obs`` is one observation (``observation.shape``) or a
    batch ``(B, *observation.shape)``; a single observation gives unbatched results (a NumPy int64 scalar
    action, or ``(A,)`` arrays)."""

    backend: str = "reference"
    isa: str | None = None

    def __init__(self, graph: dict, tensors: dict[str, np.ndarray]):
        from .format import node_shapes

        self.graph = graph
        self.tensors = tensors
        self.observation_shape: tuple[int, ...] = tuple(int(s) for s in graph["observation"]["shape"])
        self.observation_dtype = np.dtype(graph["observation"]["dtype"])
        self.discrete = graph["act"] == "argmax"
        (self.output_name,) = graph["outputs"].keys()
        self.n_outputs = int(node_shapes(graph)[graph["outputs"][self.output_name]][0])

    def __repr__(self) -> str:
        isa = f", isa={self.isa!r}" if self.isa else ""
        return (f"{type(self).__name__}(backend={self.backend!r}{isa}, observation={list(self.observation_shape)} "
                f"{self.observation_dtype}, {self.output_name}={self.n_outputs})")

    # -- input checking ---------------------------------------------------------------------------------
    def _batch(self, obs) -> tuple[np.ndarray, bool]:
        """(contiguous batch of the observation dtype, whether ``obs`` was a single observation)."""
        a = np.asarray(obs)
        shape = self.observation_shape
        if a.shape == shape:
            single = True
            a = a.reshape((1,) + shape)
        elif a.ndim == len(shape) + 1 and a.shape[1:] == shape:
            single = False
        else:
            raise ValueError(f"observation shape {a.shape} does not match the policy's {shape} (one observation) "
                             f"or (B, {', '.join(map(str, shape))}) (a batch)")
        if a.dtype != self.observation_dtype:
            a = self._convert(a)
        return np.ascontiguousarray(a), single

    def _convert(self, a: np.ndarray) -> np.ndarray:
        if self.observation_dtype == np.uint8:
            if a.dtype.kind not in "uifb":
                raise ValueError(f"observations of this policy are uint8, got dtype {a.dtype}")
            if a.size and (a.dtype.kind == "f" and not np.array_equal(a, np.floor(a)) or a.min() < 0 or a.max() > 255):
                raise ValueError(f"observations of this policy are uint8: values must be integers in [0, 255] "
                                 f"(got dtype {a.dtype})")
            return a.astype(np.uint8)
        if a.dtype.kind not in "uifb":
            raise ValueError(f"observations of this policy are float32, got dtype {a.dtype}")
        return a.astype(np.float32)

    # -- outputs ------------------------------------------------------------------------------------------
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """(B, A) float32 output for a checked batch."""
        return run_graph(self.graph, self.tensors, batch)

    def _forward_act(self, batch: np.ndarray) -> np.ndarray:
        out = self._forward(batch)
        return np.argmax(out, axis=1).astype(np.int64) if self.discrete else out

    def act(self, obs) -> np.ndarray:
        """Greedy actions (int64, argmax policies) or actions (float32, continuous policies)."""
        batch, single = self._batch(obs)
        a = self._forward_act(batch)
        return a[0] if single else a

    def q_values(self, obs) -> np.ndarray:
        """(B, A) float32 Q-values (argmax policies)."""
        if not self.discrete:
            raise ValueError("this policy is continuous (act 'identity'): it has action_mean(), not q_values()")
        batch, single = self._batch(obs)
        out = self._forward(batch)
        return out[0] if single else out

    def action_mean(self, obs) -> np.ndarray:
        """(B, A) float32 actions (continuous policies, act 'identity')."""
        if self.discrete:
            raise ValueError("this policy is discrete (act 'argmax'): it has q_values(), not action_mean()")
        batch, single = self._batch(obs)
        out = self._forward(batch)
        return out[0] if single else out


class ReferencePolicy(Policy):
    """The numpy reference backend: the source of truth, not built for speed."""

    backend = "reference"
