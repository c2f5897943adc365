"""Prioritized replay micro-benchmark: cost of one ``sample(32)`` + ``update_priorities(32)`` on a full
1M-slot sum-tree (the per-learner-step overhead of PER), median over many calls.

    python experiments/bench_per.py [--capacity 1000000] [--batch 32] [--iters 5000]

Two settings: (a) the sampler alone with a fake SampleSource whose ``valid_mask`` is all True;
(b) a real ``ReplayBuffer`` (8 envs, float32 obs of shape (4,), n_step=3, episodes of ~100 steps so
reset slots exist) filled to capacity, timing ``buffer.sampler.sample`` + ``buffer.update_priorities``
(gathering observations excluded). The uniform sampler's ``sample`` is timed in (b) for reference.
Writes experiments/results/bench_per.md with the machine, versions and command.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rlq.replay import PrioritizedSampler, ReplayBuffer, UniformSampler

RESULTS = Path(__file__).resolve().parent / "results"


class AllValid:
    def __init__(self, capacity: int):
        self.capacity = self.rows = capacity
        self.num_envs = 1

    def sample_window(self):
        return 0, self.rows

    def valid_mask(self, idx):
        return np.ones(np.shape(idx), dtype=bool)


def median_us(fn, iters: int, warmup: int = 200) -> float:
    for _ in range(warmup):
        fn()
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter_ns()
        fn()
        times[i] = time.perf_counter_ns() - t0
    return float(np.median(times) / 1e3)


def bench_sampler(capacity: int, batch: int, iters: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    s = PrioritizedSampler(capacity, seed=0)
    src = AllValid(capacity)
    for lo in range(0, capacity, 8192):  # fill like a buffer would, in chunks
        s.on_add(np.arange(lo, min(lo + 8192, capacity)))
    s.update_priorities(np.arange(capacity), rng.exponential(size=capacity))
    p = rng.exponential(size=batch).astype(np.float32)

    def step():
        idx, _ = s.sample(batch, src)
        s.update_priorities(idx, p)

    state = {}

    def only_sample():
        state["idx"] = s.sample(batch, src)[0]

    only_sample()
    return {"sample+update": median_us(step, iters), "sample": median_us(only_sample, iters),
            "update": median_us(lambda: s.update_priorities(state["idx"], p), iters)}


def bench_buffer(capacity: int, batch: int, iters: int) -> dict[str, float]:
    E = 8
    rng = np.random.default_rng(1)
    buf = ReplayBuffer(capacity, E, (4,), np.float32, n_step=3, sampler=PrioritizedSampler(capacity, seed=0))
    obs = np.zeros((E, 4), np.float32)
    act = np.zeros(E, np.int64)
    zero = np.zeros(E, np.float32)
    no = np.zeros(E, bool)
    for _ in range(capacity // E + 10):
        term = rng.random(E) < 0.01
        buf.add(obs, act, zero, term, no, obs)
    p = rng.exponential(size=batch).astype(np.float32)

    def step():
        idx, _ = buf.sampler.sample(batch, buf)
        buf.update_priorities(idx, p)

    out = {"sample+update": median_us(step, iters)}
    uniform = UniformSampler(0)
    out["uniform sample"] = median_us(lambda: uniform.sample(batch, buf), iters)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5000)
    args = ap.parse_args()

    a = bench_sampler(args.capacity, args.batch, args.iters)
    print("(a) sampler, all valid: " + ", ".join(f"{k} {v:.1f} us" for k, v in a.items()))
    b = bench_buffer(args.capacity, args.batch, args.iters)
    print("(b) ReplayBuffer:       " + ", ".join(f"{k} {v:.1f} us" for k, v in b.items()))

    load = os.getloadavg()[0]
    cmd = "python experiments/bench_per.py " + " ".join(sys.argv[1:])
    depth = (args.capacity - 1).bit_length()
    lines = [
        "# Prioritized replay micro-benchmark",
        "",
        f"Sum-tree over {args.capacity:,} slots ({depth} levels), batch {args.batch}, "
        f"median of {args.iters} calls (after 200 warm-up calls), single thread, CPU.",
        "",
        "| setting | operation | µs per call |",
        "|---|---|---|",
        *[f"| (a) sampler, fake source (all valid) | {k} | {v:.1f} |" for k, v in a.items()],
        *[f"| (b) ReplayBuffer, 8 envs, n_step=3 | {k} | {v:.1f} |" for k, v in b.items()],
        "",
        "(b) times `buffer.sampler.sample(32, buffer)` + `buffer.update_priorities(idx, p)` (validity checks and",
        "redraws of reset/incomplete slots included, observation gathering excluded); `uniform sample` is",
        "`UniformSampler.sample` on the same buffer for reference.",
        "",
        f"- machine: {machine()}; 1-min load average at the end of the run {load:.1f}"
        + (" (other processes were running: these medians are upper bounds)" if load > 1.2 else ""),
        f"- python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}",
        f"- command: `{cmd.strip()}`",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_per.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'bench_per.md'}")


if __name__ == "__main__":
    main()
