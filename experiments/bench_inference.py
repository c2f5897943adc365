"""Inference latency of deployed policies: rlq's compiled CPU kernels (int8 and int4 files) against torch fp32
eager, torch int8 dynamic quantization and (when installed) ONNX Runtime int8, for the 2x256 MLP (CartPole
shapes) and the Nature CNN (Pong shapes), batch 1 and batch 32; plus file sizes.

    python experiments/bench_inference.py [--rounds 7] [--threads 1] [--out experiments/results/bench_inference.md]

Every setting is timed inside each round, in turn, so that machine noise hits them alike; the table has the
median over rounds of each round's best-of-5 mean latency. "per action" = latency / batch. Batch 1 goes
through each runtime's Python API on one observation (rlq: ``policy.act(obs)``; torch:
``net(obs[None]).argmax(1)`` under ``inference_mode``; ONNX Runtime: ``session.run``). "rlq kernel only" is
``rlq_run_staged_repeat``: back-to-back native calls with no Python in the loop. torch and ONNX Runtime run
with ``--threads`` intra-op threads; rlq's kernels are single-threaded. The networks are random-initialised
torch networks, quantized (QAT layers, weights per channel, activations calibrated on random inputs) and
exported with ``rlq.export.network_graph``; latency does not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from rlq.deploy import load_policy, save_policy
from rlq.deploy.cpu import available_isas, load_library
from rlq.export import network_graph
from rlq.nets.encoders import MLPEncoder, NatureCNN
from rlq.nets.heads import QHead, QNetwork
from rlq.quant import QuantConfig, calibrate, quantize_

RESULTS = Path(__file__).resolve().parent / "results"


def nets() -> dict[str, tuple[QNetwork, gym.spaces.Box]]:
    torch.manual_seed(0)
    return {
        "MLP 4-256-256-2": (QNetwork(MLPEncoder(4, (256, 256)), QHead(256, 2)),
                            gym.spaces.Box(-5, 5, (4,), np.float32)),
        "Nature CNN 4x84x84-6": (QNetwork(NatureCNN(4, 512), QHead(512, 6)),
                                 gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)),
    }


def sample_obs(space: gym.spaces.Box, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if space.dtype == np.uint8:
        return rng.integers(0, 256, size=(n, *space.shape), dtype=np.uint8)
    return rng.normal(0, 1, size=(n, *space.shape)).astype(np.float32)


def export(net: QNetwork, space, bits: int, path: Path) -> Path:
    import copy
    q = copy.deepcopy(net)
    cfg = QuantConfig(name=f"w{bits}a8", weight_bits=bits, first_bits=None, last_bits=None)
    quantize_(q, cfg, torch.as_tensor(sample_obs(space, 2)), pixel_input=space.dtype == np.uint8)
    calibrate(q, sample_obs(space, 256, seed=1))
    graph, tensors = network_graph(q, space, meta={"bits": bits})
    save_policy(path, graph, tensors)
    return path


def timer(fn, n: int) -> float:
    """Best of 5 means of ``n`` calls, in seconds per call."""
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def onnx_int8(net: QNetwork, space, tmp: Path):
    """An ONNX Runtime session of the fp32 network quantized with ORT's dynamic int8 quantization."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return None
    f32, i8 = tmp / "net.onnx", tmp / "net_int8.onnx"
    x = torch.as_tensor(sample_obs(space, 1)).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Float(net), (x,), str(f32), dynamo=False, input_names=["obs"], output_names=["q"],
                          dynamic_axes={"obs": {0: "b"}, "q": {0: "b"}})
        quantize_dynamic(str(f32), str(i8), weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(i8), so, providers=["CPUExecutionProvider"])


class _Float(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def cpu_info() -> str:
    model = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    feats = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni") if f in flags]
    return f"{model}; {os.cpu_count()} logical CPUs; features: {', '.join(feats) or 'none of avx2/avx512'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "bench_inference.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = load_library()
    isas = available_isas(lib)
    tmp = Path(tempfile.mkdtemp(prefix="rlq_bench_inf_"))
    rows: list[dict] = []
    sizes: list[str] = []
    for name, (net, space) in nets().items():
        net.eval()
        fp32_bytes = sum(p.numel() * 4 for p in net.parameters())
        files = {bits: export(net, space, bits, tmp / f"{bits}.rlqp") for bits in (8, 4)}
        sizes.append(f"| {name} | {fp32_bytes:,} | {files[8].stat().st_size:,} "
                     f"({files[8].stat().st_size / fp32_bytes:.1%}) | {files[4].stat().st_size:,} "
                     f"({files[4].stat().st_size / fp32_bytes:.1%}) |")
        dyn = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)
        sess = onnx_int8(net, space, tmp)
        b1 = sample_obs(space, 1, seed=3)
        b32 = sample_obs(space, 32, seed=4)
        one = b1[0]
        settings: dict[str, dict] = {}
        for bits in (8, 4):
            for isa in isas:
                pol = load_policy(files[bits], backend="cpu", isa=isa)
                settings[f"rlq int{bits} ({isa})"] = dict(
                    b1=lambda p=pol: p.act(one), b32=lambda p=pol: p.act(b32),
                    kernel=lambda n, p=pol: p._lib.rlq_run_staged_repeat(p._ctx_ptr, n))
        t1, t32 = torch.as_tensor(b1), torch.as_tensor(b32)

        def torch_act(m, x):
            with torch.inference_mode():
                return m(x).argmax(1)
        settings["torch fp32 eager"] = dict(b1=lambda: torch_act(net, t1), b32=lambda: torch_act(net, t32))
        settings["torch int8 dynamic (Linear only)"] = dict(b1=lambda: torch_act(dyn, t1.float()),
                                                            b32=lambda: torch_act(dyn, t32.float()))
        if sess is not None:
            f1, f32_ = b1.astype(np.float32), b32.astype(np.float32)
            settings["onnxruntime int8 dynamic"] = dict(b1=lambda: sess.run(None, {"obs": f1})[0].argmax(1),
                                                        b32=lambda: sess.run(None, {"obs": f32_})[0].argmax(1))
        cnn = space.dtype == np.uint8
        n1, n32 = (300, 30) if cnn else (20000, 2000)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for key, s in settings.items():
                times.setdefault((key, "b1"), []).append(timer(s["b1"], n1))
                times.setdefault((key, "b32"), []).append(timer(s["b32"], n32))
                if "kernel" in s:
                    reps = n1
                    times.setdefault((key, "kernel"), []).append(timer(lambda f=s["kernel"], r=reps: f(r), 1) / reps)
        for key in settings:
            med = {k: statistics.median(times[(key, k)]) * 1e6 for k in ("b1", "b32", "kernel") if (key, k) in times}
            rows.append(dict(net=name, setting=key, **med))
        print(f"{name}: done", file=sys.stderr)

    lines = ["# Inference latency of deployed policies", "",
             f"Command: `python experiments/bench_inference.py --rounds {args.rounds} --threads {args.threads}`  ",
             f"Machine: {cpu_info()}  ",
             f"rlq kernel paths on this CPU: {', '.join(isas)}  ",
             f"Versions: Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}"
             + (f", onnxruntime {__import__('onnxruntime').__version__}" if _has("onnxruntime") else "")
             + f"; compiler: {_cc_version()}  ",
             f"Threads: torch / ONNX Runtime intra-op {args.threads}; rlq kernels single-threaded. "
             f"Medians over {args.rounds} rounds (best-of-5 means in each).", "",
             "| network | runtime | batch 1: µs per action | batch 32: µs per batch | batch 32: µs per action | "
             "kernel only, batch 1: µs |", "|---|---|---|---|---|---|"]
    for r in rows:
        kern = f"{r['kernel']:.2f}" if "kernel" in r else ""
        lines.append(f"| {r['net']} | {r['setting']} | {r['b1']:.2f} | {r['b32']:.1f} | {r['b32'] / 32:.2f} | {kern} |")
    lines += ["", "File sizes (bytes; fp32 = the torch network's parameters x 4; int4 files keep every layer at "
              "4 bits here, scales and biases in float32):", "",
              "| network | fp32 weights | rlq int8 file | rlq int4 file |", "|---|---|---|---|", *sizes, ""]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


def _has(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def _cc_version() -> str:
    from rlq.deploy.cpu import compiler
    cc = compiler()
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except Exception:  # noqa: BLE001
        return str(cc)


if __name__ == "__main__":
    main()
