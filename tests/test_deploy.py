"""rlq.deploy: the policy file format, the numpy reference and the compiled CPU kernels (bit-exact on every
instruction-set path). Policies are random (random codes, scales, biases and zero points), written with
save_policy; no torch."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlq.deploy import PolicyFormatError, load_policy, read_policy, save_policy
from rlq.deploy import reference as ref
from rlq.deploy.format import pack_int4, unpack_int4, validate

F = np.float32


# -- random policies ----------------------------------------------------------------------------------------------
class Builder:
    """Builds a random FORMAT.md graph + tensors node by node."""

    def __init__(self, rng: np.random.Generator, obs_shape, obs_dtype="float32", divide=1.0):
        self.rng = rng
        self.nodes: list[dict] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.obs = {"shape": list(obs_shape), "dtype": obs_dtype}
        self.divide = divide
        self.shapes = {"obs": tuple(obs_shape)}

    def _name(self) -> str:
        return f"n{len(self.nodes)}"

    def _codes(self, out: int, k: int, wbits: int, balanced: bool) -> np.ndarray:
        if wbits == 1:
            return self.rng.choice(np.array([-1, 1], np.int8), size=(out, k))
        qw = 2 ** (wbits - 1) - 1
        codes = self.rng.integers(-qw, qw + 1, size=(out, k)).astype(np.int8)
        rows = np.arange(out)
        codes[rows, self.rng.integers(0, k, out)] = qw  # the extremes occur
        codes[rows, self.rng.integers(0, k, out)] = -qw
        if balanced and k >= 2:  # rows sum to ~0: outputs depend on the input, not on its mean (varied argmax)
            perm = self.rng.permutation(k)
            half = k // 2
            codes[:, perm[half:2 * half]] = -codes[:, perm[:half]]
        return codes

    def quant(self, op: str, inp: str, out: int, *, wbits=8, fmt=None, in_bits=8, zp=None, in_scale=None,
              relu=True, kernel=(3, 3), stride=(1, 1), padding=(0, 0), ties=False) -> str:
        name = self._name()
        fmt = fmt or ("int4" if wbits <= 4 and self.rng.random() < 0.5 else "int8")
        qmax = 2 ** in_bits - 1
        shape = self.shapes[inp]
        if zp is None:
            zp = 0 if self._nonneg(inp) else int(self.rng.integers(qmax // 3, 2 * qmax // 3 + 1))
        if in_scale is None and ties:
            in_scale = 2.0 ** -5
        if in_scale is None:
            span = 3.0 if zp == 0 else 6.0
            in_scale = float(F(span / qmax * self.rng.uniform(0.7, 1.3)))
        node = {"name": name, "op": op, "inputs": [inp], "in_scale": in_scale, "in_zero_point": int(zp),
                "in_bits": in_bits, "weight_bits": wbits, "weight_format": fmt, "relu": relu}
        if op == "linear":
            (k,) = shape
            node.update(in_features=k, out_features=out)
            self.shapes[name] = (out,)
        else:
            c, h, w = shape
            kh, kw = kernel
            oh, ow = (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1
            node.update(in_channels=c, out_channels=out, kernel=list(kernel), stride=list(stride),
                        padding=list(padding), in_hw=[h, w], out_hw=[oh, ow])
            k = c * kh * kw
            self.shapes[name] = (out, oh, ow)
        codes = self._codes(out, k, wbits, balanced=not relu)
        wmax = max(1, 2 ** (wbits - 1) - 1)
        if ties:  # power-of-two scales and coarse biases: many y / s land exactly on .5 (round half to even)
            os_ = np.full(out, 2.0 ** -6, F)  # y / 2^-5 = acc / 2 + integer: every odd acc is a tie
            bias = (self.rng.integers(-8, 8, size=out) / 32.0).astype(F)
        else:
            os_ = (self.rng.uniform(0.5, 1.5, out) / (np.sqrt(k) * (qmax / 3) * (wmax / 2))).astype(F)
            bias = self.rng.normal(0, 0.3, out).astype(F)
        self.tensors[f"{name}.weight"] = pack_int4(codes) if fmt == "int4" else codes
        self.tensors[f"{name}.out_scale"] = os_
        self.tensors[f"{name}.bias"] = bias
        self.nodes.append(node)
        return name

    def _nonneg(self, name: str) -> bool:
        if name == "obs":
            return self.obs["dtype"] == "uint8"
        node = next(n for n in self.nodes if n["name"] == name)
        if node["op"] == "flatten":
            return self._nonneg(node["inputs"][0])
        return bool(node.get("relu", False))

    def op(self, op: str, inputs: list[str], shape: tuple, **fields) -> str:
        name = self._name()
        self.nodes.append({"name": name, "op": op, "inputs": inputs, **fields})
        self.shapes[name] = shape
        return name

    def flatten(self, inp: str) -> str:
        return self.op("flatten", [inp], (int(np.prod(self.shapes[inp])),))

    def graph(self, out: str, act: str = "argmax") -> tuple[dict, dict]:
        key = "q_values" if act == "argmax" else "action_mean"
        g = {"format": "rlq.policy", "version": 1, "observation": self.obs, "preprocess": {"divide": self.divide},
             "nodes": self.nodes, "outputs": {key: out}, "act": act, "meta": {"agent": "test", "bits": 8}}
        return g, self.tensors


def mlp(seed=0, obs_dim=4, hidden=(256, 256), actions=2, wbits=8, fmt=None, in_bits=8, head="q", atoms=11,
        ties=False, last_bits=None) -> tuple[dict, dict]:
    """An MLP policy: q (plain), dueling, c51, c51_dueling or tanh (continuous)."""
    rng = np.random.default_rng(seed)
    b = Builder(rng, (obs_dim,))
    h = "obs"
    for width in hidden:
        h = b.quant("linear", h, width, wbits=wbits, fmt=fmt, in_bits=in_bits, ties=ties)
    lb = last_bits or wbits
    if head == "q":
        out = b.quant("linear", h, actions, wbits=lb, fmt=fmt, in_bits=in_bits, relu=False, ties=ties)
    elif head == "dueling":
        v = b.quant("linear", h, 1, wbits=lb, in_bits=in_bits, relu=False)
        a = b.quant("linear", h, actions, wbits=lb, in_bits=in_bits, relu=False)
        out = b.op("dueling", [v, a], (actions,))
    elif head in ("c51", "c51_dueling"):
        if head == "c51":
            ins = [b.quant("linear", h, actions * atoms, wbits=lb, in_bits=in_bits, relu=False)]
        else:
            ins = [b.quant("linear", h, atoms, wbits=lb, in_bits=in_bits, relu=False),
                   b.quant("linear", h, actions * atoms, wbits=lb, in_bits=in_bits, relu=False)]
        out = b.op("c51", ins, (actions,), actions=actions, atoms=atoms, dueling=head == "c51_dueling")
        b.tensors[f"{out}.support"] = np.linspace(-10, 10, atoms).astype(F)
    elif head == "tanh":
        m = b.quant("linear", h, actions, wbits=lb, in_bits=in_bits, relu=False)
        out = b.op("tanh_bound", [m], (actions,))
        b.tensors[f"{out}.low"] = rng.uniform(-2, -0.5, actions).astype(F)
        b.tensors[f"{out}.high"] = rng.uniform(0.5, 2, actions).astype(F)
        return b.graph(out, "identity")
    else:
        raise ValueError(head)
    return b.graph(out)


def nature_cnn(seed=0, wbits=8, fmt=None, actions=6, head="q", hw=84, fc=512, first_scale=None, atoms=11):
    """The Nature DQN network (4 x hw x hw uint8 frames / 255)."""
    rng = np.random.default_rng(seed)
    b = Builder(rng, (4, hw, hw), "uint8", 255.0)
    s = first_scale if first_scale is not None else float(F(1.0) / F(255.0))
    h = b.quant("conv2d", "obs", 32, wbits=wbits, fmt=fmt, zp=0, in_scale=s, kernel=(8, 8), stride=(4, 4))
    h = b.quant("conv2d", h, 64, wbits=wbits, fmt=fmt, kernel=(4, 4), stride=(2, 2))
    h = b.quant("conv2d", h, 64, wbits=wbits, fmt=fmt, kernel=(3, 3), stride=(1, 1))
    h = b.flatten(h)
    h = b.quant("linear", h, fc, wbits=wbits, fmt=fmt)
    if head == "q":
        out = b.quant("linear", h, actions, wbits=8, relu=False)
    else:  # c51 dueling (Rainbow)
        v = b.quant("linear", h, atoms, wbits=8, relu=False)
        a = b.quant("linear", h, actions * atoms, wbits=8, relu=False)
        out = b.op("c51", [v, a], (actions,), actions=actions, atoms=atoms, dueling=True)
        b.tensors[f"{out}.support"] = np.linspace(-10, 10, atoms).astype(F)
    return b.graph(out)


def small_cnn(seed=0, wbits=8, fmt=None, padding=(1, 1), flatten_out=False, in_bits=8):
    """A small conv net with padding and odd sizes; optionally the flattened conv output is the output."""
    rng = np.random.default_rng(seed)
    b = Builder(rng, (3, 11, 9), "uint8", 255.0)
    h = b.quant("conv2d", "obs", 5, wbits=wbits, fmt=fmt, zp=3, in_bits=in_bits, kernel=(3, 2), stride=(2, 1),
                padding=padding)
    h = b.quant("conv2d", h, 7, wbits=wbits, fmt=fmt, in_bits=in_bits, kernel=(2, 3), stride=(1, 2), padding=(0, 1),
                relu=not flatten_out)
    f = b.flatten(h)
    if flatten_out:
        return b.graph(f)
    h = b.quant("linear", f, 13, wbits=wbits, fmt=fmt, in_bits=in_bits)
    out = b.quant("linear", h, 3, wbits=8, relu=False)
    return b.graph(out)


def obs_for(graph: dict, n: int, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, *graph["observation"]["shape"])
    if graph["observation"]["dtype"] == "uint8":  # blocky random images (varied features) plus noise
        n_, c, h, w = shape
        coarse = rng.integers(0, 256, size=(n_, c, h // 7 + 1, w // 7 + 1))
        img = coarse.repeat(7, axis=2).repeat(7, axis=3)[:, :, :h, :w] + rng.integers(-20, 21, size=shape)
        return np.clip(img, 0, 255).astype(np.uint8)
    return (rng.normal(0, 2, size=shape)).astype(F)


def _save(tmp_path: Path, graph: dict, tensors: dict, name="p.rlqp") -> Path:
    path = tmp_path / name
    save_policy(path, graph, tensors)
    return path


# -- fixtures ------------------------------------------------------------------------------------------------------
CASES = {
    "mlp_int8": lambda: mlp(0),
    "mlp_w4_int8": lambda: mlp(1, wbits=4, fmt="int8"),
    "mlp_w4_int4": lambda: mlp(2, wbits=4, fmt="int4"),
    "mlp_w2": lambda: mlp(3, wbits=2),
    "mlp_w1": lambda: mlp(4, wbits=1, last_bits=8),
    "mlp_a4": lambda: mlp(10, in_bits=4),
    "mlp_ties": lambda: mlp(9, ties=True),
    "mlp_odd_int4": lambda: mlp(11, obs_dim=7, hidden=(33, 65), actions=5, wbits=4, fmt="int4"),
    "mlp_wide": lambda: mlp(12, obs_dim=300, hidden=(700,), actions=18),
    "dueling": lambda: mlp(5, head="dueling"),
    "c51": lambda: mlp(6, head="c51"),
    "c51_dueling": lambda: mlp(7, head="c51_dueling"),
    "tanh": lambda: mlp(8, head="tanh"),
    "small_cnn": lambda: small_cnn(0),
    "small_cnn_int4": lambda: small_cnn(1, wbits=4, fmt="int4"),
    "small_cnn_a5": lambda: small_cnn(3, in_bits=5),
    "small_cnn_flat_out": lambda: small_cnn(2, flatten_out=True),
    "nature_int8": lambda: nature_cnn(0),
    "nature_int4": lambda: nature_cnn(1, wbits=4, fmt="int4"),
    "rainbow_c51": lambda: nature_cnn(2, head="c51"),
}


@pytest.fixture(scope="module")
def lib():
    from rlq.deploy.cpu import KernelBuildError, load_library
    try:
        return load_library()
    except KernelBuildError as e:
        pytest.skip(f"no C kernels: {e}")


@pytest.fixture(scope="module")
def vnni_lib():
    """A test build whose AVX-512 VNNI path runs on portable emulation of its five vector operations (this
    CPU may lack AVX-512): it checks the VNNI path's blocking, packing and epilogues."""
    from rlq.deploy.cpu import KernelBuildError, load_library
    try:
        return load_library(defines=("RLQ_VNNI_EMULATE",))
    except KernelBuildError as e:
        pytest.skip(f"no C kernels: {e}")


def _isa_paths(lib, vnni_lib):
    from rlq.deploy.cpu import available_isas
    paths = [(isa, lib) for isa in available_isas(lib)]
    if "avx512vnni" not in available_isas(lib) and "avx512vnni" in available_isas(vnni_lib):
        paths.append(("avx512vnni", vnni_lib))
    return paths


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.int32)


# -- int4 packing and the transcendental functions ------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 7, 64, 129])
def test_int4_pack_roundtrip(k):
    codes = np.random.default_rng(k).integers(-7, 8, size=(5, k)).astype(np.int8)
    packed = pack_int4(codes)
    assert packed.dtype == np.uint8 and packed.shape == (5, (k + 1) // 2)
    assert packed[0, 0] & 0x0F == codes[0, 0] + 8
    if k % 2:
        assert np.all(packed[:, -1] >> 4 == 8)  # the padding nibble is a zero weight
    np.testing.assert_array_equal(unpack_int4(packed, k), codes)


def test_rlq_exp_tanh_c_equals_numpy_and_are_accurate(lib):
    from rlq.deploy.cpu import exp_c, tanh_c
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-100, 100, 20000), rng.uniform(-1, 1, 20000), rng.normal(0, 1e-4, 1000),
                        [0.0, -0.0, 88.0, -87.0, 88.5, -90.0, 9.0, -9.0, 9.0001, np.inf, -np.inf, np.nan]]).astype(F)
    e_np, e_c = ref.rlq_exp(x), exp_c(lib, x)
    assert np.array_equal(np.isnan(e_np), np.isnan(e_c))
    np.testing.assert_array_equal(_bits(e_np)[~np.isnan(e_np)], _bits(e_c)[~np.isnan(e_c)])
    t_np, t_c = ref.rlq_tanh(x), tanh_c(lib, x)
    np.testing.assert_array_equal(_bits(t_np)[~np.isnan(t_np)], _bits(t_c)[~np.isnan(t_c)])
    inside = np.abs(x) < 80
    np.testing.assert_allclose(e_np[inside], np.exp(x[inside].astype(np.float64)), rtol=2e-7)
    fin = np.isfinite(x)
    np.testing.assert_allclose(t_np[fin], np.tanh(x[fin].astype(np.float64)), rtol=1e-6, atol=1e-7)


# -- bit-exactness: cpu (every ISA path) == reference ---------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_bit_exact_with_reference_on_every_isa(case, lib, vnni_lib):
    from rlq.deploy.cpu import CpuPolicy
    graph, tensors = CASES[case]()
    validate(graph, tensors)
    n = 3 if graph["observation"]["shape"][-1] == 84 else 64
    obs = obs_for(graph, n)
    want = ref.run_graph(graph, tensors, obs)
    assert np.isfinite(want).all()
    for isa, library in _isa_paths(lib, vnni_lib):
        pol = CpuPolicy(graph, tensors, isa=isa, library=library)
        assert pol.isa == isa
        if graph["act"] == "argmax":
            got = pol.q_values(obs)
            np.testing.assert_array_equal(pol.act(obs), np.argmax(want, axis=1))
            np.testing.assert_array_equal(pol.act(obs[1]), np.argmax(want[1]))  # the single-observation path
            np.testing.assert_array_equal(_bits(pol.q_values(obs[2])), _bits(want[2]))
        else:
            got = pol.action_mean(obs)
            np.testing.assert_array_equal(_bits(pol.act(obs[1])), _bits(want[1]))
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"{case} on {isa}")


def test_ties_round_half_to_even_happen(lib):
    """The ties case really exercises round-half-to-even: many y / s of the second layer are exact .5."""
    graph, tensors = mlp(9, ties=True)
    obs = obs_for(graph, 64)
    values = ref.run_graph(graph, tensors, obs, keep=True)
    second = graph["nodes"][1]
    y = values[graph["nodes"][0]["name"]] / F(second["in_scale"])
    assert np.mean(np.abs(y - np.floor(y)) == 0.5) > 0.1


@pytest.mark.parametrize("batch", [1, 2, 255, 256, 257, 600])
def test_batches_across_chunk_boundaries(batch, lib, vnni_lib):
    from rlq.deploy.cpu import CpuPolicy
    graph, tensors = mlp(13, hidden=(64, 64), actions=4)
    obs = obs_for(graph, batch, seed=batch)
    want = ref.run_graph(graph, tensors, obs)
    for isa, library in _isa_paths(lib, vnni_lib):
        got = CpuPolicy(graph, tensors, isa=isa, library=library).q_values(obs)
        np.testing.assert_array_equal(_bits(got), _bits(want))


def test_nonfinite_and_out_of_range_observations_match_reference(lib, vnni_lib):
    from rlq.deploy.cpu import CpuPolicy
    graph, tensors = mlp(14, obs_dim=6, hidden=(32,), actions=3)
    obs = obs_for(graph, 8)
    obs[0, 0], obs[1, 1], obs[2, 2], obs[3, :] = np.nan, np.inf, -np.inf, 1e30
    want = ref.run_graph(graph, tensors, obs)
    for isa, library in _isa_paths(lib, vnni_lib):
        got = CpuPolicy(graph, tensors, isa=isa, library=library).q_values(obs)
        np.testing.assert_array_equal(_bits(got), _bits(want))


# -- the Policy API ----------------------------------------------------------------------------------------------------
def test_load_policy_backends_and_api(tmp_path, lib):
    graph, tensors = small_cnn(4)
    path = _save(tmp_path, graph, tensors)
    obs = obs_for(graph, 5)
    r = load_policy(path, backend="reference")
    c = load_policy(path, backend="cpu")
    a = load_policy(path)  # auto: cpu when the kernels build
    assert (r.backend, c.backend, a.backend) == ("reference", "cpu", "cpu")
    assert "backend='cpu'" in repr(c) and "isa=" in repr(c)
    np.testing.assert_array_equal(c.act(obs), r.act(obs))
    single = c.act(obs[0])
    assert isinstance(single, np.integer) and single == r.act(obs)[0]
    assert c.q_values(obs[0]).shape == (3,)
    # float observations holding integers are accepted for a uint8 policy; anything else is refused
    np.testing.assert_array_equal(c.act(obs.astype(np.float64)), r.act(obs))
    with pytest.raises(ValueError, match="uint8"):
        c.act(obs.astype(np.float32) + 0.5)
    with pytest.raises(ValueError, match=r"observation shape \(5, 3, 11\) does not match"):
        c.act(obs[:, :, :, 0])
    with pytest.raises(ValueError, match="continuous"):
        load_policy(_save(tmp_path, *mlp(8, head="tanh"), name="t.rlqp")).q_values(np.zeros(4, F))
    with pytest.raises(ValueError, match="discrete"):
        c.action_mean(obs)
    with pytest.raises(ValueError, match="backend='gpu' is not supported"):
        load_policy(path, backend="gpu")
    assert c.act(obs[:0]).shape == (0,)


def test_isa_forced_by_argument_and_environment(tmp_path, lib, monkeypatch):
    from rlq.deploy.cpu import UnsupportedISAError, available_isas
    path = _save(tmp_path, *mlp(15, hidden=(16,)))
    monkeypatch.setenv("RLQ_DEPLOY_ISA", "scalar")
    assert load_policy(path, backend="cpu").isa == "scalar"
    monkeypatch.setenv("RLQ_DEPLOY_ISA", "sse9")
    with pytest.raises(ValueError, match=r"RLQ_DEPLOY_ISA='sse9' is not an instruction-set path \(allowed: scalar, "
                                         r"avx2, avx512vnni\)"):
        load_policy(path, backend="cpu")
    monkeypatch.delenv("RLQ_DEPLOY_ISA")
    assert load_policy(path, backend="cpu").isa == available_isas(lib)[-1]
    if "avx512vnni" not in available_isas(lib):
        with pytest.raises(UnsupportedISAError, match="avx512vnni: this CPU does not support it"):
            load_policy(path, backend="cpu", isa="avx512vnni")
    with pytest.raises(ValueError, match="isa= applies to backend='cpu'"):
        load_policy(path, backend="reference", isa="scalar")


def test_kernel_cache_rebuilds_when_the_source_changes(tmp_path):
    from rlq.deploy.cpu import SOURCE, load_library
    src = tmp_path / "kernel.c"
    src.write_text(SOURCE.read_text())
    load_library(source=src, directory=tmp_path / "cache")
    load_library(source=src, directory=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.so"))) == 1
    src.write_text(SOURCE.read_text() + "\n/* changed */\n")
    load_library(source=src, directory=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.so"))) == 2


def test_no_compiler_falls_back_to_reference_with_a_warning(tmp_path, monkeypatch):
    path = _save(tmp_path, *mlp(16, hidden=(8,)))
    code = ("import warnings, sys; from rlq.deploy import load_policy\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            f"    p = load_policy({str(path)!r})\n"
            "print(p.backend, 'unavailable' in str(w[0].message), 'torch' in sys.modules)\n")
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), RLQ_CACHE_DIR=str(tmp_path / "c"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "True", "False"]
    code2 = f"from rlq.deploy import load_policy; load_policy({str(path)!r}, backend='cpu')"
    out = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0 and "KernelBuildError" in out.stderr


def test_deploy_never_imports_torch(tmp_path, lib):
    path = _save(tmp_path, *nature_cnn(3, hw=44))
    code = ("import sys, numpy as np; from rlq.deploy import load_policy\n"
            f"p = load_policy({str(path)!r}, backend='cpu'); p.act(np.zeros((2, 4, 44, 44), np.uint8))\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- the file format -----------------------------------------------------------------------------------------------
def test_save_read_roundtrip(tmp_path):
    graph, tensors = mlp(17, head="c51_dueling")
    path = _save(tmp_path, graph, tensors)
    g2, t2 = read_policy(path)
    assert g2["nodes"] == graph["nodes"] and set(t2) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(t2[k], tensors[k])
        assert t2[k].dtype == tensors[k].dtype


def _corrupt(name):
    """(graph, tensors) of a small valid policy with one defect, and the expected error text."""
    g, t = small_cnn(5)
    n0, n1 = g["nodes"][0], g["nodes"][1]
    lin = g["nodes"][3]
    w0 = f"{n0['name']}.weight"
    if name == "format":
        g["format"] = "onnx"; return g, t, "format \"onnx\" is not 'rlq.policy'"
    if name == "version":
        g["version"] = 2; return g, t, "version 2 is newer"
    if name == "unknown_op":
        n1["op"] = "softmax"; return g, t, "unknown op \"softmax\""
    if name == "unknown_field":
        n0["dilation"] = [1, 1]; return g, t, "unknown field 'dilation'"
    if name == "missing_field":
        del n0["relu"]; return g, t, "required field 'relu' is missing"
    if name == "later_input":
        n0["inputs"] = [lin["name"]]; return g, t, "is not 'obs' or an earlier node"
    if name == "weight_shape":
        t[w0] = t[w0][:, :-1].copy(); return g, t, w0
    if name == "weight_dtype":
        t[w0] = t[w0].astype(np.int16); return g, t, w0
    if name == "conv_out_hw":
        n0["out_hw"] = [n0["out_hw"][0] + 1, n0["out_hw"][1]]; return g, t, "out_hw"
    if name == "bits":
        n0["weight_bits"] = 9; return g, t, "weight_bits"
    if name == "int4_bits":
        n0["weight_format"] = "int4"; return g, t, n0["name"]
    if name == "code_range":
        n0w = t[w0].copy(); n0w[0, 0] = -128; t[w0] = n0w; return g, t, "codes"
    if name == "nan_scale":
        t[f"{n0['name']}.out_scale"] = t[f"{n0['name']}.out_scale"].copy(); t[f"{n0['name']}.out_scale"][0] = np.nan
        return g, t, "out_scale"
    if name == "in_scale":
        n1["in_scale"] = 0.0; return g, t, "in_scale"
    if name == "zero_point":
        n1["in_zero_point"] = 256; return g, t, "in_zero_point"
    if name == "overflow":
        return _overflow_graph()
    if name == "output_shape":
        g["outputs"] = {"q_values": g["nodes"][1]["name"]}; return g, t, "needs (B, A)"
    if name == "act":
        g["act"] = "sample"; return g, t, "act \"sample\" is not supported"
    if name == "extra_tensor":
        t["stray"] = np.zeros(3, F); return g, t, "'stray' does not belong"
    if name == "missing_tensor":
        del t[f"{lin['name']}.bias"]; return g, t, f"{lin['name']}.bias"
    if name == "obs_dtype":
        g["observation"]["dtype"] = "float64"; return g, t, "observation dtype \"float64\""
    if name == "divide":
        g["preprocess"]["divide"] = 0; return g, t, "divide"
    raise KeyError(name)


def _overflow_graph():
    rng = np.random.default_rng(0)
    b = Builder(rng, (70000,))
    b.quant("linear", "obs", 2, relu=False)
    w = b.tensors["n0.weight"]
    w[:] = 127
    g, t = b.graph("n0")
    return g, t, "int32"


CORRUPTIONS = ["format", "version", "unknown_op", "unknown_field", "missing_field", "later_input", "weight_shape",
               "weight_dtype", "conv_out_hw", "bits", "int4_bits", "code_range", "nan_scale", "in_scale",
               "zero_point", "overflow", "output_shape", "act", "extra_tensor", "missing_tensor", "obs_dtype",
               "divide"]


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_validation_rejects_with_one_clear_line(name, tmp_path):
    g, t, text = _corrupt(name)
    with pytest.raises(PolicyFormatError) as e:
        validate(g, t)
    msg = str(e.value)
    assert "\n" not in msg and text in msg, msg
    # the same problem in a file is rejected by read_policy / load_policy before any kernel runs
    path = tmp_path / "bad.rlqp"
    import safetensors.numpy
    path.write_bytes(safetensors.numpy.save(t, metadata={"rlq_policy": json.dumps(g)}))
    with pytest.raises(PolicyFormatError):
        load_policy(path, backend="auto")


def test_unreadable_files_get_clear_errors(tmp_path):
    graph, tensors = mlp(18, hidden=(8,))
    good = _save(tmp_path, graph, tensors).read_bytes()
    cases = {"empty": b"", "truncated": good[: len(good) // 2], "foreign": b"PK\x03\x04 this is a zip file" * 10,
             "pickle": b"\x80\x04\x95" + b"\x00" * 40}
    header_len = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + header_len])
    header["__metadata__"] = {"something": "else"}
    hb = json.dumps(header).encode()
    cases["no_graph"] = struct.pack("<Q", len(hb)) + hb + good[8 + header_len:]
    for name, data in cases.items():
        p = tmp_path / f"{name}.rlqp"
        p.write_bytes(data)
        with pytest.raises(PolicyFormatError) as e:
            read_policy(p)
        assert "\n" not in str(e.value) and str(p.name) in str(e.value), (name, str(e.value))
    with pytest.raises(FileNotFoundError, match="policy file not found"):
        read_policy(tmp_path / "missing.rlqp")
