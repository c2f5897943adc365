"""Untrusted files: checkpoints and exported policies never execute code; mutated policy files (a seeded fuzz of
10k cases) give clean errors or run correctly, never crash; the native kernel under AddressSanitizer (slow)."""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

sys.path.insert(0, str(Path(__file__).parent))
from test_deploy import mlp, obs_for, small_cnn  # noqa: E402

from rlq.deploy import PolicyFormatError, load_policy  # noqa: E402
from rlq.deploy import reference as ref  # noqa: E402
from rlq.deploy.format import read_policy_bytes, save_policy  # noqa: E402


class _Payload:
    """Unpickling this creates the marker file (what an attacker's code would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_in_a_policy_file_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    files = {"raw_pickle.rlqp": pickle.dumps(_Payload(str(marker)))}
    buf = io.BytesIO()
    import torch
    torch.save({"x": _Payload(str(marker))}, buf)  # a torch zip checkpoint holding a payload, renamed
    files["torch_zip.rlqp"] = buf.getvalue()
    # a valid safetensors header whose metadata holds the pickle bytes (as latin-1 text) instead of a graph
    text = pickle.dumps(_Payload(str(marker)), protocol=0).decode("latin-1")
    files["pickle_in_metadata.rlqp"] = safetensors.numpy.save({"w": np.zeros(2, np.float32)},
                                                              metadata={"rlq_policy": text})
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(PolicyFormatError) as e:
            load_policy(path)
        assert "\n" not in str(e.value)
    from rlq.evaluate import evaluate_policy_file
    with pytest.raises(ValueError, match="cannot load policy file"):
        evaluate_policy_file(str(tmp_path / "raw_pickle.rlqp"), env="CartPole", episodes=1)
    assert not marker.exists()


def test_pickle_payload_in_a_checkpoint_does_not_run(tmp_path):
    """A checkpoint (torch's zip format) whose data holds a payload: loading refuses it, nothing runs."""
    import torch

    from rlq.checkpoint import CheckpointError, load_agent, load_checkpoint
    marker = tmp_path / "pwned"
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    torch.save({"format": "rlq.checkpoint", "version": 1, "config": _Payload(str(marker))},
               run / "step_0000000100.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError):
        load_agent(tmp_path / "run")
    res = subprocess.run([sys.executable, "-m", "rlq.evaluate", f"checkpoint={tmp_path / 'run'}"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    res = subprocess.run([sys.executable, "-m", "rlq.train", f"resume={tmp_path / 'run'}"], capture_output=True,
                         text=True)
    assert res.returncode != 0
    assert not marker.exists()


# -- the fuzz ---------------------------------------------------------------------------------------------------
WEIRD = [-1, 0, 1, 2, 3, 7, 8, 9, 255, 256, -128, 2 ** 31 - 1, 2 ** 31, 2 ** 40, -2 ** 31, 1e38, 1e-45, -0.5, 0.5, 3.5,
         "x", "", [], [1], [0, 0], [1, 2, 3], {}, None, True, False, "int4", "int8", "linear", "obs"]


def _bases():
    out = []
    for g, t in (mlp(0, obs_dim=5, hidden=(24, 17), actions=3), mlp(1, hidden=(16,), wbits=4, fmt="int4"),
                 mlp(2, obs_dim=3, hidden=(8,), head="c51_dueling", atoms=5), mlp(3, hidden=(8,), head="tanh"),
                 mlp(4, obs_dim=6, hidden=(40,), head="dueling", in_bits=5), small_cnn(0), small_cnn(1, wbits=4)):
        out.append((g, t, safetensors.numpy.save(t, metadata={"rlq_policy": json.dumps(g)})))
    return out


def _mutate(rng: np.random.Generator, graph: dict, tensors: dict, data: bytes) -> bytes:
    kind = rng.integers(6)
    if kind == 0:  # flip bytes anywhere
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(len(b)))] ^= int(rng.integers(1, 256))
        return bytes(b)
    if kind == 1:  # truncate, or append garbage
        if rng.random() < 0.7:
            return data[:int(rng.integers(len(data)))]
        return data + rng.bytes(int(rng.integers(1, 64)))
    if kind == 2:  # flip bytes in the tensor data only (weights, scales, biases)
        (n,) = struct.unpack("<Q", data[:8])
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 17))):
            b[8 + n + int(rng.integers(len(b) - 8 - n))] = int(rng.integers(256))
        return bytes(b)
    g = json.loads(json.dumps(graph))
    t = {k: v.copy() for k, v in tensors.items()}
    if kind == 3:  # a node field (or a top-level one) gets a weird value, or disappears
        nodes = g["nodes"]
        node = nodes[int(rng.integers(len(nodes)))] if rng.random() < 0.85 else g
        key = list(node)[int(rng.integers(len(node)))]
        if rng.random() < 0.15:
            del node[key]
        else:
            v = WEIRD[int(rng.integers(len(WEIRD)))]
            node[key] = v
            if isinstance(node.get("in_hw"), list) and rng.random() < 0.3:
                node["out_hw"] = [int(rng.integers(0, 40)), int(rng.integers(0, 40))]
    elif kind == 4:  # a tensor gets another shape, dtype or extreme values
        name = list(t)[int(rng.integers(len(t)))]
        a = t[name]
        r = rng.random()
        if r < 0.3 and a.size > 1:
            t[name] = a.reshape(-1)[: int(rng.integers(1, a.size))].copy()
        elif r < 0.45:
            t[name] = a.astype([np.int16, np.float64, np.uint8, np.int8, np.float32][int(rng.integers(5))])
        elif a.dtype == np.float32:
            t[name].reshape(-1)[int(rng.integers(a.size))] = [np.inf, -np.inf, np.nan, 0.0, -1.0, 3e38, 1e-40][
                int(rng.integers(7))]
        else:
            t[name].reshape(-1)[int(rng.integers(a.size))] = [0, 127, 128, 255, 136, 0x88, 1][int(rng.integers(7))] \
                if a.dtype == np.uint8 else [-128, 127, -127, 8, -8][int(rng.integers(5))]
    else:  # graph structure: reorder, drop or duplicate nodes, rewire an input, change the observation
        nodes = g["nodes"]
        r = rng.random()
        if r < 0.25 and len(nodes) > 1:
            i, j = rng.choice(len(nodes), 2, replace=False)
            nodes[i], nodes[j] = nodes[j], nodes[i]
        elif r < 0.45:
            nodes.pop(int(rng.integers(len(nodes))))
        elif r < 0.6:
            nodes.append(dict(nodes[int(rng.integers(len(nodes)))]))
        elif r < 0.8:
            node = nodes[int(rng.integers(len(nodes)))]
            node["inputs"] = [["obs", nodes[0]["name"], nodes[-1]["name"], "nope"][int(rng.integers(4))]]
        else:
            g["observation"]["shape"] = [int(x) for x in rng.integers(0, 20, int(rng.integers(0, 4)))]
    try:
        return safetensors.numpy.save(t, metadata={"rlq_policy": json.dumps(g)})
    except Exception:  # noqa: BLE001 - a mutation safetensors itself cannot write: use the original bytes
        return data


def fuzz(cases: int, seed: int, library=None, check_reference: bool = True) -> dict[str, int]:
    from rlq.deploy.cpu import CpuPolicy, available_isas, load_library
    lib = library or load_library()
    isas = available_isas(lib)
    rng = np.random.default_rng(seed)
    bases = _bases()
    stats = {"cases": 0, "rejected": 0, "loaded_and_ran": 0, "bit_exact": 0}
    for _ in range(cases):
        g, t, data = bases[int(rng.integers(len(bases)))]
        blob = _mutate(rng, g, t, data)
        stats["cases"] += 1
        try:
            graph, tensors = read_policy_bytes(blob, "fuzz.rlqp")
        except PolicyFormatError as e:
            assert "\n" not in str(e)
            stats["rejected"] += 1
            continue
        # a file that validates must run on every backend, bit-exact with the reference
        pol = CpuPolicy(graph, tensors, isa=isas[int(rng.integers(len(isas)))], library=lib)
        obs = obs_for(graph, 3, seed=int(rng.integers(1000)))
        out = pol.q_values(obs) if pol.discrete else pol.action_mean(obs)
        pol.act(obs[0])
        stats["loaded_and_ran"] += 1
        if check_reference:
            with np.errstate(all="ignore"):
                want = ref.run_graph(graph, tensors, obs)
            np.testing.assert_array_equal(out.view(np.int32), want.view(np.int32))
            stats["bit_exact"] += 1
    return stats


def test_fuzz_10k_mutated_policy_files():
    pytest.importorskip("rlq.deploy.cpu")
    from rlq.deploy.cpu import KernelBuildError, load_library
    try:
        load_library()
    except KernelBuildError as e:
        pytest.skip(str(e))
    stats = fuzz(10_000, seed=0)
    print(stats)
    assert stats["cases"] == 10_000 and stats["rejected"] > 5_000 and stats["loaded_and_ran"] > 300, stats


ASAN_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, {tests!r})
from rlq.deploy.cpu import load_library, CpuPolicy, available_isas
import test_untrusted as tu, test_deploy as td
from rlq.deploy import reference as ref
lib = load_library(flags=("-fsanitize=address", "-fno-omit-frame-pointer", "-g"), defines=("RLQ_VNNI_EMULATE",),
                   directory={cache!r})
n = 0
for case in td.CASES.values():
    g, t = case()
    obs = td.obs_for(g, 3)
    want = ref.run_graph(g, t, obs)
    for isa in available_isas(lib):
        got = CpuPolicy(g, t, isa=isa, library=lib)
        out = got.q_values(obs) if got.discrete else got.action_mean(obs)
        assert np.array_equal(out.view(np.int32), want.view(np.int32)), isa
        got.act(obs[0]); n += 1
print("bit-exact paths", n, "fuzz", tu.fuzz({cases}, seed=1, library=lib))
"""


@pytest.mark.slow
def test_kernels_under_address_sanitizer(tmp_path):
    """Every ISA path (AVX-512 VNNI emulated) on the bit-exact cases and a 2k-case fuzz, in a build with
    AddressSanitizer (numpy's buffers come from ASan's malloc: reads or writes past them abort the process)."""
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not libasan or not Path(libasan).exists():
        pytest.skip("libasan not available")
    code = ASAN_SCRIPT.format(tests=str(Path(__file__).parent), cache=str(tmp_path / "k"), cases=2000)
    env = dict(os.environ, LD_PRELOAD=str(Path(libasan).resolve()), ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0 and "ERROR: AddressSanitizer" not in res.stderr, res.stderr[-4000:]
    assert "bit-exact paths" in res.stdout
    print(res.stdout)
