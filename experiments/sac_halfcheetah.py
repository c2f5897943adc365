"""SAC and DSAC-T on MuJoCo HalfCheetah-v5: learning curves and final returns, several seeds.

    python experiments/sac_halfcheetah.py [--steps 200000] [--seeds 0 1] [--agents sac dsac]
        [--runs runs/halfcheetah] [--eval-every 10000] [--learning-starts 5000] [--threads 1]
        [--results experiments/results] [--report-only]

Each (agent, seed) trains in its own run directory under ``--runs`` (``<agent>-s<seed>``); a run directory
that already holds checkpoints is resumed, so the script can be stopped and started again. Afterwards (or
with ``--report-only``) it writes ``sac_halfcheetah.{md,csv,png}`` into ``--results`` (default
``experiments/results``): greedy evaluation returns (5 episodes) every ``--eval-every`` steps, the final return
per run, mean and IQM over seeds, and the measured throughput. The report covers every ``<agent>-s<seed>``
run directory under ``--runs`` for the chosen agents, not only this invocation's seeds, so seeds trained by
separate (e.g. parallel) invocations end up in one table; hand-written text after the generated part of an
existing report (from the line ``<!-- end of generated part -->``) is kept. Needs ``pip install "rlq[mujoco]"``.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

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


END_MARK = "<!-- end of generated part -->"


def run_seeds(args) -> list[int]:
    """This invocation's seeds plus every seed with a run directory under ``--runs`` for the chosen agents."""
    seeds = set(args.seeds)
    for agent in args.agents:
        for d in Path(args.runs).glob(f"{agent}-s*"):
            tail = d.name[len(agent) + 2:]
            if d.is_dir() and tail.isdigit():
                seeds.add(int(tail))
    return sorted(seeds)


def throughput(run: Path, learning_starts: int) -> tuple[float, float, int]:
    """(median env steps/s over the logged intervals after ``learning_starts``, seconds spent training summed
    over the logged intervals (evaluations included, pauses between resumed invocations not), last step)."""
    train = read_metrics(run, "train")
    if not train:
        return math.nan, math.nan, 0
    secs, prev, learning = 0.0, 0, []
    for r in train:  # each record: the steps since the previous one, at r["sps"]
        if r["step"] > prev and r["sps"] > 0:
            secs += (r["step"] - prev) / r["sps"]
            if prev >= learning_starts:
                learning.append(r["sps"])
        prev = r["step"]
    return (float(np.median(learning)) if learning else math.nan), secs, int(train[-1]["step"])


def report(args, wall: dict[str, float]) -> None:
    rows, finals, speed = [], {}, {}
    seeds = run_seeds(args)
    for agent in args.agents:
        for seed in seeds:
            run = Path(args.runs) / f"{agent}-s{seed}"
            evals = read_metrics(run, "eval")
            for r in evals:
                rows.append({"agent": agent, "seed": seed, "step": r["step"], "return_mean": r["return_mean"]})
            if evals:
                finals[(agent, seed)] = (evals[-1]["step"], evals[-1]["return_mean"])
                speed[(agent, seed)] = throughput(run, args.learning_starts)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "sac_halfcheetah.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["agent", "seed", "step", "return_mean"])
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for agent, color in zip(args.agents, ("tab:blue", "tab:orange", "tab:green")):
            for seed in seeds:
                pts = [(r["step"], r["return_mean"]) for r in rows if r["agent"] == agent and r["seed"] == seed]
                if pts:
                    ax.plot(*zip(*pts), color=color, alpha=0.8, label=f"{agent} s{seed}")
        ax.set_xlabel("env steps")
        ax.set_ylabel("greedy eval return (5 episodes)")
        ax.set_title("HalfCheetah-v5")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(results / "sac_halfcheetah.png", dpi=120)
    except ImportError:
        pass
    command = (f"Command: `python experiments/sac_halfcheetah.py --steps {args.steps} --seeds "
               f"{' '.join(map(str, args.seeds))} --agents {' '.join(args.agents)} --eval-every {args.eval_every} "
               f"--learning-starts {args.learning_starts} --threads {args.threads}`  ")
    machine = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, torch {torch.__version__}. Runs: `{args.runs}` (seeds found: "
               f"{', '.join(map(str, seeds))}). Curves: `sac_halfcheetah.csv`, `sac_halfcheetah.png`.")
    speed_note = ("Steps/s: the median over the 1000-step logging intervals after learning starts (one update per "
                  "env step); training time: summed over the logged intervals (evaluations included), all invocations.")
    lines = ["# SAC and DSAC-T on HalfCheetah-v5", "", command, machine, "", speed_note, "",
             "| agent | seed | last eval step | last eval return | steps/s while learning | training time | this invocation |",
             "|---|---|---|---|---|---|---|"]
    for (agent, seed), (step, ret) in sorted(finals.items()):
        w_ = wall.get(f"{agent}-{seed}")
        sps, secs, _ = speed[(agent, seed)]
        lines.append(f"| {agent} | {seed} | {step} | {ret:.1f} | {sps:.1f} | {secs / 60:.1f} min | "
                     f"{'' if not w_ else f'{w_ / 60:.1f} min'} |")
    lines += ["", "| agent | runs | mean of last returns | IQM | est. time for 200k steps at the median steps/s |",
              "|---|---|---|---|---|"]
    for agent in args.agents:
        vals = np.array([ret for (a, _), (_, ret) in finals.items() if a == agent])
        rates = [speed[k][0] for k in finals if k[0] == agent and math.isfinite(speed[k][0])]
        est = f"{200_000 / float(np.median(rates)) / 3600:.1f} h per run" if rates else ""
        if len(vals):
            lines.append(f"| {agent} | {len(vals)} | {vals.mean():.1f} | {iqm(vals):.1f} | {est} |")
    lines += ["", END_MARK]
    path = results / "sac_halfcheetah.md"
    kept = ""
    if path.exists():  # keep the hand-written analysis below the generated part
        old = path.read_text()
        if END_MARK in old:
            kept = old.split(END_MARK, 1)[1].lstrip("\n")
        elif "\nAnalysis" in old:
            kept = old[old.index("\nAnalysis") + 1:]
    path.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
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
    ap.add_argument("--results", default=str(RESULTS), help="where the .md/.csv/.png report goes")
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
