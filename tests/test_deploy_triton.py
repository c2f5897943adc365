"""The triton backend, its kernels run by Triton's interpreter on the CPU (TRITON_INTERPRET=1): bit-exact with the
numpy reference on random networks of several shapes (int8, int4, 2- and 1-bit weights, ties, heads, convs).
Skipped when triton is not installed (``pip install "rlq[triton]"``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).parent))
from test_deploy import mlp, nature_cnn, obs_for, small_cnn

from rlq.deploy import load_policy, save_policy
from rlq.deploy import reference as ref

CASES = {
    "mlp_int8": lambda: mlp(0, obs_dim=7, hidden=(40, 33)),
    "mlp_w4_int4": lambda: mlp(2, hidden=(64,), wbits=4, fmt="int4"),
    "mlp_w2": lambda: mlp(3, hidden=(32,), wbits=2),
    "mlp_w1": lambda: mlp(4, hidden=(32,), wbits=1, last_bits=8),
    "mlp_ties": lambda: mlp(9, hidden=(32, 32), ties=True),
    "mlp_a4": lambda: mlp(10, hidden=(32,), in_bits=4),
    "mlp_odd_int8": lambda: mlp(12, obs_dim=7, hidden=(33, 65), actions=5),
    "mlp_odd_int4": lambda: mlp(11, obs_dim=7, hidden=(33, 65), actions=5, wbits=4, fmt="int4"),
    "dueling": lambda: mlp(5, hidden=(32,), head="dueling"),
    "c51": lambda: mlp(6, hidden=(32,), head="c51"),
    "c51_dueling": lambda: mlp(7, hidden=(32,), head="c51_dueling"),
    "tanh": lambda: mlp(8, hidden=(32,), head="tanh"),
    "small_cnn": lambda: small_cnn(0),
    "small_cnn_int4": lambda: small_cnn(1, wbits=4, fmt="int4"),
    "nature_44": lambda: nature_cnn(0, hw=44, fc=64),
    "nature_84": lambda: nature_cnn(1),
}
SLOW = {"nature_84"}  # ~100 s in the interpreter on one thread (two forward passes): pytest -m slow


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_triton_bit_exact_with_reference(case, tmp_path):
    graph, tensors = CASES[case]()
    path = tmp_path / "p.rlqp"
    save_policy(path, graph, tensors)
    pol = load_policy(path, backend="triton")
    assert pol.backend == "triton"
    obs = obs_for(graph, 2 if "nature" in case else 9)
    if graph["observation"]["dtype"] == "float32":  # non-finite and huge inputs clamp (NaN gives code 0)
        obs[0, 0], obs[1, 1], obs[2, 2], obs[3, :] = np.nan, np.inf, -np.inf, 1e30
    want = ref.run_graph(graph, tensors, obs)
    got = pol.q_values(obs) if pol.discrete else pol.action_mean(obs)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    if pol.discrete:
        np.testing.assert_array_equal(pol.act(obs), np.argmax(want, axis=1))
        if "nature" not in case:  # (each forward pass of a Nature CNN is slow in the interpreter)
            assert pol.act(obs[1]) == np.argmax(want[1])  # a single observation
    else:
        np.testing.assert_array_equal(pol.act(obs).view(np.int32), want.view(np.int32))


def test_triton_empty_batch_and_single_observation(tmp_path):
    graph, tensors = mlp(5, hidden=(32,), head="dueling", actions=3)
    path = tmp_path / "p.rlqp"
    save_policy(path, graph, tensors)
    pol = load_policy(path, backend="triton")
    obs = obs_for(graph, 4)
    assert pol.q_values(obs[:0]).shape == (0, 3) and pol.act(obs[:0]).shape == (0,)
    want = ref.run_graph(graph, tensors, obs[2:3])[0]
    np.testing.assert_array_equal(pol.q_values(obs[2]).view(np.int32), want.view(np.int32))


def test_fp_fusion_launch_option_exists():
    """The interpreter accepts (and ignores) any launch option, so check the GPU backends still know
    ``enable_fp_fusion`` (without it a GPU could contract ``float32(acc) * out_scale + bias`` into an FMA)."""
    from triton.backends.nvidia.compiler import CUDAOptions
    assert "enable_fp_fusion" in CUDAOptions.__dataclass_fields__


def test_triton_needs_a_gpu_or_the_interpreter(tmp_path, monkeypatch):
    import torch

    from rlq.deploy import triton_backend
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(triton_backend, "_INTERPRETED", False)  # as if imported without TRITON_INTERPRET=1
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="backend='triton' needs a CUDA GPU, or TRITON_INTERPRET=1") as e:
        triton_backend._device()
    assert "set after" not in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="set after rlq.deploy.triton_backend was imported"):
        triton_backend._device()
