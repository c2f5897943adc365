"""rlq.export: torch policies -> low-bit policy files that the deploy runtime runs like the torch model."""
import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from rlq.export import ExportError, network_graph, pack_int4
from rlq.nets.distributional import CategoricalHead
from rlq.nets.encoders import MLPEncoder, NatureCNN
from rlq.nets.heads import DuelingHead, QHead, QNetwork
from rlq.quant import QuantConfig, quantize_, set_quant_enabled

deploy = pytest.importorskip("rlq.deploy")

VEC = gym.spaces.Box(-5, 5, (6,), np.float32)
IMG = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)


def _quantized(net, x, cfg):
    quantize_(net, cfg, x)
    for _ in range(2):
        net(x)  # observers see data
    set_quant_enabled(net)
    net(x)
    return net.eval()


def _roundtrip(tmp_path, net, space, x):
    graph, tensors = network_graph(net, space)
    path = tmp_path / "p.rlqp"
    deploy.save_policy(path, graph, tensors)
    policy = deploy.load_policy(path, backend="reference")
    with torch.no_grad():
        q_torch = net.q_values(torch.as_tensor(x)).numpy()
    return policy, q_torch, path


def _assert_backends_bit_exact(path, obs):
    """Every backend (cpu on each ISA path, the AVX-512 VNNI one emulated when the CPU lacks it) gives the
    reference's outputs bit for bit on a real exported network."""
    if not _have_kernels():
        pytest.skip("no C compiler")
    from rlq.deploy.cpu import CpuPolicy, available_isas, load_library
    graph, tensors = deploy.read_policy(path)
    want = deploy.load_policy(path, backend="reference").q_values(obs)
    lib, emu = load_library(), load_library(defines=("RLQ_VNNI_EMULATE",))
    paths = [(isa, lib) for isa in available_isas(lib)]
    if "avx512vnni" not in available_isas(lib):
        paths.append(("avx512vnni", emu))
    for isa, library in paths:
        got = CpuPolicy(graph, tensors, isa=isa, library=library).q_values(obs)
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32), err_msg=isa)
    triton_policy = _triton(path)
    if triton_policy is not None:  # Triton's kernels in its interpreter (CPU)
        got = triton_policy.q_values(obs[:4])
        np.testing.assert_array_equal(got.view(np.int32), want[:4].view(np.int32), err_msg="triton")


def _triton(path):
    """The file on the triton backend under TRITON_INTERPRET=1, or None when triton is not installed."""
    import importlib.util
    import os
    if importlib.util.find_spec("triton") is None:
        return None
    if os.environ.get("TRITON_INTERPRET") != "1" and "triton" in sys.modules:
        return None  # the interpreter is chosen when triton is imported: run with TRITON_INTERPRET=1 for this check
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return deploy.load_policy(path, backend="triton")


def test_pack_int4_layout():
    codes = np.array([[-7, 7, 0], [1, -1, 3]], np.int8)
    packed = pack_int4(codes)
    assert packed.tolist() == [[(1 | (15 << 4)), 8 | (8 << 4)], [9 | (7 << 4), 11 | (8 << 4)]]


@pytest.mark.parametrize("head", ["q", "dueling", "c51", "c51_dueling"])
@pytest.mark.parametrize("bits", [8, 4])
def test_mlp_policies_match_the_fake_quant_model(tmp_path, head, bits):
    torch.manual_seed(0)
    heads = {"q": QHead(64, 3, hidden=32), "dueling": DuelingHead(64, 3, hidden=32),
             "c51": CategoricalHead(64, 3, 11, -5, 5, hidden=32),
             "c51_dueling": CategoricalHead(64, 3, 11, -5, 5, dueling=True, hidden=32)}
    net = QNetwork(MLPEncoder(6, (64, 64)), heads[head])
    x = torch.randn(2000, 6) * 2
    cfg = QuantConfig(name=f"w{bits}a8", weight_bits=bits, weight_mode="max" if bits == 8 else "lsq")
    _quantized(net, x[:256], cfg)
    policy, q_torch, _ = _roundtrip(tmp_path, net, VEC, x.numpy())
    q = policy.q_values(x.numpy())
    scale = float(np.abs(q_torch).max())
    # the same quantized function; float rounding in another order can move a code by one step
    assert np.isclose(q, q_torch, rtol=1e-4, atol=1e-4 * scale).all(1).mean() >= 0.99
    np.testing.assert_allclose(q, q_torch, atol=0.03 * scale)
    assert (policy.act(x.numpy()) == q_torch.argmax(1)).mean() >= 0.99
    _assert_backends_bit_exact(tmp_path / "p.rlqp", x.numpy()[:300])


@pytest.mark.parametrize("bits", [8, 4])
def test_rainbow_cnn_policy_matches(tmp_path, bits):
    """A Pong-sized Rainbow network (Nature CNN, noisy dueling C51 head), 8-bit and 4-bit (int4-packed)."""
    torch.manual_seed(0)
    net = QNetwork(NatureCNN(4, 0), CategoricalHead(3136, 6, 51, -10, 10, dueling=True, hidden=64, noisy=True))
    x = torch.randint(0, 256, (16, 4, 84, 84), dtype=torch.uint8)
    _quantized(net, x, QuantConfig(name=f"w{bits}a8", weight_bits=bits, first_bits=None, last_bits=None))
    policy, q_torch, path = _roundtrip(tmp_path, net, IMG, x.numpy())
    q = policy.q_values(x.numpy())
    np.testing.assert_allclose(q, q_torch, atol=0.03 * float(np.abs(q_torch).max()))
    graph, _ = deploy.read_policy(path)
    assert [n["op"] for n in graph["nodes"]][-1] == "c51" and graph["preprocess"]["divide"] == 255.0
    assert {n.get("weight_format") for n in graph["nodes"]} >= {"int4" if bits == 4 else "int8"}
    _assert_backends_bit_exact(path, x.numpy()[:4])


def test_int4_file_is_smaller(tmp_path):
    sizes = {}
    for bits in (8, 4):
        torch.manual_seed(0)
        net = QNetwork(MLPEncoder(6, (256, 256)), QHead(256, 4))
        x = torch.randn(256, 6)
        _quantized(net, x, QuantConfig(name="w", weight_bits=bits, first_bits=None, last_bits=None))
        graph, tensors = network_graph(net, VEC)
        deploy.save_policy(tmp_path / f"{bits}.rlqp", graph, tensors)
        sizes[bits] = (tmp_path / f"{bits}.rlqp").stat().st_size
    fp32_bytes = 4 * (6 * 256 + 256 * 256 + 256 * 4)
    assert sizes[4] < 0.6 * sizes[8] and sizes[4] < 0.16 * fp32_bytes, sizes


def test_unquantized_network_is_rejected():
    net = QNetwork(MLPEncoder(6, (8,)), QHead(8, 2))
    with pytest.raises(ExportError, match="not quantized"):
        network_graph(net, VEC)


def _train(tmp_path, name, *extra):
    from rlq.train import _compose, build_config
    from rlq.trainer import Trainer
    ov = ["agent=dqn", "total_steps=2000", "agent.learning_starts=500", "eval.every=0", "eval.final=false",
          "checkpoint.every=0", "log.progress=false", "log.tensorboard=false", *extra]
    cfg = build_config(_compose(ov), ov)
    tr = Trainer(cfg, tmp_path / name)
    tr.train()
    tr.close()
    return tr


def test_exported_qat_policy_agrees_with_the_qat_model(tmp_path):
    """The issue's bar: >= 99.9% of greedy actions equal on held-out observations."""
    from rlq.checkpoint import load_agent
    from rlq.export import ExportError, export_agent
    tr = _train(tmp_path, "qat", "quant=w8a8")
    agent = load_agent(tmp_path / "qat")
    calib = tmp_path / "calib.npy"
    np.save(calib, tr.buffer.sample(2000).obs.numpy())
    with pytest.raises(ExportError, match="exported as trained"):
        export_agent(agent, tmp_path / "no.rlqp", calib=str(calib), bias_correction=True)
    summary = export_agent(agent, tmp_path / "qat.rlqp", calib=str(calib))
    assert summary["mode"] == "qat" and summary["agreement"] >= 0.999
    held_out = np.random.default_rng(1).normal(0, 0.5, size=(20_000, 4)).astype(np.float32)
    policy = deploy.load_policy(tmp_path / "qat.rlqp", backend="reference")
    assert (policy.act(held_out) == agent.act(held_out, explore=False)).mean() >= 0.999
    # played in the env by rlq.evaluate (compiled kernels), it returns what the QAT checkpoint returns
    from rlq.evaluate import evaluate_checkpoint, evaluate_policy_file
    backend = "cpu" if _have_kernels() else "reference"
    by_policy = evaluate_policy_file(str(tmp_path / "qat.rlqp"), env="CartPole", episodes=6, seed=5, num_envs=3,
                                     backend=backend)
    by_model = evaluate_checkpoint(str(tmp_path / "qat"), episodes=6, seed=5, num_envs=3)
    assert by_policy["backend"] == backend and by_policy["returns"] == by_model["returns"]
    _assert_backends_bit_exact(tmp_path / "qat.rlqp", held_out[:2000])


def _have_kernels() -> bool:
    try:
        from rlq.deploy.cpu import load_library
        load_library()
        return True
    except Exception:  # noqa: BLE001
        return False


def test_export_cli_ptq_from_a_float_run(tmp_path):
    _train(tmp_path, "fp32", "checkpoint.save_replay=true")
    out = tmp_path / "p4.rlqp"
    r = subprocess.run([sys.executable, "-m", "rlq.export", f"checkpoint={tmp_path / 'fp32'}", "bits=4",
                        f"out={out}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "ptq" and summary["weight_bits"] == [4, 8] and summary["agreement"] > 0.9
    graph, _ = deploy.read_policy(out)
    assert graph["meta"]["agent"] == "dqn" and graph["observation"] == {"shape": [4], "dtype": "float32"}
    _assert_backends_bit_exact(out, np.random.default_rng(2).normal(0, 0.5, size=(2000, 4)).astype(np.float32))
    # the file names its env: `python -m rlq.evaluate policy=<file>` plays it with no other argument
    r = subprocess.run([sys.executable, "-m", "rlq.evaluate", f"policy={out}", "episodes=2", "json=true"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    res = res["runs"][0] if "runs" in res else res
    assert res["env"] == "CartPole" and len(res["returns"]) == 2 and min(res["returns"]) >= 1
    # the two PTQ corrections: the file is still bit exact across backends and agrees with its torch model
    out = tmp_path / "p8c.rlqp"
    r = subprocess.run([sys.executable, "-m", "rlq.export", f"checkpoint={tmp_path / 'fp32'}", "equalize=true",
                        "bias_correction=true", f"out={out}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "ptq" and summary["weight_bits"] == [8] and summary["agreement"] > 0.95
    _assert_backends_bit_exact(out, np.random.default_rng(3).normal(0, 0.5, size=(2000, 4)).astype(np.float32))


@pytest.mark.parametrize("args,msg", [
    (["out=x.rlqp"], "checkpoint= is required"),
    (["checkpoint=x"], "out= is required"),
    (["checkpoint=x", "out=y", "bits=3"], "bits=3"),
    (["checkpoint=x", "out=y", "calib_method=best"], "calib_method='best'"),
    (["checkpoint=x", "out=y", "frobnicate=1"], "unknown argument 'frobnicate'"),
    (["checkpoint=x", "out=y", "equalize=yes"], "equalize='yes' is not a boolean"),
])
def test_export_cli_errors(args, msg):
    r = subprocess.run([sys.executable, "-m", "rlq.export", *args], capture_output=True, text=True)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _train_env(tmp_path, name, *extra):
    from rlq.train import _compose, build_config
    from rlq.trainer import Trainer
    ov = ["total_steps=900", "agent.learning_starts=400", "agent.batch_size=64", "eval.every=0", "eval.final=false",
          "checkpoint.every=0", "log.progress=false", "log.tensorboard=false", *extra]
    cfg = build_config(_compose(ov), ov)
    tr = Trainer(cfg, tmp_path / name)
    tr.train()
    tr.close()
    return tr


@pytest.mark.parametrize("agent,quant", [("sac", "w8a8"), ("dsac", "none"), ("sac", "w4a8")])
def test_sac_actor_exports_its_deterministic_action(tmp_path, agent, quant):
    """SAC / DSAC actors: the mean rows of the last layer, then tanh_bound to the env's bounds; the file's
    actions match the agent's deterministic actions, and every backend is bit-exact."""
    from rlq.checkpoint import load_agent
    from rlq.export import export_agent
    tr = _train_env(tmp_path, agent, f"agent={agent}", "env=Pendulum", f"quant={quant}", "quant.start_step=0")
    policy_agent = load_agent(tmp_path / agent)
    calib = tmp_path / "obs.npy"
    np.save(calib, tr.buffer.sample(1000).obs.numpy())
    summary = export_agent(policy_agent, tmp_path / "actor.rlqp", bits=None if quant != "none" else 8, calib=str(calib))
    assert summary["mode"] == ("qat" if quant != "none" else "ptq")
    graph, _ = deploy.read_policy(tmp_path / "actor.rlqp")
    assert graph["act"] == "identity" and graph["nodes"][-1]["op"] == "tanh_bound"
    held = np.random.default_rng(3).uniform(-1, 1, size=(3000, 3)).astype(np.float32)
    held[:, 2] *= 8
    pol = deploy.load_policy(tmp_path / "actor.rlqp", backend="reference")
    got, want = pol.act(held), policy_agent.act(held, explore=False)
    assert got.shape == want.shape == (3000, 1) and np.all(np.abs(got) <= 2.0)
    err = np.abs(got - want).max(axis=1) / 4.0  # share of the action range
    assert (err <= 0.01).mean() >= (0.999 if quant != "none" else 0.95), np.sort(err)[-10:]
    _assert_backends_action_bit_exact(tmp_path / "actor.rlqp", held[:500])


def test_discrete_sac_actor_exports(tmp_path):
    from rlq.checkpoint import load_agent
    from rlq.export import export_agent
    tr = _train_env(tmp_path, "sacd", "agent=sac_discrete", "quant=w8a8", "quant.start_step=0")
    agent = load_agent(tmp_path / "sacd")
    calib = tmp_path / "obs.npy"
    np.save(calib, tr.buffer.sample(1000).obs.numpy())
    summary = export_agent(agent, tmp_path / "sacd.rlqp", calib=str(calib))
    assert summary["mode"] == "qat" and summary["agreement"] >= 0.999
    _assert_backends_bit_exact(tmp_path / "sacd.rlqp", np.load(calib)[:500])


def _assert_backends_action_bit_exact(path, obs):
    if not _have_kernels():
        pytest.skip("no C compiler")
    from rlq.deploy.cpu import CpuPolicy, available_isas, load_library
    graph, tensors = deploy.read_policy(path)
    want = deploy.load_policy(path, backend="reference").action_mean(obs)
    lib = load_library()
    for isa in available_isas(lib):
        got = CpuPolicy(graph, tensors, isa=isa, library=lib).action_mean(obs)
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32), err_msg=isa)
    triton_policy = _triton(path)
    if triton_policy is not None:
        np.testing.assert_array_equal(triton_policy.action_mean(obs[:16]).view(np.int32), want[:16].view(np.int32))
