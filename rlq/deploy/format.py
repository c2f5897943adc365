"""The rlq low-bit policy file (``FORMAT.md``): writing, reading and validating it.

A policy file is a safetensors file whose header metadata holds the graph (``"rlq_policy"``, a JSON
string). :func:`validate` implements every check of FORMAT.md's "Validation" section; every problem
is reported as a one-line :class:`PolicyFormatError` that names the node, tensor or field and the
allowed values. Nothing here imports torch.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

__all__ = ["PolicyFormatError", "METADATA_KEY", "FORMAT_NAME", "FORMAT_VERSION", "MAX_ELEMENTS",
           "save_policy", "read_policy", "read_policy_bytes", "validate", "pack_int4", "unpack_int4",
           "weight_codes", "node_shapes"]

METADATA_KEY = "rlq_policy"
FORMAT_NAME = "rlq.policy"
FORMAT_VERSION = 1
MAX_ELEMENTS = 1 << 24          # per-observation size limit of any tensor of the graph (FORMAT.md)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

OPS = ("linear", "conv2d", "flatten", "dueling", "c51", "tanh_bound")
_QUANT_FIELDS = ("in_scale", "in_zero_point", "in_bits", "weight_bits", "weight_format", "relu")
FIELDS: dict[str, tuple[str, ...]] = {
    "linear": _QUANT_FIELDS + ("in_features", "out_features"),
    "conv2d": _QUANT_FIELDS + ("in_channels", "out_channels", "kernel", "stride", "padding", "in_hw", "out_hw"),
    "flatten": (),
    "dueling": (),
    "c51": ("actions", "atoms", "dueling"),
    "tanh_bound": (),
}
TOP_KEYS = ("format", "version", "observation", "preprocess", "nodes", "outputs", "act")
OUTPUT_KEYS = {"argmax": "q_values", "identity": "action_mean"}


class PolicyFormatError(ValueError):
    """A policy file or graph that does not follow FORMAT.md (one-line message)."""


# -- int4 packing --------------------------------------------------------------------------------------
def pack_int4(codes: np.ndarray) -> np.ndarray:
    """int codes in [-8, 7], shape (out, K) -> uint8 (out, ceil(K / 2)): byte j of row n holds
    ``w[n, 2j] + 8`` in its low nibble and ``w[n, 2j + 1] + 8`` in its high nibble (8 pads odd K)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack_int4 needs a 2-d (out, K) array, got shape {codes.shape}")
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    out, k = codes.shape
    padded = np.zeros((out, k + (k % 2)), np.int16)
    padded[:, :k] = codes
    u = (padded + 8).astype(np.uint8)
    return np.ascontiguousarray(u[:, 0::2] | (u[:, 1::2] << 4))


def unpack_int4(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: uint8 (out, ceil(K / 2)) -> int8 codes (out, K)."""
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.dtype != np.uint8 or packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4 needs uint8 (out, {(k + 1) // 2}), got {packed.dtype} {packed.shape}")
    nib = np.empty((packed.shape[0], 2 * packed.shape[1]), np.int8)
    nib[:, 0::2] = (packed & 0x0F).astype(np.int8)
    nib[:, 1::2] = (packed >> 4).astype(np.int8)
    return np.ascontiguousarray(nib[:, :k] - np.int8(8))


def weight_codes(node: dict[str, Any], tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The int8 weight codes (out, K) of a (validated) linear/conv2d node, unpacked from int4 if needed."""
    w = tensors[f"{node['name']}.weight"]
    if node["weight_format"] == "int4":
        return unpack_int4(w, _k_of(node))
    return w


def _k_of(node: dict[str, Any]) -> int:
    if node["op"] == "linear":
        return int(node["in_features"])
    return int(node["in_channels"]) * int(node["kernel"][0]) * int(node["kernel"][1])


# -- file I/O --------------------------------------------------------------------------------------------
def _canonical_graph(graph: Any) -> dict[str, Any]:
    """The graph as it will be read back (a JSON round trip); rejects non-JSON values."""
    try:
        text = json.dumps(graph, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PolicyFormatError(f"graph is not JSON-serializable: {str(e).splitlines()[0]}") from None
    return _parse_graph_json(text)


def save_policy(path: str | os.PathLike, graph: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Validate ``graph`` and ``tensors`` and write them as a policy file, atomically (a temporary
    file in the same directory, then ``os.replace``)."""
    graph = _canonical_graph(graph)
    if not isinstance(tensors, dict):
        raise PolicyFormatError(f"tensors must be a dict of name -> numpy array, got {type(tensors).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if not isinstance(name, str) or not isinstance(arr, np.ndarray):
            raise PolicyFormatError(f"tensor {name!r}: tensors must map str names to numpy arrays")
        arrays[name] = np.ascontiguousarray(arr)
    validate(graph, arrays)
    data = safetensors.numpy.save(arrays, metadata={METADATA_KEY: json.dumps(graph, allow_nan=False)})
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_policy(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and validate a policy file: ``(graph, tensors)``. Raises :class:`PolicyFormatError` for
    empty, truncated, corrupted, non-safetensors and foreign files, and for invalid graphs."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise PolicyFormatError(f"{path} is a directory, not a policy file") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"policy file not found: {path}") from None
    return read_policy_bytes(data, str(path))


def read_policy_bytes(data: bytes, source: str = "<bytes>") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """:func:`read_policy` on the bytes of a file (``source`` names it in error messages)."""
    header = _read_header(data, source)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise PolicyFormatError(f"{source} is a safetensors file without an rlq policy (no '{METADATA_KEY}' "
                                "entry in its metadata)")
    text = meta[METADATA_KEY]
    if not isinstance(text, str):
        raise PolicyFormatError(f"{source}: metadata '{METADATA_KEY}' is not a string")
    graph = _parse_graph_json(text)
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt data
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PolicyFormatError(f"{source}: corrupted safetensors data ({first})") from None
    validate(graph, tensors)
    return graph, tensors


def _read_header(data: bytes, source: str) -> dict[str, Any]:
    """Parse and sanity-check the safetensors header ourselves, for precise messages."""
    if len(data) == 0:
        raise PolicyFormatError(f"{source} is empty (0 bytes), not a policy file")
    if len(data) < 8:
        raise PolicyFormatError(f"{source} is truncated or not a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > MAX_HEADER_BYTES:
        raise PolicyFormatError(f"{source} is not a safetensors file (header length {n} is invalid)")
    if 8 + n > len(data):
        raise PolicyFormatError(f"{source} is truncated: its header needs {8 + n} bytes, the file has {len(data)}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise PolicyFormatError(f"{source} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise PolicyFormatError(f"{source} is not a safetensors file (its header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise PolicyFormatError(f"{source}: corrupted safetensors header (tensor {name!r} has no valid data_offsets)")
        end = max(end, offs[1])
    if 8 + n + end > len(data):
        raise PolicyFormatError(f"{source} is truncated: its tensors need {8 + n + end} bytes, the file has {len(data)}")
    return header


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _parse_graph_json(text: str) -> dict[str, Any]:
    try:
        graph = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise PolicyFormatError(f"'{METADATA_KEY}' is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(graph, dict):
        raise PolicyFormatError(f"'{METADATA_KEY}' must be a JSON object, got {type(graph).__name__}")
    return graph


# -- validation ------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool))


def _where(node: dict[str, Any] | None) -> str:
    if node is None:
        return "graph"
    return f"node {node.get('name')!r} ({node.get('op')})"


def _int_field(node: dict[str, Any], key: str, lo: int, hi: int | None = None) -> int:
    v = node[key]
    if not _is_int(v):
        raise PolicyFormatError(f"{_where(node)}: field '{key}' must be an integer, got {json.dumps(v)}")
    if v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise PolicyFormatError(f"{_where(node)}: field '{key}' = {v} is out of range (allowed: {rng})")
    return v


def _bool_field(node: dict[str, Any], key: str) -> bool:
    v = node[key]
    if not isinstance(v, bool):
        raise PolicyFormatError(f"{_where(node)}: field '{key}' must be true or false, got {json.dumps(v)}")
    return v


def _pair_field(node: dict[str, Any], key: str, lo: int) -> tuple[int, int]:
    v = node[key]
    if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)):
        raise PolicyFormatError(f"{_where(node)}: field '{key}' must be a list of two integers, got {json.dumps(v)}")
    if min(v) < lo:
        raise PolicyFormatError(f"{_where(node)}: field '{key}' = {v} is out of range (allowed: integers >= {lo})")
    return int(v[0]), int(v[1])


def _float32_field(node: dict[str, Any], key: str) -> np.float32:
    v = node[key]
    if not _is_num(v):
        raise PolicyFormatError(f"{_where(node)}: field '{key}' must be a number, got {json.dumps(v)}")
    with np.errstate(over="ignore"):
        f = np.float32(v)
    if not np.isfinite(f):
        raise PolicyFormatError(f"{_where(node)}: field '{key}' = {v} is not a finite float32 value")
    return f


def _size(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def _check_elements(node: dict[str, Any] | None, what: str, shape: tuple[int, ...]) -> None:
    if _size(shape) > MAX_ELEMENTS:
        raise PolicyFormatError(f"{_where(node)}: {what} of shape {list(shape)} has more than {MAX_ELEMENTS} "
                                "elements per observation")


def _tensor(tensors: dict[str, np.ndarray], used: set[str], node: dict[str, Any], suffix: str,
            dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    name = f"{node['name']}.{suffix}"
    if name not in tensors:
        raise PolicyFormatError(f"{_where(node)}: tensor '{name}' is missing")
    t = tensors[name]
    if not isinstance(t, np.ndarray):
        raise PolicyFormatError(f"tensor '{name}' is not a numpy array")
    if t.dtype != dtype:
        raise PolicyFormatError(f"tensor '{name}' has dtype {t.dtype}, expected {np.dtype(dtype)}")
    if tuple(t.shape) != tuple(shape):
        raise PolicyFormatError(f"tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
    if t.dtype == np.float32 and t.size and not np.isfinite(t).all():
        raise PolicyFormatError(f"tensor '{name}' has non-finite values (NaN or inf)")
    used.add(name)
    return t


def node_shapes(graph: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-observation output shape of "obs" and of every node of a validated graph."""
    shapes: dict[str, tuple[int, ...]] = {"obs": tuple(int(s) for s in graph["observation"]["shape"])}
    for node in graph["nodes"]:
        shapes[node["name"]] = _output_shape(node, [shapes[i] for i in node["inputs"]])
    return shapes


def _output_shape(node: dict[str, Any], ins: list[tuple[int, ...]]) -> tuple[int, ...]:
    op = node["op"]
    if op == "linear":
        return (int(node["out_features"]),)
    if op == "conv2d":
        return (int(node["out_channels"]), int(node["out_hw"][0]), int(node["out_hw"][1]))
    if op == "flatten":
        return (_size(ins[0]),)
    if op == "dueling":
        return ins[1]
    if op == "c51":
        return (int(node["actions"]),)
    return ins[0]  # tanh_bound


def validate(graph: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Every check of FORMAT.md's "Validation" section; raises :class:`PolicyFormatError` (one line)."""
    if not isinstance(graph, dict):
        raise PolicyFormatError(f"the graph must be a JSON object, got {type(graph).__name__}")
    for key in graph:
        if key not in TOP_KEYS and key != "meta":
            raise PolicyFormatError(f"graph: unknown key {key!r} (allowed: {', '.join(TOP_KEYS)}, meta)")
    for key in TOP_KEYS:
        if key not in graph:
            raise PolicyFormatError(f"graph: required key {key!r} is missing")
    if graph["format"] != FORMAT_NAME:
        raise PolicyFormatError(f"graph: format {json.dumps(graph['format'])} is not {FORMAT_NAME!r}")
    ver = graph["version"]
    if not _is_int(ver) or ver < 1:
        raise PolicyFormatError(f"graph: version {json.dumps(ver)} is invalid (supported: {FORMAT_VERSION})")
    if ver > FORMAT_VERSION:
        raise PolicyFormatError(f"graph: version {ver} is newer than this runtime supports ({FORMAT_VERSION}); "
                                "upgrade rlq")
    if "meta" in graph and not isinstance(graph["meta"], dict):
        raise PolicyFormatError("graph: 'meta' must be a JSON object")

    obs = graph["observation"]
    if not isinstance(obs, dict) or set(obs) != {"shape", "dtype"}:
        raise PolicyFormatError("graph: 'observation' must be an object with exactly the keys 'shape' and 'dtype'")
    if not (isinstance(obs["shape"], list) and obs["shape"] and all(_is_int(s) and s >= 1 for s in obs["shape"])):
        raise PolicyFormatError(f"graph: observation shape {json.dumps(obs['shape'])} must be a non-empty list of "
                                "positive integers")
    if obs["dtype"] not in ("uint8", "float32"):
        raise PolicyFormatError(f"graph: observation dtype {json.dumps(obs['dtype'])} is not supported "
                                "(allowed: uint8, float32)")
    _check_elements(None, "the observation", tuple(obs["shape"]))
    pre = graph["preprocess"]
    if not isinstance(pre, dict) or set(pre) != {"divide"}:
        raise PolicyFormatError("graph: 'preprocess' must be an object with exactly the key 'divide'")
    div = pre["divide"]
    with np.errstate(over="ignore"):
        div32 = np.float32(div) if _is_num(div) else np.float32("nan")
    if not (np.isfinite(div32) and div32 > 0):
        raise PolicyFormatError(f"graph: preprocess divide {json.dumps(div)} must be a positive finite float32 number")

    nodes = graph["nodes"]
    if not isinstance(nodes, list) or not nodes:
        raise PolicyFormatError("graph: 'nodes' must be a non-empty list")
    if not isinstance(tensors, dict):
        raise PolicyFormatError("tensors must be a dict of name -> numpy array")
    shapes: dict[str, tuple[int, ...]] = {"obs": tuple(obs["shape"])}
    used: set[str] = set()
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise PolicyFormatError(f"graph: nodes[{i}] is not a JSON object")
        name = node.get("name")
        if not isinstance(name, str) or not name:
            raise PolicyFormatError(f"graph: nodes[{i}] has no valid 'name' (a non-empty string)")
        if name == "obs" or name in shapes:
            raise PolicyFormatError(f"graph: node name {name!r} is {'reserved' if name == 'obs' else 'used twice'}")
        op = node.get("op")
        if not isinstance(op, str) or op not in FIELDS:
            raise PolicyFormatError(f"node {name!r}: unknown op {json.dumps(op)} (allowed: {', '.join(OPS)})")
        allowed = ("name", "op", "inputs") + FIELDS[op]
        for key in node:
            if key not in allowed:
                raise PolicyFormatError(f"{_where(node)}: unknown field {key!r} (allowed: {', '.join(allowed)})")
        for key in allowed:
            if key not in node:
                raise PolicyFormatError(f"{_where(node)}: required field {key!r} is missing")
        inputs = node["inputs"]
        if op == "c51":
            _bool_field(node, "dueling")
        n_in = 2 if op == "dueling" or (op == "c51" and node["dueling"]) else 1
        if not (isinstance(inputs, list) and all(isinstance(x, str) for x in inputs)):
            raise PolicyFormatError(f"{_where(node)}: 'inputs' must be a list of node names")
        if len(inputs) != n_in:
            raise PolicyFormatError(f"{_where(node)}: takes {n_in} input{'s' if n_in > 1 else ''}, got {len(inputs)}")
        for x in inputs:
            if x not in shapes:
                raise PolicyFormatError(f"{_where(node)}: input {x!r} is not 'obs' or an earlier node")
        ins = [shapes[x] for x in inputs]
        _validate_node(node, ins, tensors, used)
        shapes[name] = _output_shape(node, ins)
        _check_elements(node, "the output", shapes[name])

    outputs = graph["outputs"]
    act = graph["act"]
    if not isinstance(act, str) or act not in OUTPUT_KEYS:
        raise PolicyFormatError(f"graph: act {json.dumps(act)} is not supported (allowed: argmax, identity)")
    want = OUTPUT_KEYS[act]
    if not isinstance(outputs, dict) or list(outputs) != [want]:
        got = list(outputs) if isinstance(outputs, dict) else outputs
        raise PolicyFormatError(f"graph: act {act!r} needs outputs with exactly the key {want!r}, got {json.dumps(got)}")
    out = outputs[want]
    if not isinstance(out, str) or out == "obs" or out not in shapes:
        raise PolicyFormatError(f"graph: output {want!r} = {json.dumps(out)} is not a node")
    if len(shapes[out]) != 1:
        raise PolicyFormatError(f"graph: output {want!r} (node {out!r}) has shape (B, {', '.join(map(str, shapes[out]))})"
                                f", act {act!r} needs (B, A)")
    extra = sorted(set(tensors) - used)
    if extra:
        raise PolicyFormatError(f"tensor {extra[0]!r} does not belong to any node")


def _validate_node(node: dict[str, Any], ins: list[tuple[int, ...]], tensors: dict[str, np.ndarray],
                   used: set[str]) -> None:
    op = node["op"]
    if op in ("linear", "conv2d"):
        _validate_quant_layer(node, ins[0], tensors, used)
    elif op == "flatten":
        if len(ins[0]) != 3:
            raise PolicyFormatError(f"{_where(node)}: input has shape (B, {', '.join(map(str, ins[0]))}), "
                                    "flatten needs (B, C, H, W)")
    elif op == "dueling":
        v, adv = ins
        if v != (1,):
            raise PolicyFormatError(f"{_where(node)}: value input has shape (B, {', '.join(map(str, v))}), "
                                    "expected (B, 1)")
        if len(adv) != 1:
            raise PolicyFormatError(f"{_where(node)}: advantage input has shape (B, {', '.join(map(str, adv))}), "
                                    "expected (B, A)")
    elif op == "c51":
        a = _int_field(node, "actions", 1)
        atoms = _int_field(node, "atoms", 1)
        if node["dueling"]:
            if ins[0] != (atoms,) or ins[1] != (a * atoms,):
                raise PolicyFormatError(f"{_where(node)}: inputs have shapes {[list(s) for s in ins]}, expected "
                                        f"value [{atoms}] and advantage [{a * atoms}] (actions * atoms)")
        elif ins[0] != (a * atoms,):
            raise PolicyFormatError(f"{_where(node)}: input has shape {list(ins[0])}, expected [{a * atoms}] "
                                    "(actions * atoms)")
        _tensor(tensors, used, node, "support", np.dtype(np.float32), (atoms,))
    elif op == "tanh_bound":
        if len(ins[0]) != 1:
            raise PolicyFormatError(f"{_where(node)}: input has shape (B, {', '.join(map(str, ins[0]))}), "
                                    "expected (B, A)")
        for s in ("low", "high"):
            _tensor(tensors, used, node, s, np.dtype(np.float32), ins[0])


def _validate_quant_layer(node: dict[str, Any], in_shape: tuple[int, ...], tensors: dict[str, np.ndarray],
                          used: set[str]) -> None:
    in_bits = _int_field(node, "in_bits", 2, 8)
    wbits = _int_field(node, "weight_bits", 1, 8)
    zp = _int_field(node, "in_zero_point", 0, 2 ** in_bits - 1)
    del zp
    scale = _float32_field(node, "in_scale")
    if not scale > 0:
        raise PolicyFormatError(f"{_where(node)}: in_scale {node['in_scale']} must be positive")
    fmt = node["weight_format"]
    if fmt not in ("int8", "int4"):
        raise PolicyFormatError(f"{_where(node)}: weight_format {json.dumps(fmt)} is not supported "
                                "(allowed: int8, int4)")
    if fmt == "int4" and wbits > 4:
        raise PolicyFormatError(f"{_where(node)}: weight_format int4 needs weight_bits <= 4, got {wbits}")
    _bool_field(node, "relu")
    if node["op"] == "linear":
        k = _int_field(node, "in_features", 1)
        out = _int_field(node, "out_features", 1)
        if in_shape != (k,):
            raise PolicyFormatError(f"{_where(node)}: input has shape (B, {', '.join(map(str, in_shape))}), "
                                    f"in_features needs (B, {k})")
    else:
        c = _int_field(node, "in_channels", 1)
        out = _int_field(node, "out_channels", 1)
        kh, kw = _pair_field(node, "kernel", 1)
        sh, sw = _pair_field(node, "stride", 1)
        ph, pw = _pair_field(node, "padding", 0)
        h, w = _pair_field(node, "in_hw", 1)
        oh, ow = _pair_field(node, "out_hw", 1)
        if in_shape != (c, h, w):
            raise PolicyFormatError(f"{_where(node)}: input has shape (B, {', '.join(map(str, in_shape))}), "
                                    f"in_channels and in_hw need (B, {c}, {h}, {w})")
        eh, ew = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if (oh, ow) != (eh, ew) or eh < 1 or ew < 1:
            raise PolicyFormatError(f"{_where(node)}: out_hw {[oh, ow]} does not follow from in_hw {[h, w]}, kernel "
                                    f"{[kh, kw]}, stride {[sh, sw]}, padding {[ph, pw]} (expected {[eh, ew]})")
        k = c * kh * kw
    _check_elements(node, "the weight", (out, k))
    if fmt == "int8":
        wt = _tensor(tensors, used, node, "weight", np.dtype(np.int8), (out, k))
        codes = wt
    else:
        wt = _tensor(tensors, used, node, "weight", np.dtype(np.uint8), (out, (k + 1) // 2))
        if k % 2 and wt.size and (wt[:, -1] >> 4 != 8).any():
            raise PolicyFormatError(f"tensor '{node['name']}.weight': the padding (last high) nibble of odd K={k} "
                                    "must be 8 (a zero weight)")
        codes = unpack_int4(wt, k)
    qmax_w = 2 ** (wbits - 1) - 1 if wbits > 1 else 1
    if codes.size:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < -qmax_w or hi > qmax_w:
            raise PolicyFormatError(f"tensor '{node['name']}.weight' has codes in [{lo}, {hi}], outside "
                                    f"[{-qmax_w}, {qmax_w}] for weight_bits {wbits}")
        if wbits == 1 and (codes == 0).any():
            raise PolicyFormatError(f"tensor '{node['name']}.weight' has zero codes; weight_bits 1 allows only -1, +1")
        wmax = max(-lo, hi)
        if k * (2 ** in_bits - 1) * wmax >= 2 ** 31:
            raise PolicyFormatError(f"{_where(node)}: the int32 accumulator could overflow (K * (2^in_bits - 1) * "
                                    f"max|w| = {k} * {2 ** in_bits - 1} * {wmax} >= 2^31)")
    _tensor(tensors, used, node, "out_scale", np.dtype(np.float32), (out,))
    _tensor(tensors, used, node, "bias", np.dtype(np.float32), (out,))
