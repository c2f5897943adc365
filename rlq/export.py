"""``python -m rlq.export checkpoint=<run_dir|file> [bits=8|4] [calib=replay|rollout|<obs.npy>] out=<file>``

Writes a trained policy as a low-bit policy file (``rlq/deploy/FORMAT.md``: safetensors with integer
weights, float32 scales and biases, and a JSON graph), runnable with ``rlq.load_policy`` without torch.

- A network trained with QAT (``quant=w8a8|w4a8|w2a8``, quantization switched on) is exported as trained:
  its integer weights, scales and zero points are exactly what its fake-quant forward used.
- A float network is post-training quantized first: ``bits`` for the weights (8, the default, or 4; first
  and last layers 8-bit), activation ranges calibrated (``calib_method=minmax|percentile|mse``) on observations
  from ``calib``: ``replay`` (the checkpoint's saved replay buffer, ``checkpoint.save_replay=true``),
  ``rollout`` (play ``calib_steps`` steps with the greedy policy, epsilon 0.1), or a ``.npy`` file of
  observations. The default is ``replay`` when the checkpoint has one, else ``rollout``. Two PTQ corrections
  from the same observations, off by default: ``equalize=true`` (``rlq.quant.equalize_``, cross-layer scaling of
  the float network's Linear layers before quantizing) and ``bias_correction=true`` (``rlq.quant.bias_correct``
  after calibrating). Measured on CartPole in ``experiments/results/qat_cartpole.md``.

After writing, the file is loaded with the numpy reference backend and its greedy actions are compared
with the torch model's on the calibration observations (printed as "agreement").
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlq.nets.ensemble import EnsembleQNetwork, mean_q_network
from rlq.quant import (QuantConfig, bias_correct, calibrate, equalize_, integer_layer, is_quantized, quant_layers,
                       quantize_)
from rlq.quant.layers import QUANT_LAYERS

USAGE = ("usage: python -m rlq.export checkpoint=<run_dir|file> out=<file> [bits=8|4] "
         "[calib=replay|rollout|<obs.npy>] [calib_method=minmax|percentile|mse] [calib_steps=5000] "
         "[equalize=false|true] [bias_correction=false|true]")
KEYS = {"checkpoint": str, "out": str, "bits": int, "calib": str, "calib_method": str, "calib_steps": int,
        "equalize": bool, "bias_correction": bool}


class ExportError(ValueError):
    """A network or argument that cannot be exported (one-line message)."""


# -- torch network -> graph ------------------------------------------------------------------------------
class _GraphBuilder:
    def __init__(self, obs_shape: tuple[int, ...]):
        self.nodes: list[dict[str, Any]] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...]] = {"obs": tuple(obs_shape)}

    def _name(self) -> str:
        return f"n{len(self.nodes)}"

    def layer(self, m: nn.Module, inp: str) -> str:
        il = integer_layer(m)
        name = self._name()
        out = int(il.weight.shape[0])
        codes = il.weight.reshape(out, -1).astype(np.int8)
        int4 = il.weight_bits <= 4
        node: dict[str, Any] = {
            "name": name, "op": il.kind, "inputs": [inp], "in_scale": float(il.in_scale),
            "in_zero_point": int(il.in_zero_point), "in_bits": int(il.in_bits), "weight_bits": int(il.weight_bits),
            "weight_format": "int4" if int4 else "int8", "relu": False}
        shape = self.shapes[inp]
        if il.kind == "linear":
            if len(shape) != 1 or shape[0] != codes.shape[1]:
                raise ExportError(f"linear layer {name} expects {codes.shape[1]} inputs, gets shape {shape}")
            node.update(in_features=int(codes.shape[1]), out_features=out)
            self.shapes[name] = (out,)
        else:
            c, h, w = shape
            kh, kw = (int(k) for k in il.weight.shape[2:])
            (sh, sw), (ph, pw) = il.stride, il.padding
            oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
            node.update(in_channels=int(c), out_channels=out, kernel=[kh, kw], stride=[int(sh), int(sw)],
                        padding=[int(ph), int(pw)], in_hw=[int(h), int(w)], out_hw=[oh, ow])
            self.shapes[name] = (out, oh, ow)
        self.tensors[f"{name}.weight"] = pack_int4(codes) if int4 else codes
        self.tensors[f"{name}.out_scale"] = il.out_scale.astype(np.float32)
        self.tensors[f"{name}.bias"] = il.bias.astype(np.float32)
        self.nodes.append(node)
        return name

    def flatten(self, inp: str) -> str:
        name = self._name()
        self.nodes.append({"name": name, "op": "flatten", "inputs": [inp]})
        self.shapes[name] = (int(np.prod(self.shapes[inp])),)
        return name

    def sequential(self, m: nn.Module, inp: str) -> str:
        """A chain of quant layers, ReLUs (fused into the previous layer), Flatten and Identity."""
        children = list(m.children()) if isinstance(m, nn.Sequential) else [m]
        cur = inp
        for child in children:
            if isinstance(child, QUANT_LAYERS):
                cur = self.layer(child, cur)
            elif isinstance(child, nn.ReLU):
                if not self.nodes or self.nodes[-1]["name"] != cur or self.nodes[-1]["op"] not in ("linear", "conv2d"):
                    raise ExportError("a ReLU that does not follow a linear/conv layer cannot be exported")
                self.nodes[-1]["relu"] = True
            elif isinstance(child, nn.Flatten):
                cur = self.flatten(cur)
            elif isinstance(child, nn.Identity):
                continue
            elif isinstance(child, nn.Sequential):
                cur = self.sequential(child, cur)
            else:
                raise ExportError(f"cannot export module {type(child).__name__} (supported: quantized Linear/Conv2d/"
                                  "NoisyLinear, ReLU, Flatten, Identity)")
        return cur

    def op(self, op: str, inputs: list[str], shape: tuple[int, ...], **fields) -> str:
        name = self._name()
        self.nodes.append({"name": name, "op": op, "inputs": inputs, **fields})
        self.shapes[name] = shape
        return name


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """int8 codes in [-7, 7], shape (out, K) -> uint8 (out, ceil(K/2)): low nibble w[2j]+8, high w[2j+1]+8."""
    out, k = codes.shape
    padded = np.zeros((out, k + (k % 2)), np.int16)
    padded[:, :k] = codes
    u = (padded + 8).astype(np.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def network_graph(net: nn.Module, observation_space, meta: dict[str, Any] | None = None,
                  action_space=None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The FORMAT.md graph and tensors of a quantized policy network (quantization on): the DQN family's
    ``QNetwork``, the discrete SAC actor (argmax of its logits) or the SAC / DSAC Gaussian actor (its
    deterministic action ``tanh(mean)`` scaled to ``action_space``'s bounds)."""
    from rlq.agents.sac import DiscreteNet, GaussianActor
    from rlq.nets.distributional import CategoricalHead
    from rlq.nets.encoders import MLPEncoder, NatureCNN
    from rlq.nets.heads import DuelingHead, QHead, QNetwork

    layers = list(quant_layers(net))
    if not layers or not all(m.quant_enabled for m in layers):
        raise ExportError("the network is not quantized: call quantize_() and enable it (QAT) or calibrate() (PTQ)")
    if not isinstance(net, (QNetwork, DiscreteNet, GaussianActor)):
        raise ExportError(f"cannot export a {type(net).__name__}: supported policies are the DQN family's QNetwork "
                          "and the SAC agents' actors")
    shape = tuple(int(s) for s in observation_space.shape)
    image = np.dtype(observation_space.dtype) == np.uint8
    b = _GraphBuilder(shape)
    graph = {"format": "rlq.policy", "version": 1,
             "observation": {"shape": list(shape), "dtype": "uint8" if image else "float32"},
             "preprocess": {"divide": 255.0 if image else 1.0}, "nodes": b.nodes, "meta": dict(meta or {})}
    if isinstance(net, GaussianActor):
        if action_space is None or len(shape) != 1:
            raise ExportError("a Gaussian actor is exported with its action space (bounds) and 1-d observations")
        a = int(action_space.shape[0])
        children = list(net.net.children())
        h = b.sequential(nn.Sequential(*children[:-1]), "obs")
        mean = b.layer(children[-1], h)  # (mean, raw log-std): keep the mean rows
        for key in ("weight", "out_scale", "bias"):
            b.tensors[f"{mean}.{key}"] = np.ascontiguousarray(b.tensors[f"{mean}.{key}"][:a])
        b.nodes[-1]["out_features"] = a
        b.shapes[mean] = (a,)
        out = b.op("tanh_bound", [mean], (a,))
        b.tensors[f"{out}.low"] = np.asarray(action_space.low, np.float32)
        b.tensors[f"{out}.high"] = np.asarray(action_space.high, np.float32)
        return {**graph, "outputs": {"action_mean": out}, "act": "identity"}, b.tensors
    enc = net.encoder
    if isinstance(enc, NatureCNN):
        h = b.sequential(enc.convs, "obs")
        h = b.sequential(enc.fc, h)
    elif isinstance(enc, MLPEncoder):
        if len(shape) != 1:
            raise ExportError(f"MLP policies on observations of shape {shape} are not exportable (1-d only)")
        h = b.sequential(enc.net, "obs")
    else:
        raise ExportError(f"cannot export encoder {type(enc).__name__}")
    if isinstance(net, DiscreteNet):  # discrete SAC's actor: the action is the argmax of the logits
        out = b.sequential(net.out, h)
        return {**graph, "outputs": {"q_values": out}, "act": "argmax"}, b.tensors
    head = net.head
    if isinstance(head, CategoricalHead):
        a, atoms = head.n_actions, head.atoms
        if head.dueling:
            inputs = [b.sequential(head.value, h), b.sequential(head.advantage, h)]
        else:
            inputs = [b.sequential(head.logits, h)]
        out = b.op("c51", inputs, (a,), actions=a, atoms=atoms, dueling=bool(head.dueling))
        b.tensors[f"{out}.support"] = head.support.detach().cpu().numpy().astype(np.float32)
    elif isinstance(head, DuelingHead):
        v, adv = b.sequential(head.value, h), b.sequential(head.advantage, h)
        out = b.op("dueling", [v, adv], b.shapes[adv])
    elif isinstance(head, QHead):
        out = b.sequential(head.q, h)
    else:
        raise ExportError(f"cannot export head {type(head).__name__}")
    return {**graph, "outputs": {"q_values": out}, "act": "argmax"}, b.tensors


# -- agent -> file ---------------------------------------------------------------------------------------
def fold_ensemble(net: EnsembleQNetwork) -> nn.Module:
    """A Q-ensemble's mean-Q policy as one float ``QNetwork`` (``rlq.nets.ensemble.mean_q_network``), which is
    then post-training quantized like any float network. A QAT-trained ensemble is refused: the average over
    members mixes per-member weight scales, so the trained integer weights have no exact form in the format."""
    if list(quant_layers(net)):
        raise ExportError("a QAT-trained Q-ensemble cannot be exported as trained (the mean over members has no "
                          "exact integer form); export a float run (quant=none): it is folded and quantized (PTQ)")
    try:
        return mean_q_network(net)
    except ValueError as e:
        raise ExportError(str(e)) from None


def calibration_observations(agent, calib: str | None, steps: int, replay: dict | None) -> np.ndarray:
    """Observations for PTQ: from the saved replay, a greedy rollout, or a .npy file."""
    if calib is None:
        calib = "replay" if replay is not None else "rollout"
    if calib == "replay":
        if replay is None:
            raise ExportError("calib=replay: the checkpoint has no replay buffer (train with "
                              "checkpoint.save_replay=true); use calib=rollout or calib=<obs.npy>")
        obs = _replay_observations(replay, steps)
    elif calib == "rollout":
        obs = _rollout(agent, steps)
    else:
        path = Path(calib)
        if path.suffix != ".npy" or not path.is_file():
            raise ExportError(f"calib={calib!r}: use replay, rollout or an existing .npy file of observations")
        obs = np.load(path, allow_pickle=False)
    want = tuple(agent.observation_space.shape)
    if obs.ndim != len(want) + 1 or tuple(obs.shape[1:]) != want or len(obs) == 0:
        raise ExportError(f"calibration observations have shape {obs.shape}, expected (N, {', '.join(map(str, want))})")
    return obs


def _replay_observations(replay: dict, n: int) -> np.ndarray:
    """Up to ``n`` stored observations, sampled without replacement, from a saved replay state."""
    storage = replay["storage"]
    if "data" not in storage:
        raise ExportError("calib=replay is not supported for frame-stacked (Atari) replay; use calib=rollout")
    data = np.asarray(storage["data"])  # (rows, num_envs, *obs_shape)
    flat = data.reshape(-1, *data.shape[2:])
    if len(flat) == 0:
        raise ExportError("calib=replay: the saved replay buffer is empty; use calib=rollout")
    rng = np.random.default_rng(0)
    return flat[rng.choice(len(flat), size=min(n, len(flat)), replace=False)]


def _rollout(agent, steps: int) -> np.ndarray:
    from rlq.trainer import make_env_from_cfg

    env_cfg = agent.config.env
    env = make_env_from_cfg(env_cfg, 4, 12_345)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=12_345)
    out: list[np.ndarray] = []
    try:
        while sum(len(o) for o in out) < steps:
            out.append(np.array(obs))
            act = agent.act(obs, explore=False)
            if hasattr(env.single_action_space, "n"):
                rand = rng.random(len(act)) < 0.1
                act[rand] = rng.integers(env.single_action_space.n, size=int(rand.sum()))
            obs, *_ = env.step(act)
    finally:
        env.close()
    return np.concatenate(out)[:steps]


def export_agent(agent, out: str | Path, bits: int | None = None, calib: str | None = None,
                 calib_method: str = "minmax", calib_steps: int = 5000, replay: dict | None = None,
                 meta: dict[str, Any] | None = None, equalize: bool = False,
                 bias_correction: bool = False) -> dict[str, Any]:
    """Export ``agent.policy_net()`` (QAT as trained, or PTQ to ``bits``) to ``out``; returns a summary
    with the agreement of the file's greedy actions (reference backend) with the torch model's."""
    from rlq.deploy import load_policy, save_policy

    net = agent.policy_net()
    if isinstance(net, EnsembleQNetwork):  # agent=qensemble: its greedy policy, folded into one network
        net = fold_ensemble(net)
    obs = calibration_observations(agent, calib, calib_steps, replay)
    example = torch.as_tensor(obs[:2], device=agent.device)
    forward = lambda x: net(torch.as_tensor(x, device=agent.device))  # noqa: E731
    if is_quantized(net):
        if equalize or bias_correction:
            raise ExportError("equalize / bias_correction are post-training corrections: this QAT network is "
                              "exported as trained (omit them)")
        if bits is not None and any(m.wq.bits not in (bits, 8) for m in quant_layers(net)):
            raise ExportError(f"bits={bits} does not match the QAT network's weight bits "
                              f"{sorted({m.wq.bits for m in quant_layers(net)})}; omit bits to export it as trained")
        mode = "qat"
    else:
        bits = 8 if bits is None else bits  # a float network: post-training int8 unless bits=4 is asked for
        if bits not in (8, 4):
            raise ExportError(f"bits={bits}: a float network is post-training quantized to bits=8 or bits=4")
        if list(quant_layers(net)):  # a QAT run exported before its quant.start_step: reuse its layers
            if equalize:
                raise ExportError("equalize=true rescales a float network; this run's network already has quant "
                                  "layers (a QAT run before quant.start_step): omit equalize")
            for m in quant_layers(net):
                if m.wq.bits not in (bits, 8):
                    raise ExportError(f"bits={bits} differs from the run's quant config; export after QAT started")
        else:
            if equalize:
                equalize_(net, obs, forward=forward)
            quantize_(net, QuantConfig(name=f"w{bits}a8", weight_bits=bits), example)
        calibrate(net, obs, method=calib_method, forward=forward)
        if bias_correction:
            bias_correct(net, obs, forward=forward)
        mode = "ptq"
    net.eval()
    graph, tensors = network_graph(net, agent.observation_space, {**(meta or {}), "mode": mode},
                                   action_space=agent.action_space)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_policy(out, graph, tensors)
    policy = load_policy(out, backend="reference")
    with torch.no_grad():
        torch_actions = agent.act(obs, explore=False)
    if policy.discrete:
        agreement = float((policy.act(obs) == torch_actions).mean())
        extra: dict[str, Any] = {}
    else:  # continuous: the share of actions within 1% of the action range of the torch model's
        span = np.asarray(agent.action_space.high - agent.action_space.low, np.float32)
        err = np.abs(policy.act(obs) - torch_actions) / span
        agreement = float((err.max(axis=1) <= 0.01).mean())
        extra = {"action_max_abs_error": float(err.max())}
    return {"out": str(out), "mode": mode, "bytes": out.stat().st_size, "agreement": agreement, **extra,
            "observations": int(len(obs)),
            "weight_bits": sorted({int(n["weight_bits"]) for n in graph["nodes"] if "weight_bits" in n})}


def parse_args(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"bits": None, "calib": None, "calib_method": "minmax", "calib_steps": 5000,
                            "equalize": False, "bias_correction": False}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ExportError(f"argument {arg!r} is not key=value; {USAGE}")
        if key not in KEYS:
            raise ExportError(f"unknown argument {key!r}: choose from {', '.join(KEYS)}")
        if KEYS[key] is bool:
            if value.lower() not in ("true", "false"):
                raise ExportError(f"{key}={value!r} is not a boolean: choose true or false")
            opts[key] = value.lower() == "true"
            continue
        try:
            opts[key] = int(value) if KEYS[key] is int else value
        except ValueError:
            raise ExportError(f"{key}={value!r} is not an integer") from None
    for req in ("checkpoint", "out"):
        if req not in opts:
            raise ExportError(f"{req}= is required; {USAGE}")
    if opts["bits"] is not None and opts["bits"] not in (8, 4):
        raise ExportError(f"bits={opts['bits']}: choose 8 or 4")
    if opts["calib_method"] not in ("minmax", "percentile", "mse"):
        raise ExportError(f"calib_method={opts['calib_method']!r}: choose one of minmax, percentile, mse")
    if opts["calib_steps"] < 1:
        raise ExportError(f"calib_steps={opts['calib_steps']} must be >= 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    from rlq.checkpoint import CheckpointError, load_agent, load_checkpoint, resolve_checkpoint

    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        path = resolve_checkpoint(opts["checkpoint"])
        ckpt = load_checkpoint(path)
        agent = load_agent(path)
        meta = {"agent": str(agent.config.agent.name), "env": str(agent.config.env.name),
                "source": str(path), "quant": str(agent.config.quant.name)}
        summary = export_agent(agent, opts["out"], opts["bits"], opts["calib"], opts["calib_method"],
                               opts["calib_steps"], replay=ckpt.get("replay"), meta=meta,
                               equalize=opts["equalize"], bias_correction=opts["bias_correction"])
    except (ExportError, CheckpointError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
