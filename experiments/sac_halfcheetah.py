"""SAC and DSAC-T on MuJoCo HalfCheetah-v5: learning curves and final returns, several seeds.

    python experiments/sac_halfcheetah.py [--steps 200000] [--seeds 0 1] [--agents sac dsac]
        [--runs runs/halfcheetah] [--eval-every 10000] [--learning-starts 5000] [--threads 1]

Each (agent, seed) trains in its own run directory under ``--runs`` (``<agent>-s<seed>``); a run directory
that already holds checkpoints is resumed, so the script can be stopped and started again. Afterwards (or
with ``--report-only``) it writes ``experiments/results/sac_halfcheetah.{md,csv,png}``: greedy evaluation
returns (5 episodes) every ``--eval-every`` steps, the final return per run, mean and IQM over seeds, and
the wall time. Needs ``pip install "rlq[mujoco]"``.
"""
from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import numpy as np

from rlq.checkpoint import list_checkpoints, load_checkpoint
from rlq.logging import read_metrics
from rlq.stats import iqm

RESULTS = Path(__file__).resolve().parent / "results"


def train_one(agent: str, seed: int, args) -> float:
    from rlq.train import _compose, build_config, rewrite_env_args
    from rlq.trainer import Trainer

    run = Path(args.runs) / f"{agent}-s{seed}"
    ov = [f"agent={agent}", "env=HalfCheetah", f"seed={seed}", f"total_steps={args.steps}",
          f"agent.learning_starts={args.learning_starts}", f"eval.every={args.eval_every}", "eval.episodes=5",
          f"checkpoint.every={args.eval_every}", "log.progress=false", f"threads={args.threads}"]
    ov = rewrite_env_args(ov)  # a short name without a config file (HalfCheetah) -> env=gym env.name=...
    cfg = build_config(_compose(ov), ov)
    ckpt = load_checkpoint(run) if list_checkpoints(run) else None
    if ckpt is not None and ckpt["trainer"]["step"] >= args.steps:
        return 0.0
    t = time.perf_counter()
    trainer = Trainer(cfg, run, resume_from=ckpt)
    try:
        trainer.train()
    finally:
        trainer.close()
    return time.perf_counter() - t


def report(args, wall: dict[str, float]) -> None:
    rows, finals = [], {}
    for agent in args.agents:
        for seed in args.seeds:
            run = Path(args.runs) / f"{agent}-s{seed}"
            evals = read_metrics(run, "eval")
            for r in evals:
                rows.append({"agent": agent, "seed": seed, "step": r["step"], "return_mean": r["return_mean"]})
            if evals:
                finals[(agent, seed)] = (evals[-1]["step"], evals[-1]["return_mean"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "sac_halfcheetah.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["agent", "seed", "step", "return_mean"])
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for agent, color in zip(args.agents, ("tab:blue", "tab:orange", "tab:green")):
            for seed in args.seeds:
                pts = [(r["step"], r["return_mean"]) for r in rows if r["agent"] == agent and r["seed"] == seed]
                if pts:
                    ax.plot(*zip(*pts), color=color, alpha=0.8, label=f"{agent} s{seed}")
        ax.set_xlabel("env steps")
        ax.set_ylabel("greedy eval return (5 episodes)")
        ax.set_title("HalfCheetah-v5")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / "sac_halfcheetah.png", dpi=120)
    except ImportError:
        pass
    lines = ["# SAC and DSAC-T on HalfCheetah-v5", "",
             f"Command: `python experiments/sac_halfcheetah.py --steps {args.steps} --seeds "
             f"{' '.join(map(str, args.seeds))} --agents {' '.join(args.agents)} --eval-every {args.eval_every} "
             f"--learning-starts {args.learning_starts} --threads {args.threads}`  ",
             f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}. Curves: "
             "`sac_halfcheetah.csv`, `sac_halfcheetah.png`.", "",
             "| agent | seed | last eval step | last eval return | wall time (this invocation) |", "|---|---|---|---|---|"]
    for (agent, seed), (step, ret) in sorted(finals.items()):
        w_ = wall.get(f"{agent}-{seed}")
        lines.append(f"| {agent} | {seed} | {step} | {ret:.1f} | {'' if w_ is None else f'{w_ / 60:.1f} min'} |")
    lines += ["", "| agent | runs | mean of last returns | IQM |", "|---|---|---|---|"]
    for agent in args.agents:
        vals = np.array([ret for (a, _), (_, ret) in finals.items() if a == agent])
        if len(vals):
            lines.append(f"| {agent} | {len(vals)} | {vals.mean():.1f} | {iqm(vals):.1f} |")
    (RESULTS / "sac_halfcheetah.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--agents", nargs="+", default=["sac", "dsac"])
    ap.add_argument("--runs", default="runs/halfcheetah")
    ap.add_argument("--eval-every", type=int, default=10_000)
    ap.add_argument("--learning-starts", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    wall: dict[str, float] = {}
    if not args.report_only:
        for seed in args.seeds:
            for agent in args.agents:
                wall[f"{agent}-{seed}"] = train_one(agent, seed, args)
    report(args, wall)


if __name__ == "__main__":
    main()
