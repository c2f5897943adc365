"""QAT overhead: time of one DQN-family training update (sample excluded) with fake quantization on,
relative to fp32, for the CartPole MLP and the Nature CNN (Pong shapes). Settings alternate inside each
round so that machine noise hits them alike; medians over rounds.

    python experiments/bench_qat.py [--rounds 7] [--iters 60] [--threads 1] [--clock process|wall] [--stages]

Each round times ``--iters`` updates per setting (after a warm-up; the order of the settings rotates from
round to round): fp32, w8a8 (max-based weight scales,
EMA activation ranges), w4a8 (LSQ weights), w2a8 (LSQ weights), w4a8 with LSQ activations, w8a8 with
QuEST weights. Then the whole training loop's env steps per second (fp32, w8a8, w4a8) on CartPole and Pong.
``--clock process`` (default) times with this process's CPU time (``time.process_time``): on a machine
shared with other jobs, wall time also counts the time the process waits for a core; ``wall`` for a quiet
machine. Writes experiments/results/bench_qat.md with the machine, versions, the fake-quant implementation
(``rlq.quant.native.status()``) and the command. ``--stages`` adds where the MLP update's time goes (online
forward, target, loss, backward, clipping, Adam, the rest), fp32 against w8a8 and w4a8; ``--layers`` one w8a8
layer's training forward against its pieces (what is left is Python and autograd). A ``## Notes`` section
written by hand below the tables is kept when the file is rewritten.
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

from rlq.agents import make_agent
from rlq.replay.base import Batch
from rlq.train import _compose, build_config

from _tables import stages_table  # (experiments/ is on sys.path when a script runs)

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {
    "fp32": ["quant=none"],
    "w8a8": ["quant=w8a8"],
    "w4a8": ["quant=w4a8"],
    "w2a8": ["quant=w2a8"],
    "w4a8 lsq-act": ["quant=w4a8", "quant.act_mode=lsq"],
    "w8a8 quest": ["quant=w8a8", "quant.weight_mode=quest"],
}
NETS = {  # name: (overrides, observation space, actions)
    "MLP 256-256 (CartPole, batch 64)": (["agent=dqn", "env=CartPole"], gym.spaces.Box(-5, 5, (4,), np.float32), 2),
    "Nature CNN (Pong, batch 32)": (["agent=dqn", "env=Pong"], gym.spaces.Box(0, 255, (4, 84, 84), np.uint8), 6),
}


def make(overrides: list[str], obs_space, n_actions: int):
    cfg = build_config(_compose(overrides), overrides)
    agent = make_agent(cfg.agent, obs_space, gym.spaces.Discrete(n_actions), seed=0, quant=cfg.quant)
    agent.start_quantization()
    b = int(cfg.agent.batch_size)
    g = torch.Generator().manual_seed(0)

    def obs():
        if obs_space.dtype == np.uint8:
            return torch.randint(0, 256, (b, *obs_space.shape), dtype=torch.uint8, generator=g)
        return torch.randn(b, *obs_space.shape, generator=g)
    batch = Batch(obs=obs(), action=torch.randint(0, n_actions, (b,), generator=g), reward=torch.randn(b, generator=g),
                  discount=torch.full((b,), 0.99), next_obs=obs(), idx=torch.arange(b), weights=torch.ones(b))
    return agent, batch


CLOCK = {"process": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def time_updates(agent, batch, iters: int) -> float:
    t0 = clock()
    for _ in range(iters):
        agent.update(batch)
    return (clock() - t0) / iters * 1e3


def loop_sps(net_ov: list[str], quant_ov: list[str], steps: int, learning_starts: int) -> float:
    """Env steps per second of the whole training loop (act, env step, replay add, updates), warm-up
    (``learning_starts`` random steps) included, with quantization on from the first update."""
    import tempfile

    from rlq.trainer import Trainer

    ov = [*net_ov, *quant_ov, f"total_steps={learning_starts + steps}", f"agent.learning_starts={learning_starts}",
          "eval.every=0", "eval.final=false", "checkpoint.every=0", "log.progress=false", "log.tensorboard=false",
          f"log.every={steps // 4}", "threads=1", "env.num_envs=1"]
    cfg = build_config(_compose(ov), ov)
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, d)
        try:
            t0 = clock()
            tr.train()
            dt = clock() - t0
        finally:
            tr.close()
    return (learning_starts + steps) / dt


def stages(rounds: int, iters: int) -> list[tuple[str, dict[str, float]]]:
    """The stages of ``DQNAgent.update`` timed one by one on the CartPole MLP (ms, median over rounds)."""
    import torch.nn.functional as F
    net_ov, space, n_act = NETS["MLP 256-256 (CartPole, batch 64)"]
    agents = {k: make(net_ov + SETTINGS[k], space, n_act) for k in ("fp32", "w8a8", "w4a8")}
    for agent, batch in agents.values():  # warm-up
        time_updates(agent, batch, 10)
    names = ("online forward", "target", "loss", "backward", "clip", "Adam", "rest")
    res = {k: {n: [] for n in names} for k in agents}
    for _ in range(rounds):
        for k, (a, b) in agents.items():
            acc = dict.fromkeys(names, 0.0)
            action = b.action.long().unsqueeze(1)
            for _ in range(iters):
                t0 = clock()
                q = a._forward(a.online, b.obs).gather(1, action).squeeze(1)
                t1 = clock()
                target = a.td_target(b)
                t2 = clock()
                loss = (b.weights * F.smooth_l1_loss(q, target, reduction="none")).mean()
                a.optimizer.zero_grad(set_to_none=True)
                loss.item()
                t3 = clock()
                loss.backward()
                t4 = clock()
                torch.nn.utils.clip_grad_norm_(a._params, a.max_grad_norm or float("inf"), foreach=True)
                t5 = clock()
                a.optimizer.step()
                t6 = clock()
                a.updates += 1
                a._update_target()
                (target - q).detach().abs().cpu().numpy()
                t7 = clock()
                for n, (x, y) in zip(names, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6), (t6, t7))):
                    acc[n] += (y - x) / iters
            for n in names:
                res[k][n].append(acc[n] * 1e3)
    return [(k, {n: statistics.median(v) for n, v in r.items()}) for k, r in res.items()]


def layers(iters: int) -> list[tuple[str, dict[str, float]]]:
    """One w8a8 MLP layer's training forward called on its own (x without gradient; the path of a layer
    outside a Linear/ReLU chain, one autograd node per layer: inside the Q-network the chain of all three is
    one node, ``rlq.quant.functions.QuantMLPFn``) against its pieces: the observer update, the input and weight
    fake-quant, the matmul on quantized operands, and the fp32 layer (us per call, thread time). Their
    difference is the Python and autograd overhead of the layer's own autograd node."""
    import torch.nn.functional as F
    net_ov, space, n_act = NETS["MLP 256-256 (CartPole, batch 64)"]
    agent, batch = make(net_ov + SETTINGS["w8a8"], space, n_act)
    time_updates(agent, batch, 20)

    def us(f) -> float:
        for _ in range(100):
            f()
        t = time.thread_time()
        for _ in range(iters):
            f()
        return (time.thread_time() - t) / iters * 1e6

    out = []
    for m in (agent.online.encoder.net[0], agent.online.encoder.net[2], agent.online.head.q):
        x = torch.randn(64, m.in_features).relu()
        act, wq = m._q
        info = act.train_info(x)
        xq, _ = act.train_fwd(x, act.train_param(), info, True)
        w_hat, _ = wq.train_fwd(m.weight, wq.train_param(m.weight), True)
        row = {"QAT layer forward": us(lambda: m(x)), "observer": us(lambda: act.train_info(x)),
               "input fake-quant": us(lambda: act.train_fwd(x, act.train_param(), info, True)),
               "weight fake-quant": us(lambda: wq.train_fwd(m.weight, wq.train_param(m.weight), True)),
               "matmul (quantized operands)": us(lambda: F.linear(xq, w_hat, m.bias)),
               "fp32 layer forward": us(lambda: F.linear(x, m.weight, m.bias))}
        pieces = sum(row[k] for k in ("observer", "input fake-quant", "weight fake-quant", "matmul (quantized operands)"))
        row["rest (Python, autograd node)"] = row["QAT layer forward"] - pieces
        out.append((f"{m.in_features} -> {m.out_features}", row))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=60, help="updates per setting per round (CNN: a quarter)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--loop-rounds", type=int, default=3, help="rounds of the whole-loop measurement (0: skip)")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="process")
    ap.add_argument("--stages", action="store_true", help="also time the stages of the MLP update")
    ap.add_argument("--layers", action="store_true", help="also time one w8a8 MLP layer's forward and its pieces")
    args = ap.parse_args()
    global clock
    clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    from rlq.quant import native
    command = "python " + " ".join(["experiments/bench_qat.py", *sys.argv[1:]])
    rows = []
    for net_name, (net_ov, space, n_act) in NETS.items():
        iters = args.iters if space.dtype != np.uint8 else max(5, args.iters // 4)
        agents = {k: make(net_ov + ov, space, n_act) for k, ov in SETTINGS.items()}
        for agent, batch in agents.values():  # warm-up
            time_updates(agent, batch, 5)
        times: dict[str, list[float]] = {k: [] for k in SETTINGS}
        names = list(agents)
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:  # a rotating order: no setting always first
                agent, batch = agents[k]
                times[k].append(time_updates(agent, batch, iters))
            print(f"{net_name} round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in times.items()),
                  flush=True)
        base = statistics.median(times["fp32"])
        for k, v in times.items():
            med = statistics.median(v)
            ratios = [t / f for t, f in zip(v, times["fp32"])]  # per-round ratio: same noise for both
            rows.append((net_name, k, med, statistics.median(ratios), base))
    loop_rows = []
    if args.loop_rounds:
        loops = {"MLP 256-256 (CartPole, batch 64)": (["agent=dqn", "env=CartPole"], 4000, 1000),
                 "Nature CNN (Pong, batch 32)": (["agent=dqn", "env=Pong"], 1200, 400)}
        for net_name, (net_ov, steps, ls) in loops.items():
            sps: dict[str, list[float]] = {"fp32": [], "w8a8": [], "w4a8": []}
            for r in range(args.loop_rounds):
                for k in sps:
                    sps[k].append(loop_sps(net_ov, SETTINGS[k], steps, ls))
                print(f"{net_name} loop round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} sps" for k, v in sps.items()),
                      flush=True)
            for k, v in sps.items():
                loop_rows.append((net_name, k, statistics.median(v),
                                  statistics.median([f / t for t, f in zip(v, sps["fp32"])])))
    lines = [
        "# QAT overhead per training update (DQN loss, Adam; sampling excluded)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} torch thread(s); python "
        f"{platform.python_version()}, torch {torch.__version__}  ",
        f"Fake-quant loops: {native.status()}; clock: {args.clock} time  ",
        f"Written: {time.strftime('%Y-%m-%d %H:%M')}. {args.rounds} rounds, settings alternating inside each round; "
        "ratio = median over rounds of (setting / fp32 in the same round); the order of the settings rotates from "
        "round to round.",
        "",
        "| network | setting | ms / update (median) | ratio to fp32 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {k} | {med:.2f} | {ratio:.2f}x |" for n, k, med, ratio, _ in rows]
    if loop_rows:
        lines += ["", "Whole training loop (act + env step + replay + one update per train_freq; the random warm-up "
                  "steps included), quantization on from the first update, 1 env, 1 thread; time ratio = fp32 "
                  "steps/s / setting steps/s (median over rounds):", "",
                  "| network | setting | env steps / s | time ratio to fp32 |", "|---|---|---|---|"]
        lines += [f"| {n} | {k} | {sps:.0f} | {ratio:.2f}x |" for n, k, sps, ratio in loop_rows]
    if args.stages:
        lines += stages_table("Stages of the MLP update (ms, median over rounds):", stages(args.rounds, args.iters))
    if args.layers:
        lay = layers(4000)
        keys = list(lay[0][1])
        lines += ["", "One w8a8 MLP layer's training forward called on its own (one autograd node per layer, the path "
                  "outside a Linear/ReLU chain) and its pieces (us per call, batch 64, thread time):", "",
                  "| layer | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {k} | " + " | ".join(f"{v[n]:.1f}" for n in keys) + " |" for k, v in lay]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "bench_qat.md"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    notes = old[old.index("## Notes"):] if "## Notes" in old else ""  # the hand-written notes stay
    path.write_text(text + ("\n" + notes if notes else ""), encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
