"""Update time of a Q-ensemble of N = 10 against one network of the same size (issue 7's bar: N = 10 <= 3x N = 1).

Settings, each one full agent update on a fixed batch (forward, target, loss, backward, clipping, fused Adam):

- discrete: CartPole MLP 256x256, batch 64: ``agent=dqn`` (one plain network), ``agent=qensemble`` with N = 1,
  N = 10 (``min`` target: all 10 target members evaluated) and N = 10 REDQ (M = 2 target members);
- continuous: SAC critic update, 256x256 critics, batch 256 (``policy_delay`` large, so the actor is not
  updated): ``n_critics`` = 1, 2 (SAC) and 10 (SAC-N, vectorized), and 10 critics as a Python loop over ten
  ``Critic`` modules (what a non-vectorized ensemble costs).

The settings alternate inside every round (``--rounds`` rounds of ``--updates`` updates each); the table reports
the median per-update time over rounds and the ratio to the N = 1 network. Times are the thread's CPU time (one
torch thread, so every op runs on the timed thread): the machine is shared, and wall times under contention
measure the other jobs (they are reported beside it). The arithmetic is printed too: the
multiply-adds of one update (forward + target forward + backward ~ 4x the forward for the hidden layers), the
achieved GFLOP/s, and the machine's single-core matmul peak measured in the same run, which together give the
lowest ratio that fp32 arithmetic on one core allows. ``--layouts`` adds a micro-benchmark of the batched
layouts of one 10-member 256x256 layer (forward + backward, gradients set to None before each, as in training):
baddbmm on (n, out, in), bmm on (n, in, out), einsum, a Python loop of mm, and ``EnsembleLinear`` (its own
backward), and of the shared-input first layer (4 inputs) composed and as ``EnsembleLinear``.

``agent.amp=bf16`` rows run the ensemble's products in bf16 through torch ops (``agent.native_step=false``:
``EnsembleLinear``'s own backward in bf16, the target network's bf16 weights cast once per target update);
``bf16, native step`` rows run the same products in the fused native step (``agent.native_step=true``,
``rlq/nets/native_ensemble.py``: forwards, loss, backward and per-member clip in one call, then torch's fused
Adam), listed where the CPU has AVX512-BF16. ``--widths`` repeats the discrete comparison at other hidden
widths.

``--profile`` breaks one update down by op group (``torch.profiler`` self CPU time: matmuls, dtype casts, Adam,
the rest) for one plain DQN network and the best N = 10 setting (REDQ, bf16).

``--stages`` times the stages of the discrete update (forward, target, loss, backward, clipping, Adam) for N = 1
and N = 10, to show which part grows with N.

    python experiments/bench_ensemble.py [--rounds 7] [--updates 30] [--threads 1] [--layouts] [--stages]
                                         [--widths 64 128 256] [--profile]

Writes experiments/results/bench_ensemble.md (machine, versions, command).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlq.agents import make_agent
from rlq.replay.base import Batch
from rlq.train import _compose, build_config

from _tables import stages_table  # (experiments/ is on sys.path when a script runs)

RESULTS = Path(__file__).resolve().parent / "results"
CART_OBS, CART_ACT = gym.spaces.Box(-1, 1, (4,), np.float32), gym.spaces.Discrete(2)  # CartPole's spaces
TORCH_BF16 = ("agent.amp=bf16", "agent.native_step=false")  # bf16 products through torch ops
NATIVE_BF16 = ("agent.amp=bf16", "agent.native_step=true")  # the same products in the fused native step


def native_available() -> bool:
    """The native step's rows need its AVX512-BF16 path (its portable C path is for tests, not speed)."""
    from rlq.nets.native_ensemble import available_isas
    return "avx512bf16" in available_isas()


def _agent(obs_space, act_space, *ov):
    ov = list(ov)
    cfg = build_config(_compose(ov), ov)
    return make_agent(cfg.agent, obs_space, act_space, seed=0)


def _batch(b, obs_dim, act_space, seed=0):
    g = torch.Generator().manual_seed(seed)
    if isinstance(act_space, gym.spaces.Discrete):
        act = torch.randint(0, act_space.n, (b,), generator=g)
    else:
        act = torch.rand(b, act_space.shape[0], generator=g) * 4 - 2
    return Batch(obs=torch.randn(b, obs_dim, generator=g), action=act, reward=torch.randn(b, generator=g),
                 discount=torch.full((b,), 0.99), next_obs=torch.randn(b, obs_dim, generator=g), idx=torch.arange(b),
                 weights=torch.ones(b))


class LoopCritics:
    """Separate Critic modules updated in a Python loop (the non-vectorized ensemble), SAC's critic step."""

    def __init__(self, n: int, obs_dim: int, act_dim: int):
        from rlq.agents.sac import Critic, GaussianActor
        self.actor = GaussianActor(obs_dim, act_dim, [256, 256], -5.0, 2.0)
        self.critics = nn.ModuleList(Critic(obs_dim, act_dim, [256, 256]) for _ in range(n))
        self.targets = nn.ModuleList(Critic(obs_dim, act_dim, [256, 256]) for _ in range(n))
        self.targets.requires_grad_(False)
        self.opt = torch.optim.Adam(self.critics.parameters(), lr=1e-3, fused=True)

    def update(self, b: Batch) -> None:
        a = b.action / 2
        with torch.no_grad():  # as SAC's critic step: next action from the actor, min over the target critics
            a2, logp2 = self.actor.sample(b.next_obs)
            q_next = torch.stack([t(b.next_obs, a2).squeeze(-1) for t in self.targets]).min(0).values
            y = b.reward + b.discount * (q_next - 0.2 * logp2)
        loss = sum(F.mse_loss(c(b.obs, a).squeeze(-1), y) for c in self.critics)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.targets.parameters()), list(self.critics.parameters()), 0.005)


def settings():
    pend_obs, pend_act = gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Box(-2, 2, (1,), np.float32)
    db, cb = _batch(64, 4, CART_ACT), _batch(256, 3, pend_act)
    q = ("agent=qensemble", "agent.hidden=[256,256]", "agent.batch_size=64")
    sac = ("agent=sac", "env=Pendulum", "agent.learning_starts=0", "agent.policy_delay=1000000000")
    out = {
        "discrete: dqn (one plain network)": (_agent(CART_OBS, CART_ACT, "agent=dqn"), db),
        "discrete: qensemble N=1": (_agent(CART_OBS, CART_ACT, *q, "agent.n_members=1", "agent.target_reduction=min"), db),
        "discrete: qensemble N=10, min": (_agent(CART_OBS, CART_ACT, *q, "agent.n_members=10", "agent.target_reduction=min"), db),
        "discrete: qensemble N=10, REDQ M=2": (_agent(CART_OBS, CART_ACT, *q, "agent.n_members=10", "agent.target_reduction=redq",
                                                      "agent.redq_m=2"), db),
        "discrete: qensemble N=10, min, bf16": (_agent(CART_OBS, CART_ACT, *q, "agent.n_members=10",
                                                       "agent.target_reduction=min", *TORCH_BF16), db),
        "discrete: qensemble N=10, REDQ M=2, bf16": (_agent(CART_OBS, CART_ACT, *q, "agent.n_members=10",
                                                            "agent.target_reduction=redq", "agent.redq_m=2",
                                                            *TORCH_BF16), db),
        **({"discrete: qensemble N=1, bf16, native step": (_agent(CART_OBS, CART_ACT, *q, "agent.n_members=1",
                                                                   "agent.target_reduction=min", *NATIVE_BF16), db),
            "discrete: qensemble N=10, min, bf16, native step": (_agent(CART_OBS, CART_ACT, *q, "agent.n_members=10",
                                                                         "agent.target_reduction=min", *NATIVE_BF16), db),
            "discrete: qensemble N=10, REDQ M=2, bf16, native step": (
                _agent(CART_OBS, CART_ACT, *q, "agent.n_members=10", "agent.target_reduction=redq", "agent.redq_m=2",
                       *NATIVE_BF16), db)} if native_available() else {}),
        "SAC critic: n_critics=1": (_agent(pend_obs, pend_act, *sac, "agent.n_critics=1"), cb),
        "SAC critic: n_critics=2 (SAC)": (_agent(pend_obs, pend_act, *sac, "agent.n_critics=2"), cb),
        "SAC critic: n_critics=10 (SAC-N)": (_agent(pend_obs, pend_act, *sac, "agent.n_critics=10"), cb),
        "SAC critic: n_critics=10 (SAC-N), bf16": (_agent(pend_obs, pend_act, *sac, "agent.n_critics=10",
                                                          "agent.amp=bf16"), cb),
        "SAC critic: 10 critics, Python loop": (LoopCritics(10, 3, 1), cb),
    }
    return out


def macs(name: str) -> float:
    """Multiply-adds of one update: online forward + target forward + backward (~2x forward) of the layers."""
    import re
    found = re.search(r"(?:N=|n_critics=)(\d+)|(\d+) critics", name)
    n = int(next(g for g in found.groups() if g)) if found else 1
    if name.startswith("discrete"):
        per = 4 * 256 + 256 * 256 + 256 * 2
        targets = 2 if "REDQ" in name else n
        return 64 * per * (3 * n + targets)  # forward + backward (2x) for n members, target forward
    per = 4 * 256 + 256 * 256 + 256
    return 256 * per * 4 * n


def CLOCK() -> float:
    """This thread's CPU time: with one torch thread every op runs on it, so the figure is the compute an update
    takes, whatever else runs on the machine (wall times are reported beside it)."""
    return time.thread_time()


def peak_gflops(dtype: torch.dtype = torch.float32) -> float:
    a, w = torch.randn(640, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
    ts = []
    for _ in range(200):
        t = CLOCK()
        a @ w
        ts.append(CLOCK() - t)
    return 2 * 640 * 256 * 256 / statistics.median(ts) / 1e9


def layouts(rounds: int) -> list[tuple[str, float]]:
    n, b, d = 10, 64, 256
    x = torch.randn(n, b, d)
    w_oi = torch.randn(n, d, d, requires_grad=True)
    w_io = torch.randn(n, d, d, requires_grad=True)
    bias = torch.zeros(n, d, requires_grad=True)
    fns = {
        "baddbmm, weight (n, out, in)": lambda: torch.baddbmm(bias.unsqueeze(1), x, w_oi.transpose(1, 2)),
        "baddbmm, weight (n, in, out)": lambda: torch.baddbmm(bias.unsqueeze(1), x, w_io),
        "einsum nbi,noi->nbo": lambda: torch.einsum("nbi,noi->nbo", x, w_oi) + bias.unsqueeze(1),
        "Python loop of addmm": lambda: torch.stack([torch.addmm(bias[i], x[i], w_oi[i].t()) for i in range(n)]),
        "EnsembleLinear (own backward), weight (n, out, in)": lambda: ens(x),
        "first layer 4 -> 10 x 256, composed addmm": lambda: torch.addmm(
            bias.reshape(-1), obs, w_first.reshape(n * d, 4).t()),
        "first layer 4 -> 10 x 256, EnsembleLinear (own backward)": lambda: first(obs),
    }
    from rlq.nets.ensemble import EnsembleLinear
    ens, first = EnsembleLinear(n, d, d), EnsembleLinear(n, 4, d)
    obs, w_first = torch.randn(b, 4), torch.randn(n, d, 4, requires_grad=True)
    leaves = [w_oi, w_io, bias, w_first, *ens.parameters(), *first.parameters()]
    res = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = CLOCK()
            for _ in range(20):
                for p in leaves:  # as zero_grad(set_to_none=True) before every update
                    p.grad = None
                f().sum().backward()
            res[k].append((CLOCK() - t) / 20)
    return [(k, statistics.median(v) * 1e6) for k, v in res.items()]


def stages(rounds: int, updates: int) -> list[tuple[str, dict[str, float]]]:
    """Where a discrete update's CPU time goes: the stages of ``QEnsembleAgent.update`` timed one by one (online
    forward, target, loss, backward, per-member clipping, fused Adam) for N = 1 and N = 10 (``min`` target)."""
    from rlq.nets.ensemble import per_member_clip_grad_norm_
    b = _batch(64, 4, CART_ACT)
    q = ("agent=qensemble", "agent.hidden=[256,256]", "agent.batch_size=64", "agent.target_reduction=min")
    agents = {n: _agent(CART_OBS, CART_ACT, *q, f"agent.n_members={n}") for n in (1, 10)}
    names = ("online forward", "target", "loss", "backward", "clip", "Adam")
    res = {n: {k: [] for k in names} for n in agents}
    action = b.action.long()
    for _ in range(rounds):
        for n, ag in agents.items():
            acc = dict.fromkeys(names, 0.0)
            for _ in range(updates):
                t0 = CLOCK()
                q_all = ag.online(b.obs)
                t1 = CLOCK()
                target = ag.td_target(b)
                t2 = CLOCK()
                k, bs = q_all.shape[:2]
                qa = q_all.gather(2, action.view(1, bs, 1).expand(k, bs, 1)).squeeze(2)
                loss = (b.weights * F.smooth_l1_loss(qa, target.expand(k, bs), reduction="none")).mean(1).sum()
                ag.optimizer.zero_grad(set_to_none=True)
                loss.item()
                t3 = CLOCK()
                loss.backward()
                t4 = CLOCK()
                per_member_clip_grad_norm_(ag._params, n, 10.0)
                t5 = CLOCK()
                ag.optimizer.step()
                t6 = CLOCK()
                for key, (a, z) in zip(names, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6))):
                    acc[key] += (z - a) / updates
            for key in names:
                res[n][key].append(acc[key])
    return [(f"qensemble N={n}", {k: statistics.median(v) * 1e3 for k, v in r.items()}) for n, r in res.items()]


def widths(sizes: list[int], rounds: int, updates: int) -> list[tuple[int, dict[str, float]]]:
    """The discrete update at other hidden widths (two layers of ``w`` units, batch 64): one plain DQN network
    against N = 10 (``min`` and REDQ M = 2 targets, fp32 and bf16). The ratio depends on how much of the single
    network's update is arithmetic (which N multiplies) and how much is per-op overhead (which it shares)."""
    b = _batch(64, 4, CART_ACT)
    kinds = {"dqn": ("agent=dqn",), "N=10 min": ("agent=qensemble", "agent.target_reduction=min"),
             "N=10 REDQ": ("agent=qensemble", "agent.target_reduction=redq", "agent.redq_m=2"),
             "N=10 min bf16": ("agent=qensemble", "agent.target_reduction=min", *TORCH_BF16),
             "N=10 REDQ bf16": ("agent=qensemble", "agent.target_reduction=redq", "agent.redq_m=2", *TORCH_BF16)}
    if native_available():
        kinds |= {"N=10 min native": ("agent=qensemble", "agent.target_reduction=min", *NATIVE_BF16),
                  "N=10 REDQ native": ("agent=qensemble", "agent.target_reduction=redq", "agent.redq_m=2",
                                       *NATIVE_BF16)}
    out = []
    for w in sizes:
        ags = {k: _agent(CART_OBS, CART_ACT, *ov, f"agent.hidden=[{w},{w}]", "agent.batch_size=64",
                         *(("agent.n_members=10",) if k != "dqn" else ())) for k, ov in kinds.items()}
        for ag in ags.values():
            for _ in range(5):
                ag.update(b)
        res = {k: [] for k in ags}
        for _ in range(rounds):
            for k, ag in ags.items():
                t = CLOCK()
                for _ in range(updates):
                    ag.update(b)
                res[k].append((CLOCK() - t) / updates)
        out.append((w, {k: statistics.median(v) * 1e3 for k, v in res.items()}))
    return out


PROFILE_GROUPS = {  # torch.profiler op names -> the groups of the --profile table
    "matmuls (bmm, baddbmm, addmm, mm)": ("aten::bmm", "aten::baddbmm", "aten::addmm", "aten::mm"),
    "dtype casts and copies (copy_, _to_copy)": ("aten::copy_", "aten::_to_copy"),
    "Adam (fused kernel, step and zero_grad overhead)": ("aten::_fused_adam_", "Optimizer.step#Adam.step",
                                                         "Optimizer.zero_grad#Adam.zero_grad"),
}


def profile_ops(updates: int) -> list[tuple[str, dict[str, float]]]:
    """Self CPU time per update by op group (``torch.profiler``; it adds a few us per op, so the small ops'
    share is overstated) for one plain DQN network and N = 10 REDQ M = 2 in bf16, the best N = 10 setting:
    which part of the ensemble's update is arithmetic, which is memory-bound, and which is per-op work."""
    from torch.profiler import ProfilerActivity, profile
    b = _batch(64, 4, CART_ACT)
    q = ("agent=qensemble", "agent.hidden=[256,256]", "agent.batch_size=64", "agent.n_members=10",
         "agent.target_reduction=redq", "agent.redq_m=2", *TORCH_BF16)
    agents = {"dqn (one plain network)": _agent(CART_OBS, CART_ACT, "agent=dqn"),
              "qensemble N=10, REDQ M=2, bf16": _agent(CART_OBS, CART_ACT, *q)}
    out = []
    for name, ag in agents.items():
        for _ in range(10):
            ag.update(b)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(updates):
                ag.update(b)
        self_us = {e.key: e.self_cpu_time_total / updates for e in prof.key_averages()}
        groups = {g: sum(self_us.get(op, 0.0) for op in ops) for g, ops in PROFILE_GROUPS.items()}
        total = sum(self_us.values())
        out.append((name, {**groups, "everything else": total - sum(groups.values()), "total": total}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--updates", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layouts", action="store_true")
    ap.add_argument("--stages", action="store_true", help="also time the stages of a discrete update (N=1, N=10)")
    ap.add_argument("--widths", type=int, nargs="*", default=[],
                    help="also time the discrete update at these hidden widths (e.g. 64 128 256)")
    ap.add_argument("--profile", action="store_true",
                    help="also break one update down by op group (torch.profiler): dqn against N=10 REDQ bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = settings()
    for agent, batch in cases.values():  # warm-up
        for _ in range(5):
            agent.update(batch)
    times: dict[str, list[float]] = {k: [] for k in cases}
    walls: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for k, (agent, batch) in cases.items():
            t, w = CLOCK(), time.perf_counter()
            for _ in range(args.updates):
                agent.update(batch)
            times[k].append((CLOCK() - t) / args.updates)
            walls[k].append((time.perf_counter() - w) / args.updates)
    peak, peak_bf16 = peak_gflops(), peak_gflops(torch.bfloat16)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med_wall = {k: statistics.median(v) * 1e3 for k, v in walls.items()}
    base = {"discrete": med["discrete: dqn (one plain network)"], "SAC": med["SAC critic: n_critics=1"]}
    lines = [
        "# Q-ensemble update time: N = 10 against one network of the same size",
        "",
        f"Command: `python experiments/bench_ensemble.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} torch thread(s) (2 cores shared with "
        f"other jobs; the settings alternate inside each round); python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}; {args.rounds} rounds x {args.updates} updates per setting, medians "
        f"over rounds. Single-core matmul peak measured in this run (640x256 @ 256x256): {peak:.0f} GFLOP/s fp32, "
        f"{peak_bf16:.0f} GFLOP/s bf16 (the floor column uses the row's precision).",
        "",
        "| setting | CPU ms / update | ratio to N=1 | wall ms / update | MMACs / update | achieved GFLOP/s | "
        "matmul floor at peak (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, ms in med.items():
        ref = base["discrete" if k.startswith("discrete") else "SAC"]
        m = macs(k) / 1e6
        lines.append(f"| {k} | {ms:.3f} | {ms / ref:.2f}x | {med_wall[k]:.3f} | {m:.1f} | {2 * m / ms:.0f} | "
                     f"{2 * m / (peak_bf16 if 'bf16' in k else peak):.2f} |")
    if args.layouts:
        lines += ["", "One 10-member layer, batch 64, forward + backward (CPU time, median of rounds):", "",
                  "| layout | us |", "|---|---|"]
        lines += [f"| {k} | {us:.0f} |" for k, us in layouts(args.rounds)]
    if args.stages:
        lines += stages_table("Stages of one discrete update (CPU ms, median of rounds; `min` target, batch 64):",
                              stages(args.rounds, args.updates))
    if args.widths:
        rows = widths(args.widths, args.rounds, args.updates)
        keys = list(rows[0][1])
        lines += ["", "Discrete update at other widths (two hidden layers of w units, batch 64; CPU ms, and the ratio "
                  "to one plain DQN network of that width):", "",
                  "| w | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {w} | " + " | ".join(f"{v[k]:.3f}" + ("" if k == "dqn" else f" ({v[k] / v['dqn']:.2f}x)")
                                          for k in keys) + " |" for w, v in rows]
    if args.profile:
        rows = profile_ops(args.rounds * args.updates)
        keys = list(rows[0][1])
        lines += ["", "One discrete update by op group (self CPU us per update under torch.profiler, which adds a few us "
                  "per op):", "", "| op group | " + " | ".join(n for n, _ in rows) + " |", "|---|" + "---|" * len(rows)]
        lines += [f"| {k} | " + " | ".join(f"{v[k]:.0f}" for _, v in rows) + " |" for k in keys]
    RESULTS.mkdir(exist_ok=True)
    text = "\n".join(lines) + "\n"
    path = RESULTS / "bench_ensemble.md"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    notes = old[old.index("## Notes"):] if "## Notes" in old else ""
    path.write_text(text + ("\n" + notes if notes else ""), encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
