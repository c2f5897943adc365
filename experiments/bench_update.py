"""What makes one Nature-CNN DQN update faster on this CPU: the candidate learner optimizations of issue 9,
measured against the default fp32 update in one process (settings alternate inside each round; the figure is
the median over rounds of each setting's time, and its ratio to fp32 in the same round).

    python experiments/bench_update.py [--rounds 5] [--threads 1 2] [--batch 32] [--compile]

Settings (the update is rlq's ``DQNAgent.update``: plain DQN target, Huber loss, gradient clipping, fused Adam):
``fp32`` (default), ``agent.amp=bf16`` (bf16 autocast in the forward/backward), channels-last weights and
inputs, both, and with ``--compile`` the two networks wrapped in ``torch.compile`` (fp32 and bf16; the compile
time is reported). Writes experiments/results/bench_update.md with the machine, versions and command.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def make(amp: str, channels_last: bool, compile_: bool, batch: int):
    from rlq.agents import make_agent
    from rlq.envs import make_env
    from rlq.replay.base import Batch
    from rlq.train import _compose, build_config

    ov = ["agent=dqn", "env=Pong", "agent.double=false", f"agent.amp={amp}"]
    cfg = build_config(_compose(ov), ov)
    env = make_env("Pong", num_envs=1, seed=0)
    torch.manual_seed(0)
    agent = make_agent(cfg.agent, env.single_observation_space, env.single_action_space, seed=0)
    env.close()
    g = torch.Generator().manual_seed(0)

    def obs():
        o = torch.randint(0, 256, (batch, 4, 84, 84), dtype=torch.uint8, generator=g)
        return o.contiguous(memory_format=torch.channels_last) if channels_last else o
    b = Batch(obs=obs(), action=torch.randint(0, 6, (batch,), generator=g), reward=torch.zeros(batch),
              discount=torch.full((batch,), 0.99), next_obs=obs(), idx=torch.arange(batch), weights=torch.ones(batch))
    if channels_last:
        agent.online.to(memory_format=torch.channels_last)
        agent.target.to(memory_format=torch.channels_last)
    compile_s = 0.0
    if compile_:
        agent.online, agent.target = torch.compile(agent.online), torch.compile(agent.target)
        t = time.perf_counter()
        agent.update(b)
        agent.update(b)
        compile_s = time.perf_counter() - t
    return (lambda: agent.update(b)), compile_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10, help="timed updates per setting per round")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd networks")
    ap.add_argument("--out", default=str(RESULTS / "bench_update.md"))
    args = ap.parse_args()
    variants = {"fp32": ("none", False, False), "agent.amp=bf16": ("bf16", False, False),
                "channels-last": ("none", True, False), "bf16 + channels-last": ("bf16", True, False)}
    if args.compile:
        variants |= {"torch.compile": ("none", False, True), "torch.compile + bf16": ("bf16", False, True)}
    fns, compile_s = {}, {}
    for name, v in variants.items():
        fns[name], compile_s[name] = make(*v, args.batch)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                fn()
                t = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                times[k].append((time.perf_counter() - t) / args.iters * 1e3)
        for k, ts in times.items():
            ratio = statistics.median(t / f for t, f in zip(ts, times["fp32"]))
            rows.append((threads, k, statistics.median(ts), ratio))
            print(f"{threads} threads  {k:22s} {statistics.median(ts):6.1f} ms  x{ratio:.2f}", file=sys.stderr)
    acts = act_rows(args.rounds, args.iters)
    pieces = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for amp in ("none", "bf16"):
            pieces[(threads, amp)] = breakdown(amp, args.batch, args.iters * args.rounds)
    lines = [f"# One Nature-CNN DQN update (batch {args.batch}): learner optimizations against fp32", "",
             f"Command: `python {' '.join(['experiments/bench_update.py', *sys.argv[1:]])}`  ",
             f"Machine: {_cpu()}; python {platform.python_version()}, torch {torch.__version__}; load average (1 min) "
             f"at the end {os.getloadavg()[0]:.2f}.  ",
             f"Each setting: median over {args.rounds} rounds of {args.iters} updates; ratio = median over rounds of "
             "(setting / fp32 in the same round), so below 1 is faster.", "",
             "| torch threads | setting | ms / update | ratio to fp32 |", "|---|---|---|---|"]
    lines += [f"| {t} | {k} | {ms:.1f} | {r:.2f}x |" for t, k, ms, r in rows]
    names = list(next(iter(pieces.values())))
    lines += ["", "Where one update's time goes (the same update written out; median ms per piece):", "",
              "| torch threads | numerics | " + " | ".join(names) + " | sum |", "|---|---|" + "---|" * (len(names) + 1)]
    lines += [f"| {t} | {'fp32' if amp == 'none' else 'bf16'} | " + " | ".join(f"{p[n]:.1f}" for n in names)
              + f" | {sum(p.values()):.1f} |" for (t, amp), p in pieces.items()]
    lines += ["", "Acting (greedy forward of the fp32 Nature CNN under inference mode, one row per env): torch threads "
              "for the forward, with the other core idle and with it busy (a second process running the same "
              "fp32 update in a loop); agents act on one thread for batches up to 16 (`rlq.agents.base.acting_threads`).",
              "", "| batch | other core | 1 thread (ms) | 2 threads (ms) |", "|---|---|---|---|"]
    lines += [f"| {b} | {busy} | {t1:.2f} | {t2:.2f} |" for b, busy, t1, t2 in acts]
    if args.compile:
        lines += ["", "Compile time (first two updates): " + ", ".join(
            f"{k} {s:.0f} s" for k, s in compile_s.items() if s)]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    if "\n## Reading" in old:
        text += old[old.index("\n## Reading"):]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


def breakdown(amp: str, batch: int, iters: int) -> dict[str, float]:
    """Median ms of each piece of one plain-DQN update: online forward (with grad), target forward, backward,
    gradient clipping + Adam step."""
    import torch.nn.functional as F

    from rlq.nets import QHead, QNetwork
    from rlq.nets.encoders import NatureCNN

    torch.manual_seed(0)
    on, tg = QNetwork(NatureCNN(4, 512), QHead(512, 6)), QNetwork(NatureCNN(4, 512), QHead(512, 6))
    tg.requires_grad_(False)
    opt = torch.optim.Adam(on.parameters(), lr=1e-4, eps=1.5e-4, fused=True)
    params = list(on.parameters())
    obs = torch.randint(0, 256, (batch, 4, 84, 84), dtype=torch.uint8)
    a = torch.randint(0, 6, (batch, 1))
    times: dict[str, list[float]] = {"online forward": [], "target forward": [], "backward": [], "clip + Adam": []}
    for i in range(iters + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            q = on(obs).float().gather(1, a).squeeze(1)
            t1 = time.perf_counter()
            with torch.no_grad():
                y = 0.99 * tg(obs).float().max(1).values
        t2 = time.perf_counter()
        loss = F.smooth_l1_loss(q, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 10.0, foreach=True)
        opt.step()
        t4 = time.perf_counter()
        if i >= 2:
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[k].append(dt * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def act_rows(rounds: int, iters: int) -> list[tuple[int, str, float, float]]:
    """Median greedy-forward time at batch 1 and 10 on 1 and 2 threads, with the other core idle and busy."""
    import subprocess

    from rlq.nets import QHead, QNetwork
    from rlq.nets.encoders import NatureCNN

    net = QNetwork(NatureCNN(4, 512), QHead(512, 6)).eval()
    busy_src = ("import torch\ntorch.set_num_threads(1)\nfrom rlq.nets import QHead, QNetwork\n"
                "from rlq.nets.encoders import NatureCNN\nn = QNetwork(NatureCNN(4, 512), QHead(512, 6))\n"
                "x = torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8)\n"
                "while True:\n    n(x).sum().backward()\n")
    rows = []
    for busy in ("idle", "busy"):
        proc = subprocess.Popen([sys.executable, "-c", busy_src]) if busy == "busy" else None
        if proc is not None:
            time.sleep(3)
        try:
            for b in (1, 10):
                x = torch.randint(0, 256, (b, 4, 84, 84), dtype=torch.uint8)
                res = {1: [], 2: []}
                for _ in range(rounds):
                    for t in (1, 2):
                        torch.set_num_threads(t)
                        with torch.inference_mode():
                            net(x)
                            t0 = time.perf_counter()
                            for _ in range(iters * 5):
                                net(x)
                        res[t].append((time.perf_counter() - t0) / (iters * 5) * 1e3)
                rows.append((b, busy, statistics.median(res[1]), statistics.median(res[2])))
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    return rows


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                isa = "AVX512_BF16" if "avx512_bf16" in flags else ("AVX-512" if "avx512f" in flags else "AVX2")
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs, {isa}"
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
