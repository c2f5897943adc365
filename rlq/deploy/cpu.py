"""The CPU backend: ``kernel.c`` compiled on first use, and a plan that runs a whole policy in one C call.

Building: ``load_library()`` compiles ``kernel.c`` with the system C compiler (``$CC``, else ``cc``/``gcc``)
into a cache directory (``$RLQ_CACHE_DIR``, else ``~/.cache/rlq/kernels``), under a name made of a hash of
the source, the compiler and its flags, so a changed source is rebuilt and concurrent builds are safe (each
writes a temporary file and renames it into place). One build runs on every x86-64 CPU: the SIMD functions
carry target attributes and the path is chosen at run time.

Instruction-set paths (``isa``): ``scalar`` (portable C), ``avx2`` (AVX2 + FMA units, no FMA used) and
``avx512vnni`` (AVX-512 F/BW/VNNI). The default is the best the CPU has; ``$RLQ_DEPLOY_ISA`` or the ``isa``
argument forces one, and forcing one the CPU lacks raises :class:`UnsupportedISAError`.

The plan (built here from a validated graph, kept alive by :class:`CpuPolicy`):

- activations live in one arena, per observation in NHWC order for convolutions (the conv GEMM's natural
  output) and as integer codes ready for the next layer: each layer's epilogue quantizes its output for
  its consumer (uint8 codes, or int16 ``code - zero_point`` for the AVX2 widening kernel);
- weights are repacked per kernel: int8 rows padded to the kernel's K block, int4 nibble blocks (32 bytes =
  64 weights on AVX2, 64 bytes = 128 weights on AVX-512), conv weights reordered to (kh, kw, c) and the
  first linear layer after a flatten reordered to NHWC, with per-row ``sum_k w`` for the zero-point
  correction of the u8 kernels;
- on AVX2, ``vpmaddubsw`` (u8 x s8 pair sums into int16) is used only where the plan proves it cannot
  saturate: ``L * 2 * (2^in_bits - 1) * max|w| <= 32767`` for ``L`` int16 accumulation steps (``L >= 2``,
  always true for int4 weights); other layers widen both operands to int16 and use ``vpmaddwd`` (exact).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .format import node_shapes, weight_codes
from .reference import Policy, quantize_input

__all__ = [
    "FLAGS",
    "ISAS",
    "SOURCE",
    "CpuPolicy",
    "KernelBuildError",
    "UnsupportedISAError",
    "available_isas",
    "cache_dir",
    "compiler",
    "load_library",
    "select_isa",
]

SOURCE = Path(__file__).with_name("kernel.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-std=gnu11")
ISAS = ("scalar", "avx2", "avx512vnni")
ABI = 3
REC = 64

# op codes and record fields: mirror kernel.c
OP_CONVERT, OP_GEMM, OP_DUELING, OP_C51, OP_TANH, OP_OUTPUT = 1, 2, 3, 4, 5, 6
SRC_OBS_U8, SRC_OBS_F32, SRC_ARENA_F32 = 0, 1, 2
DST_F32, DST_U8, DST_S16 = 0, 1, 2
K_SCALAR, K_WIDE, K_UBS8, K_UBS4, K_VNNI8, K_VNNI4, K_WIDE_MM, K_UBS_MM = 0, 1, 2, 3, 4, 5, 6, 7
KIND_NAMES = {K_SCALAR: "scalar", K_WIDE: "avx2-vpmaddwd", K_UBS8: "avx2-vpmaddubsw",
              K_UBS4: "avx2-vpmaddubsw-int4", K_VNNI8: "avx512-vnni", K_VNNI4: "avx512-vnni-int4",
              K_WIDE_MM: "avx2-vpmaddwd-gemm", K_UBS_MM: "avx2-vpmaddubsw-gemm"}
K_BLOCK = {K_SCALAR: 1, K_WIDE: 16, K_UBS8: 32, K_UBS4: 64, K_VNNI8: 64, K_VNNI4: 128, K_WIDE_MM: 2, K_UBS_MM: 4}
ROW_DOT = (K_WIDE, K_UBS8, K_UBS4, K_VNNI8, K_VNNI4)
SMALL_K = 32  # linear layers with K <= this use the GEMM tiles (no horizontal sums)
CONVERT_FIELDS = dict(src_kind=1, src_off=2, src_stride=3, src_count=4, count=5, map=6, dst_kind=7, dst_off=8,
                      dst_stride=9, divide=10, scale=11, zp=12, qmax=13, lut=14, affine=15)
GEMM_FIELDS = dict(kind=1, is_conv=2, n=3, k=4, kp=5, np=6, in_off=7, in_stride=8, in_elem=9, w_off=10,
                   w_bytes=11, os_off=12, bias_off=13, rowsum_off=14, zp=15, relu=16, L=17, fout_off=18,
                   fout_stride=19, qout_off=20, qout_stride=21, qout_kind=22, q_scale=23, q_zp=24, q_qmax=25,
                   c=26, h=27, w=28, kh=29, kw=30, sh=31, sw=32, ph=33, pw=34, oh=35, ow=36, padval=37,
                   col_off=38, col_bytes=39, acc_off=40, in_nchw=41)
DUELING_FIELDS = dict(v_off=1, v_stride=2, adv_off=3, adv_stride=4, a=5, out_off=6, out_stride=7)
C51_FIELDS = dict(dueling=1, in0_off=2, in0_stride=3, in1_off=4, in1_stride=5, actions=6, atoms=7, support_off=8,
                  out_off=9, out_stride=10, scratch_off=11)
TANH_FIELDS = dict(in_off=1, in_stride=2, a=3, low_off=4, high_off=5, out_off=6, out_stride=7)
OUTPUT_FIELDS = dict(src_off=1, src_stride=2, a=3)
FIELDS = {OP_CONVERT: CONVERT_FIELDS, OP_GEMM: GEMM_FIELDS, OP_DUELING: DUELING_FIELDS, OP_C51: C51_FIELDS,
          OP_TANH: TANH_FIELDS, OP_OUTPUT: OUTPUT_FIELDS}

ARENA_BUDGET = 4 << 20   # bytes of per-observation activations per chunk of the batch
MAX_CHUNK = 256
ALIGN = 64


class KernelBuildError(RuntimeError):
    """The C kernel could not be compiled or loaded (no compiler, compiler error, ...)."""


class UnsupportedISAError(RuntimeError):
    """An instruction-set path was forced that this CPU (or this build) cannot run."""


# -- building and loading -----------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$RLQ_CACHE_DIR``, else ``~/.cache/rlq/kernels``."""
    env = os.environ.get("RLQ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "rlq" / "kernels"


def compiler() -> str | None:
    """The C compiler: ``$CC``, else ``cc`` or ``gcc`` on PATH (None when there is none)."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return shutil.which("cc") or shutil.which("gcc")


_LIBS: dict[str, ctypes.CDLL] = {}
_LIBS_LOCK = threading.Lock()


def load_library(source: str | os.PathLike | None = None, defines: tuple[str, ...] = (),
                 directory: str | os.PathLike | None = None, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (once per source/compiler/flags hash) and load the kernel library. ``defines`` and ``flags``
    make test builds (``RLQ_VNNI_EMULATE``; ``-fsanitize=address``)."""
    src = Path(source) if source is not None else SOURCE
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelBuildError(f"the rlq CPU kernels need an x86-64 CPU, this one is {platform.machine()}")
    cc = compiler()
    if cc is None:
        raise KernelBuildError("no C compiler found (set $CC, or install gcc/cc)")
    try:
        code = src.read_bytes()
    except OSError as e:
        raise KernelBuildError(f"cannot read the kernel source {src}: {e.strerror}") from None
    flags = list(FLAGS) + list(flags) + [f"-D{d}" for d in defines]
    key = hashlib.sha256(b"\0".join([code, cc.encode(), " ".join(flags).encode(), platform.machine().encode(),
                                     str(ABI).encode()])).hexdigest()[:24]
    out_dir = Path(directory) if directory is not None else cache_dir()
    target = out_dir / f"rlq_kernel_{key}.so"
    with _LIBS_LOCK:
        if str(target) in _LIBS:
            return _LIBS[str(target)]
        if not target.is_file():
            _compile(cc, flags, src, target)
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as e:
            raise KernelBuildError(f"cannot load the compiled kernel {target}: {e}") from None
        _declare(lib)
        if lib.rlq_abi_version() != ABI:
            raise KernelBuildError(f"kernel {target} has ABI {lib.rlq_abi_version()}, this rlq needs {ABI}")
        _LIBS[str(target)] = lib
        return lib


def _compile(cc: str, flags: list[str], src: Path, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise KernelBuildError(f"cannot write to the kernel cache {target.parent}: {e.strerror}") from None
    try:
        try:
            r = subprocess.run([cc, *flags, "-o", tmp, str(src)], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KernelBuildError(f"running the C compiler {cc} failed: {e}") from None
        if r.returncode != 0:
            lines = [ln for ln in (r.stderr or r.stdout).splitlines() if "error" in ln] or \
                (r.stderr or r.stdout).splitlines() or ["(no output)"]
            raise KernelBuildError(f"compiling {src.name} failed: {lines[0].strip()}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same hash writes identical bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.rlq_abi_version.restype = ci
    lib.rlq_abi_version.argtypes = []
    lib.rlq_cpu_features.restype = ci
    lib.rlq_cpu_features.argtypes = []
    lib.rlq_vnni_emulated.restype = ci
    lib.rlq_vnni_emulated.argtypes = []
    lib.rlq_ctx_size.restype = i64
    lib.rlq_ctx_size.argtypes = []
    lib.rlq_strerror.restype = ctypes.c_char_p
    lib.rlq_strerror.argtypes = [ci]
    lib.rlq_init.restype = ci
    lib.rlq_init.argtypes = [vp, i64, vp, i64, vp, i64, vp, i64, vp, i64, vp, i64, vp, i64, vp, i64, vp, i64, vp, i64]
    lib.rlq_run.restype = ci
    lib.rlq_run.argtypes = [vp, vp, i64, i64, vp, i64, vp, i64]
    lib.rlq_run_staged.restype = ci
    lib.rlq_run_staged.argtypes = [vp]
    lib.rlq_run_staged_repeat.restype = ci
    lib.rlq_run_staged_repeat.argtypes = [vp, i64]
    for name in ("rlq_exp_array", "rlq_tanh_array"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [vp, vp, i64]


def available_isas(lib: ctypes.CDLL) -> list[str]:
    """The paths this CPU can run with this build, worst to best."""
    f = lib.rlq_cpu_features()
    return ["scalar"] + (["avx2"] if f & 1 else []) + (["avx512vnni"] if f & 2 else [])


def select_isa(lib: ctypes.CDLL, isa: str | None = None) -> str:
    """``isa``, else ``$RLQ_DEPLOY_ISA``, else the best path of this CPU; checked against the CPU."""
    source = "isa"
    if isa is None:
        isa = os.environ.get("RLQ_DEPLOY_ISA") or None
        source = "RLQ_DEPLOY_ISA"
    have = available_isas(lib)
    if isa is None:
        return have[-1]
    if isa not in ISAS:
        raise ValueError(f"{source}={isa!r} is not an instruction-set path (allowed: {', '.join(ISAS)})")
    if isa not in have:
        raise UnsupportedISAError(f"{source}={isa}: this CPU does not support it (available: {', '.join(have)})")
    return isa


# -- the plan ---------------------------------------------------------------------------------------------------
def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _fbits(x: np.float32) -> int:
    return int(np.asarray(x, np.float32).view(np.uint32))


class _Region:
    """A part of the arena: ``per_sample`` bytes for each observation of a chunk, or ``once`` bytes."""

    def __init__(self, per_sample: int = 0, once: int = 0):
        self.per_sample, self.once = per_sample, once
        self.stride = _round_up(per_sample, ALIGN) if per_sample else 0
        self.off = -1


class _Buffers:
    """Append-only typed buffers (weights + tables, float params, int32 tables) with aligned offsets."""

    def __init__(self):
        self.w: list[bytes] = []
        self.wlen = 0
        self.f: list[np.ndarray] = []
        self.flen = 0
        self.i: list[np.ndarray] = []
        self.ilen = 0

    def bytes(self, data: np.ndarray) -> int:
        raw = np.ascontiguousarray(data).tobytes()
        off = self.wlen
        pad = _round_up(len(raw), ALIGN) - len(raw)
        self.w.append(raw + b"\0" * pad)
        self.wlen += len(raw) + pad
        return off

    def floats(self, data: np.ndarray) -> int:
        a = np.ascontiguousarray(data, np.float32).ravel()
        off = self.flen
        pad = _round_up(len(a), 16) - len(a)
        self.f.append(np.concatenate([a, np.zeros(pad, np.float32)]))
        self.flen += len(a) + pad
        return off

    def ints(self, data: np.ndarray) -> int:
        a = np.ascontiguousarray(data, np.int32).ravel()
        off = self.ilen
        pad = _round_up(len(a), 16) - len(a)
        self.i.append(np.concatenate([a, np.zeros(pad, np.int32)]))
        self.ilen += len(a) + pad
        return off


def _aligned(nbytes: int, dtype: Any = np.uint8) -> np.ndarray:
    """Zeroed array of at least one element whose data starts on a 64-byte boundary."""
    nbytes = max(int(nbytes), np.dtype(dtype).itemsize)
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes].view(dtype)


def _kernel_kind(isa: str, node: dict, codes: np.ndarray) -> tuple[int, int]:
    """(kernel kind, L: int16 accumulation steps for vpmaddubsw) for one quantized layer."""
    if isa == "scalar":
        return K_SCALAR, 0
    if isa == "avx512vnni":
        return (K_VNNI4 if node["weight_format"] == "int4" else K_VNNI8), 0
    qmax = 2 ** int(node["in_bits"]) - 1
    wmax = max(int(np.abs(codes.astype(np.int32)).max()) if codes.size else 0, 1)
    steps = min(32767 // (2 * qmax * wmax), 1024)   # |one maddubs lane| <= 2 * qmax * wmax
    k = codes.shape[1]
    conv = node["op"] == "conv2d" or k <= SMALL_K    # many rows share the weights / tiny K: GEMM tiles
    if steps >= 2:
        return (K_UBS_MM if conv else K_UBS4 if node["weight_format"] == "int4" else K_UBS8), steps
    return (K_WIDE_MM if conv else K_WIDE), 0


def _pack_weights(kind: int, codes: np.ndarray, kp: int, np_: int) -> np.ndarray:
    """(N, K) int8 codes -> the kernel's layout, zero-padded to (NP, KP)."""
    n, k = codes.shape
    w = np.zeros((np_, kp), np.int8)
    w[:n, :k] = codes
    if kind == K_WIDE_MM:   # [NP/8][KP/2][8][2] int16
        return np.ascontiguousarray(w.astype(np.int16).reshape(np_ // 8, 8, kp // 2, 2).transpose(0, 2, 1, 3))
    if kind == K_UBS_MM:    # [NP/8][KP/4][8][4] int8
        return np.ascontiguousarray(w.reshape(np_ // 8, 8, kp // 4, 4).transpose(0, 2, 1, 3))
    if kind not in (K_UBS4, K_VNNI4):
        return w
    half = 32 if kind == K_UBS4 else 64
    blocks = (w.astype(np.int16) + 8).astype(np.uint8).reshape(np_, kp // (2 * half), 2, half)
    return np.ascontiguousarray(blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).reshape(np_, kp // 2)


class Plan:
    """Op records and buffers for one policy and one instruction-set path (see the module docstring)."""

    def __init__(self, graph: dict, tensors: dict[str, np.ndarray], isa: str):
        self.isa = isa
        self.graph = graph
        self.shapes = node_shapes(graph)
        self.nodes = {n["name"]: n for n in graph["nodes"]}
        self.obs_u8 = graph["observation"]["dtype"] == "uint8"
        self.divide = np.float32(graph["preprocess"]["divide"])
        (self.out_name,) = graph["outputs"].values()
        self.n_out = int(self.shapes[self.out_name][0])
        self.bufs = _Buffers()
        self.regions: list[_Region] = []
        self.ops: list[tuple[int, dict[str, Any]]] = []
        self.kinds: dict[str, str] = {}
        self._tensors = tensors
        self._build(tensors)
        del self._tensors
        self._layout()

    # -- helpers --------------------------------------------------------------------------------------
    def _region(self, per_sample: int = 0, once: int = 0) -> _Region:
        r = _Region(per_sample, once)
        self.regions.append(r)
        return r

    def _base(self, name: str) -> str:
        """The tensor that stores ``name``: a flatten's input, else itself."""
        while name != "obs" and self.nodes[name]["op"] == "flatten":
            name = self.nodes[name]["inputs"][0]
        return name

    def _is_conv_out(self, base: str) -> bool:
        return base != "obs" and self.nodes[base]["op"] == "conv2d"

    @staticmethod
    def _nhwc_to_logical_map(shape: tuple[int, ...]) -> np.ndarray:
        """dst logical (c, h, w) index -> src NHWC index."""
        c, h, w = shape
        return np.arange(c * h * w, dtype=np.int32).reshape(h, w, c).transpose(2, 0, 1).ravel()

    # -- building ---------------------------------------------------------------------------------------
    def _live(self) -> set[str]:
        live, todo = set(), [self.out_name]
        while todo:
            n = todo.pop()
            if n in live or n == "obs":
                continue
            live.add(n)
            todo.extend(self.nodes[n]["inputs"])
        return live

    def _build(self, tensors: dict[str, np.ndarray]) -> None:
        live = self._live()
        order = [n for n in self.graph["nodes"] if n["name"] in live]
        # kernels and packed weights of the quantized layers
        layer: dict[str, dict[str, Any]] = {}
        for node in order:
            if node["op"] not in ("linear", "conv2d"):
                continue
            codes = weight_codes(node, tensors).astype(np.int8)
            kind, steps = _kernel_kind(self.isa, node, codes)
            base = self._base(node["inputs"][0])
            if self._is_conv_out(base):  # input in NHWC order: columns (c, i, j) -> (i, j, c)
                c, kh, kw = ((int(node["in_channels"]), *map(int, node["kernel"])) if node["op"] == "conv2d"
                             else self.shapes[base])
                codes = codes.reshape(len(codes), c, kh, kw).transpose(0, 2, 3, 1).reshape(len(codes), -1)
            spec = (_fbits(np.float32(node["in_scale"])), int(node["in_zero_point"]), 2 ** int(node["in_bits"]) - 1,
                    DST_S16 if kind in (K_WIDE, K_WIDE_MM) else DST_U8)
            layout = "nhwc" if self._is_conv_out(base) else "logical"  # the observation stays NCHW
            layer[node["name"]] = dict(kind=kind, L=steps, codes=codes, spec=spec, base=base, layout=layout)
            self.kinds[node["name"]] = KIND_NAMES[kind]
        # requests on stored tensors: code buffers (spec, layout) and float (logical) views
        code_req: dict[str, list[tuple[tuple, str]]] = {}
        float_req: set[str] = set()
        for node in order:
            if node["name"] in layer:
                info = layer[node["name"]]
                key = (info["spec"], info["layout"])
                lst = code_req.setdefault(info["base"], [])
                if key not in lst:
                    lst.append(key)
            elif node["op"] != "flatten":
                float_req.update(node["inputs"])
        float_req.add(self.out_name)
        code_buf: dict[tuple[str, tuple, str], _Region] = {}
        float_buf: dict[str, _Region] = {}   # logical float views, by tensor name (flatten names included)

        def code_region(base: str, spec: tuple, layout: str) -> _Region:
            size = int(np.prod(self.shapes[base]))
            elem = 2 if spec[3] == DST_S16 else 1
            r = self._region(_round_up(size, 128) * elem)
            code_buf[(base, spec, layout)] = r
            return r

        def float_region(size: int) -> _Region:
            return self._region(size * 4)

        def convert_codes_from_float(src: _Region, size: int, spec: tuple, dst: _Region) -> None:
            self.ops.append((OP_CONVERT, dict(src_kind=SRC_ARENA_F32, src_off=src, src_stride=src, src_count=size,
                                              count=size, map=-1, dst_kind=spec[3], dst_off=dst, dst_stride=dst,
                                              divide=_fbits(np.float32(1)), scale=spec[0], zp=spec[1], qmax=spec[2],
                                              lut=0)))

        # observation conversions
        obs_size = int(np.prod(self.shapes["obs"]))
        obs_names = [n for n in float_req if self._base(n) == "obs"]
        if obs_names:
            r = float_region(obs_size)
            self._obs_convert(DST_F32, None, -1, r, obs_size)
            for n in obs_names:
                float_buf[n] = r
        for spec, layout in code_req.get("obs", []):
            r = code_region("obs", spec, layout)
            self._obs_convert(spec[3], spec, -1, r, obs_size)

        for node in order:
            name, op = node["name"], node["op"]
            if op == "flatten":
                continue
            size = int(np.prod(self.shapes[name]))
            if name in layer:
                reqs = code_req.get(name, [])
                views = [n for n in float_req if self._base(n) == name]
                fout = float_region(size) if (views or len(reqs) > 1) else None
                qout = code_region(name, *reqs[0]) if reqs else None
                self._gemm(node, layer[name], code_buf[(layer[name]["base"], layer[name]["spec"],
                                                        layer[name]["layout"])], fout, qout, reqs[0][0] if reqs else None)
                for spec, layout in reqs[1:]:
                    convert_codes_from_float(fout, size, spec, code_region(name, spec, layout))
                if views:
                    if op == "conv2d":  # logical (c, h, w) order from the NHWC output
                        r = float_region(size)
                        mp = self.bufs.ints(self._nhwc_to_logical_map(self.shapes[name]))
                        self.ops.append((OP_CONVERT, dict(src_kind=SRC_ARENA_F32, src_off=fout, src_stride=fout,
                                                          src_count=size, count=size, map=mp, dst_kind=DST_F32,
                                                          dst_off=r, dst_stride=r, divide=_fbits(np.float32(1)),
                                                          scale=0, zp=0, qmax=0, lut=0)))
                    else:
                        r = fout
                    for v in views:
                        float_buf[v] = r
                continue
            # heads: float in, float out
            out = float_region(size)
            ins = [float_buf[i] for i in node["inputs"]]
            if op == "dueling":
                self.ops.append((OP_DUELING, dict(v_off=ins[0], v_stride=ins[0], adv_off=ins[1], adv_stride=ins[1],
                                                  a=size, out_off=out, out_stride=out)))
            elif op == "c51":
                atoms = int(node["atoms"])
                scratch = self._region(once=2 * atoms * 4)
                in1 = ins[1] if node["dueling"] else ins[0]
                self.ops.append((OP_C51, dict(dueling=int(bool(node["dueling"])), in0_off=ins[0], in0_stride=ins[0],
                                              in1_off=in1, in1_stride=in1, actions=int(node["actions"]), atoms=atoms,
                                              support_off=self.bufs.floats(tensors[f"{name}.support"]),
                                              out_off=out, out_stride=out, scratch_off=scratch)))
            elif op == "tanh_bound":
                self.ops.append((OP_TANH, dict(in_off=ins[0], in_stride=ins[0], a=size,
                                               low_off=self.bufs.floats(tensors[f"{name}.low"]),
                                               high_off=self.bufs.floats(tensors[f"{name}.high"]),
                                               out_off=out, out_stride=out)))
            float_buf[name] = out
            for spec, layout in code_req.get(name, []):
                convert_codes_from_float(out, size, spec, code_region(name, spec, layout))
        src = float_buf[self.out_name]
        self.ops.append((OP_OUTPUT, dict(src_off=src, src_stride=src, a=self.n_out)))

    def _obs_convert(self, dst_kind: int, spec: tuple | None, mp: int, dst: _Region, size: int) -> None:
        scale, zp, qmax = spec[:3] if spec else (0, 0, 0)
        lut, affine = 0, 0
        if self.obs_u8:
            x = np.arange(256).astype(np.float32) / self.divide  # the reference's preprocessing, per value
            if dst_kind == DST_F32:
                lut = self.bufs.bytes(x.astype(np.float32))
            else:
                bits = int(qmax).bit_length()
                q = quantize_input(x, np.uint32(scale).view(np.float32), zp, bits)
                table = q.astype(np.uint8) if dst_kind == DST_U8 else (q - zp).astype(np.int16)
                lut = self.bufs.bytes(table)
                ident = np.arange(256) - (0 if dst_kind == DST_U8 else zp)
                affine = int(np.array_equal(table.astype(np.int64), ident))  # code = byte (- zp): no lookups
        obs_bytes = size * (1 if self.obs_u8 else 4)
        self.ops.append((OP_CONVERT, dict(src_kind=SRC_OBS_U8 if self.obs_u8 else SRC_OBS_F32, src_off=0,
                                          src_stride=obs_bytes, src_count=size, count=size, map=mp, dst_kind=dst_kind,
                                          dst_off=dst, dst_stride=dst, divide=_fbits(self.divide), scale=scale, zp=zp,
                                          qmax=qmax, lut=lut, affine=affine)))

    def _gemm(self, node: dict, info: dict, inp: _Region, fout: _Region | None, qout: _Region | None,
              qspec: tuple | None) -> None:
        kind, codes = info["kind"], info["codes"]
        n, k = codes.shape
        kp = k if kind == K_SCALAR else _round_up(k, K_BLOCK[kind])
        np_ = _round_up(n, 8)
        w = _pack_weights(kind, codes, kp, np_)
        name = node["name"]
        tensors_os = np.zeros(np_, np.float32)
        pad_bias = np.zeros(np_, np.float32)
        tensors_os[:n] = self._tensors[f"{name}.out_scale"]
        pad_bias[:n] = self._tensors[f"{name}.bias"]
        rowsum = np.zeros(np_, np.int32)
        rowsum[:n] = codes.astype(np.int32).sum(axis=1)
        zp = int(node["in_zero_point"])
        elem = 2 if kind in (K_WIDE, K_WIDE_MM) else 1
        f: dict[str, Any] = dict(kind=kind, is_conv=int(node["op"] == "conv2d"), n=n, k=k, kp=kp, np=np_,
                                 in_off=inp, in_stride=inp, in_elem=elem, w_off=self.bufs.bytes(w), w_bytes=w.nbytes,
                                 os_off=self.bufs.floats(tensors_os), bias_off=self.bufs.floats(pad_bias),
                                 # int16 inputs already hold q - z: no zero-point correction for them
                                 rowsum_off=self.bufs.ints(rowsum) if elem == 1 else -1, zp=zp, relu=int(bool(node["relu"])), L=info["L"],
                                 fout_off=fout if fout is not None else -1, fout_stride=fout if fout is not None else 0,
                                 qout_off=qout if qout is not None else -1, qout_stride=qout if qout is not None else 0,
                                 qout_kind=qspec[3] if qspec else 0, q_scale=qspec[0] if qspec else 0,
                                 q_zp=qspec[1] if qspec else 0, q_qmax=qspec[2] if qspec else 0)
        if kind in ROW_DOT:
            f["acc_off"] = self._region(once=np_ * 4)
        else:
            f["acc_off"] = -1
        if node["op"] == "conv2d":
            f["in_nchw"] = int(info["layout"] != "nhwc")
            (c, h, w_), (kh, kw) = self.shapes[node["inputs"][0]], node["kernel"]
            oh, ow = node["out_hw"]
            col = self._region(once=oh * ow * kp * elem)
            f.update(c=c, h=h, w=w_, kh=kh, kw=kw, sh=node["stride"][0], sw=node["stride"][1], ph=node["padding"][0],
                     pw=node["padding"][1], oh=oh, ow=ow, padval=0 if elem == 2 else zp, col_off=col,
                     col_bytes=oh * ow * kp * elem)
        self.ops.append((OP_GEMM, f))

    # -- layout and serialization -------------------------------------------------------------------------
    def _layout(self) -> None:
        per_sample = sum(r.stride for r in self.regions)
        self.chunk = int(max(1, min(MAX_CHUNK, ARENA_BUDGET // max(per_sample, 1))))
        off = 0
        for r in self.regions:
            r.off = off
            off += r.stride * self.chunk if r.per_sample else _round_up(r.once, ALIGN)
        self.arena_bytes = off
        recs = np.zeros((len(self.ops), REC), np.int64)
        for i, (code, fields) in enumerate(self.ops):
            recs[i, 0] = code
            names = FIELDS[code]
            for key, val in fields.items():
                if isinstance(val, _Region):
                    val = val.stride if key.endswith("stride") else val.off
                recs[i, names[key]] = int(val)
        self.records = recs



# -- the policy ---------------------------------------------------------------------------------------------------
class CpuPolicy(Policy):
    """A policy run by the compiled kernels: one C call per ``act``/``q_values``/``action_mean`` call."""

    backend = "cpu"

    def __init__(self, graph: dict, tensors: dict[str, np.ndarray], isa: str | None = None,
                 library: ctypes.CDLL | None = None):
        super().__init__(graph, tensors)
        lib = library if library is not None else load_library()
        self.isa = select_isa(lib, isa)
        plan = Plan(graph, tensors, self.isa)
        self.plan = plan
        self.kernels = dict(plan.kinds)
        self.chunk = plan.chunk
        b = plan.bufs
        # buffers owned by this object for the lifetime of the context
        self._ops = np.ascontiguousarray(plan.records.ravel())
        self._arena = _aligned(plan.arena_bytes)
        self._wbuf = _aligned(b.wlen)
        if b.wlen:
            self._wbuf[:b.wlen] = np.frombuffer(b"".join(b.w), np.uint8)
        self._fbuf = np.concatenate(b.f) if b.f else np.zeros(1, np.float32)
        self._ibuf = np.concatenate(b.i) if b.i else np.zeros(1, np.int32)
        obs_item = 1 if plan.obs_u8 else 4
        self._obs_bytes = int(np.prod(self.observation_shape)) * obs_item
        self._stage_in = _aligned(self._obs_bytes).view(self.observation_dtype).reshape(self.observation_shape)
        self._stage_out = np.zeros(self.n_outputs, np.float32)
        self._stage_act = np.zeros(1, np.int64)
        self._meta = np.array([ABI, ISAS.index(self.isa), plan.chunk, self._obs_bytes, int(plan.obs_u8),
                               self.n_outputs, int(self.discrete)], np.int64)
        self._ctx = _aligned(lib.rlq_ctx_size())
        rc = lib.rlq_init(self._ctx.ctypes.data, self._ctx.nbytes, self._meta.ctypes.data, self._meta.size,
                          self._ops.ctypes.data, self._ops.size, self._arena.ctypes.data, self._arena.nbytes,
                          self._wbuf.ctypes.data, b.wlen, self._fbuf.ctypes.data, self._fbuf.size,
                          self._ibuf.ctypes.data, self._ibuf.size, self._stage_in.ctypes.data, self._obs_bytes,
                          self._stage_out.ctypes.data, self._stage_out.size, self._stage_act.ctypes.data, 1)
        if rc != 0:
            raise RuntimeError(f"rlq kernel rejected the plan: {lib.rlq_strerror(rc).decode()}")
        self._lib = lib
        self._ctx_ptr = self._ctx.ctypes.data
        self._run = lib.rlq_run
        self._run_staged = lib.rlq_run_staged
        self._lock = threading.Lock()  # the arena and staging buffers are per policy
        self._shape = self.observation_shape
        self._dtype = self.observation_dtype

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"rlq kernel error: {self._lib.rlq_strerror(rc).decode()}")

    def _call(self, batch: np.ndarray, out: np.ndarray | None, act: np.ndarray | None) -> None:
        with self._lock:
            rc = self._run(self._ctx_ptr, batch.ctypes.data, batch.nbytes, len(batch),
                           None if out is None else out.ctypes.data, 0 if out is None else out.size,
                           None if act is None else act.ctypes.data, 0 if act is None else act.size)
        self._check(rc)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        out = np.empty((len(batch), self.n_outputs), np.float32)
        if len(batch):
            self._call(batch, out, None)
        return out

    def _forward_act(self, batch: np.ndarray) -> np.ndarray:
        if not self.discrete:
            return self._forward(batch)
        act = np.empty(len(batch), np.int64)
        if len(batch):
            self._call(batch, None, act)
        return act

    def act(self, obs) -> np.ndarray:
        """Greedy actions (int64; one observation: an int64 scalar) or continuous actions (float32)."""
        try:  # the fast path: one observation of the right dtype, copied into the staging buffer
            fast = obs.dtype is self._dtype and obs.shape == self._shape
        except AttributeError:
            fast = False
        if not fast:
            return super().act(obs)
        lock = self._lock
        lock.acquire()
        try:
            self._stage_in[...] = obs
            self._check(self._run_staged(self._ctx_ptr))
            return self._stage_act[0] if self.discrete else self._stage_out.copy()
        finally:
            lock.release()

    def q_values(self, obs) -> np.ndarray:
        try:
            fast = self.discrete and obs.dtype is self._dtype and obs.shape == self._shape
        except AttributeError:
            fast = False
        if not fast:
            return super().q_values(obs)
        lock = self._lock
        lock.acquire()
        try:
            self._stage_in[...] = obs
            self._check(self._run_staged(self._ctx_ptr))
            return self._stage_out.copy()
        finally:
            lock.release()


def exp_c(lib: ctypes.CDLL, x: np.ndarray) -> np.ndarray:
    """The kernel's scalar rlq_exp on a float32 array (for tests)."""
    x = np.ascontiguousarray(x, np.float32)
    y = np.empty_like(x)
    lib.rlq_exp_array(x.ctypes.data, y.ctypes.data, x.size)
    return y


def tanh_c(lib: ctypes.CDLL, x: np.ndarray) -> np.ndarray:
    """The kernel's scalar rlq_tanh on a float32 array (for tests)."""
    x = np.ascontiguousarray(x, np.float32)
    y = np.empty_like(x)
    lib.rlq_tanh_array(x.ctypes.data, y.ctypes.data, x.size)
    return y
