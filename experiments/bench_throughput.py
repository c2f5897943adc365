"""Training throughput on Pong: rlq's DQN against Stable-Baselines3's DQN with the same hyper-parameters,
alternating in one run, plus rlq with 8 vector envs at the same replay ratio and a profile of where rlq's
time goes.

    python experiments/bench_throughput.py [--rounds 3] [--steps 3000] [--learning-starts 1000]
        [--sb3-venv experiments/.venv_sb3] [--out experiments/results/bench_throughput.md]

Both sides: Nature CNN, Adam lr 1e-4, Huber loss, gradient clipping 10, plain DQN target (no Double), batch
32, one update per 4 env steps, target update every 1000 env steps, replay 100k, epsilon 1 -> 0.01 over the
first 10% of the steps, torch's default threads, CPU. SB3 (``DQN("CnnPolicy")`` on ``make_atari_env`` +
``VecFrameStack(4)``, the rl-zoo Atari setting) runs in its own virtual environment, created by this script
on first use (``torch==2.13.0`` CPU first, then ``stable-baselines3 ale-py opencv-python-headless``). Each
measurement trains ``--learning-starts`` warm-up steps (random actions, no updates) then ``--steps``
training steps; the figure is the training phase's steps/s (updates/s = steps/s / 4, for both).
Settings alternate within each round; medians over rounds. rlq x8: ``env.num_envs=8``, an update round of
2 updates every vector step (8 env steps), the same 1 update per 4 env steps. The rlq rows also measure the
issue-9 switches, each alone and together: ``overlap=true`` (the update runs in a worker thread while the
env steps; acting lags one update) and ``agent.amp=bf16`` (bf16 autocast in the update); both are opt-in.
``malloc_tuning=false`` rows turn off the trainer's default glibc malloc tuning (``rlq.trainer.tune_malloc``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

RLQ_WORKER = textwrap.dedent("""
    import json, resource, sys, time
    from rlq.train import _compose, build_config
    from rlq.trainer import Trainer
    L, N, E, F, G = (int(x) for x in sys.argv[1:6])
    extra = sys.argv[7:]
    total = L + N
    ov = ["agent=dqn", "env=Pong", f"total_steps={total}", f"agent.learning_starts={L}", "agent.batch_size=32",
          f"agent.train_freq={F}", f"agent.gradient_steps={G}", "agent.buffer_size=100000", "agent.lr=1e-4",
          "agent.target_update_period=250", "agent.double=false", "agent.eps_end=0.01",
          f"agent.eps_decay_steps={max(1, total // 10)}", f"env.num_envs={E}", "eval.every=0", "eval.final=false",
          "checkpoint.every=0", "log.every=100000", "log.progress=false", "log.tensorboard=false", "threads=0", *extra]
    cfg = build_config(_compose(ov), ov)
    tr = Trainer(cfg, sys.argv[6])
    marks = {}
    set_step = tr.agent.set_step
    def hook(s):
        if s >= L and "t0" not in marks:
            marks.update(t0=time.perf_counter(), s0=s, u0=tr.updates)
        set_step(s)
    tr.agent.set_step = hook
    tr.train()
    t1 = time.perf_counter()
    dt = t1 - marks["t0"]
    print(json.dumps({"sps": (tr.step - marks["s0"]) / dt, "ups": (tr.updates - marks["u0"]) / dt,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

SB3_WORKER = textwrap.dedent("""
    import json, resource, sys, time
    import gymnasium as gym, ale_py
    gym.register_envs(ale_py)
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack
    L, N = int(sys.argv[1]), int(sys.argv[2])
    env = VecFrameStack(make_atari_env("PongNoFrameskip-v4", n_envs=1, seed=0), n_stack=4)
    model = DQN("CnnPolicy", env, buffer_size=100000, learning_starts=L, batch_size=32, train_freq=4, gradient_steps=1,
                target_update_interval=1000, learning_rate=1e-4, exploration_fraction=0.1, exploration_final_eps=0.01,
                optimize_memory_usage=False, verbose=0, seed=0, device="cpu")
    class Clock(BaseCallback):
        def __init__(self):
            super().__init__()
            self.t0 = None
        def _on_step(self):
            if self.t0 is None and self.num_timesteps >= L:
                self.t0, self.s0, self.u0 = time.perf_counter(), self.num_timesteps, self.model._n_updates
            return True
    cb = Clock()
    model.learn(total_timesteps=L + N, callback=cb)
    dt = time.perf_counter() - cb.t0
    print(json.dumps({"sps": (model.num_timesteps - cb.s0) / dt, "ups": (model._n_updates - cb.u0) / dt,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "threads": torch.get_num_threads()}))
""")


def sb3_python(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating the SB3 virtual environment in {venv} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "stable-baselines3", "ale-py", "opencv-python-headless"],
                       check=True)
    return py


def run_worker(cmd: list[str]) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if res.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd[:3])}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def profile_rlq() -> dict[str, float]:
    """Median times of one rlq DQN update (batch 32), one batch-1 action and one env step on Pong (malloc tuned,
    as the trainer does by default)."""
    import gymnasium as gym
    import numpy as np
    import torch

    from rlq.agents import make_agent
    from rlq.envs import make_env
    from rlq.replay.base import Batch
    from rlq.train import _compose, build_config
    from rlq.trainer import tune_malloc
    tune_malloc()
    ov = ["agent=dqn", "env=Pong", "agent.double=false"]
    cfg = build_config(_compose(ov), ov)
    env = make_env("Pong", num_envs=1, seed=0)
    agent = make_agent(cfg.agent, env.single_observation_space, env.single_action_space, seed=0)
    ov16 = [*ov, "agent.amp=bf16"]
    agent16 = make_agent(build_config(_compose(ov16), ov16).agent, env.single_observation_space,
                         env.single_action_space, seed=0)
    g = torch.Generator().manual_seed(0)
    obs = lambda: torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8, generator=g)  # noqa: E731
    batch = Batch(obs=obs(), action=torch.randint(0, 6, (32,), generator=g), reward=torch.zeros(32),
                  discount=torch.full((32,), 0.99), next_obs=obs(), idx=torch.arange(32), weights=torch.ones(32))
    out = {}

    def med(fn, n):
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3
    threads = torch.get_num_threads()
    for t in (threads, 1):
        torch.set_num_threads(t)
        out[f"update_ms_{t}t"] = med(lambda: agent.update(batch), 30)
        out[f"update_bf16_ms_{t}t"] = med(lambda: agent16.update(batch), 30)
    torch.set_num_threads(threads)
    out["update_ms"] = out[f"update_ms_{threads}t"]
    o, _ = env.reset(seed=0)
    agent.set_step(10**9)  # greedy: every action is a forward pass
    out["act_ms"] = med(lambda: agent.act(o, explore=True), 200)
    a = np.zeros(1, np.int64)
    out["env_step_ms"] = med(lambda: env.step(a), 500)
    env.close()
    out["threads"] = torch.get_num_threads()
    del gym
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--learning-starts", type=int, default=1000)
    ap.add_argument("--sb3-venv", default=str(ROOT / ".venv_sb3"))
    ap.add_argument("--out", default=str(RESULTS / "bench_throughput.md"))
    args = ap.parse_args()
    py = sb3_python(Path(args.sb3_venv))
    L, N = args.learning_starts, args.steps
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"rlq_bench_tp_{os.getpid()}"
    def rlq(envs: int, *extra: str):
        freq, grad = ("4", "1") if envs == 1 else ("1", str(envs // 4))  # one update per 4 env steps either way
        return lambda i: [sys.executable, "-c", RLQ_WORKER, str(L), str(N), str(envs), freq, grad,
                          str(tmp / f"{envs}-{'-'.join(extra)}-{i}"), *extra]
    settings = {  # the first is the default configuration; the others add the issue-9 switches
        "rlq DQN, 1 env": rlq(1),
        "rlq DQN, 1 env, overlap=true": rlq(1, "overlap=true"),
        "rlq DQN, 1 env, agent.amp=bf16": rlq(1, "agent.amp=bf16"),
        "rlq DQN, 1 env, overlap + bf16": rlq(1, "overlap=true", "agent.amp=bf16"),
        "SB3 DQN, 1 env": lambda i: [str(py), "-c", SB3_WORKER, str(L), str(N)],
        "rlq DQN, 8 envs": rlq(8),
        "rlq DQN, 8 envs, overlap + bf16": rlq(8, "overlap=true", "agent.amp=bf16"),
        "rlq DQN, 8 envs, agent.amp=bf16": rlq(8, "agent.amp=bf16"),
        "rlq DQN, 1 env, malloc_tuning=false": rlq(1, "malloc_tuning=false"),
        "rlq DQN, 1 env, bf16, malloc_tuning=false": rlq(1, "agent.amp=bf16", "malloc_tuning=false"),
    }
    results: dict[str, list[dict]] = {k: [] for k in settings}
    load0 = os.getloadavg()[0]
    for r in range(args.rounds):
        for name, cmd in settings.items():
            res = run_worker(cmd(r))
            results[name].append(res)
            print(f"round {r}: {name}: {res['sps']:.1f} steps/s, {res['ups']:.1f} updates/s", file=sys.stderr)
    prof = profile_rlq()
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("sps", "ups", "rss_mb")} for k, v in results.items()}
    sb3 = med["SB3 DQN, 1 env"]["sps"]
    sb3_version = subprocess.run([str(py), "-c", "import stable_baselines3, torch; print(stable_baselines3.__version__, "
                                  "torch.__version__)"], capture_output=True, text=True).stdout.split()
    import torch
    lines = ["# Training throughput on Pong: rlq DQN vs Stable-Baselines3 DQN", "",
             f"Command: `python experiments/bench_throughput.py --rounds {args.rounds} --steps {N} "
             f"--learning-starts {L}`  ",
             f"Machine: {_cpu()}; Python {platform.python_version()}, rlq's torch {torch.__version__}, "
             f"SB3 {sb3_version[0] if sb3_version else '?'} (torch {sb3_version[1] if len(sb3_version) > 1 else '?'}) "
             "in its own venv; torch default threads on both sides (rlq with overlap=true: one for the learner, one "
             "for the actor).  ",
             f"Each figure: the training phase ({N} steps after {L} warm-up steps), median over {args.rounds} "
             "rounds; settings alternate within a round.", "",
             "| setting | steps/s | updates/s | vs SB3 | peak RSS (MB) | per round (steps/s) |", "|---|---|---|---|---|---|"]
    for name, m in med.items():
        per = " / ".join(f"{x['sps']:.0f}" for x in results[name])
        lines.append(f"| {name} | {m['sps']:.1f} | {m['ups']:.1f} | {m['sps'] / sb3:.2f}x | {m['rss_mb']:.0f} | {per} |")
    t = prof["threads"]
    side = 4 * (prof["act_ms"] + prof["env_step_ms"])  # the actor's work per update at 1 update / 4 steps
    lines += ["", f"Where rlq's time goes (median of repeated calls, same process; torch threads {t} unless noted):",
              "", "| piece | ms |", "|---|---|",
              f"| one DQN update, fp32 (batch 32: 2 Nature-CNN forwards, 1 backward, Adam), {t} threads | "
              f"{prof[f'update_ms_{t}t']:.1f} |",
              f"| the same, 1 thread | {prof['update_ms_1t']:.1f} |",
              f"| one DQN update, agent.amp=bf16, {t} threads | {prof[f'update_bf16_ms_{t}t']:.1f} |",
              f"| the same, 1 thread | {prof['update_bf16_ms_1t']:.1f} |",
              f"| one greedy action (batch-1 forward, fp32) | {prof['act_ms']:.2f} |",
              f"| one env step (ale-py vector env, 1 env, frame skip 4) | {prof['env_step_ms']:.2f} |",
              f"| => synchronous ceiling at 1 update / 4 steps, fp32: 4 / (update + 4 x (act + step)) | "
              f"{4000 / (prof[f'update_ms_{t}t'] + side):.0f} steps/s |",
              f"| => synchronous ceiling, bf16 | {4000 / (prof[f'update_bf16_ms_{t}t'] + side):.0f} steps/s |",
              f"| => overlap ceiling (learner and actor on a core each), fp32: 4 / max(update@1t, 4 x (act + step)) | "
              f"{4000 / max(prof['update_ms_1t'], side):.0f} steps/s |",
              f"| => overlap ceiling, bf16 | {4000 / max(prof['update_bf16_ms_1t'], side):.0f} steps/s |", ""]
    lines.insert(5, f"Load average (1 min) at start / end: {load0:.2f} / {os.getloadavg()[0]:.2f}.  ")
    text = "\n".join(lines)
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    if "\n## Reading" in old:  # keep the hand-written analysis of an earlier run
        text += old[old.index("\n## Reading"):]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
