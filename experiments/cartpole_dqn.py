"""CartPole learning bar for the DQN family: each agent x seed trains for 50k env steps with greedy
evaluation (10 episodes) every 5k steps; the table reports the first step whose evaluation mean
reached 475, the best and final evaluation, and wall time.

    python experiments/cartpole_dqn.py [--agents dqn double_dqn dueling_dqn] [--seeds 0 1 2] [--steps 50000]
        [--name cartpole_dqn] [rlq.train overrides applied to every run, e.g. overlap=true agent.amp=bf16]

Writes experiments/results/<name>.md (and .json) with the machine, versions and command.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rlq.evaluation import iqm
from rlq.logging import read_metrics
from rlq.train import _compose, build_config, run

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(agent: str, seed: int, steps: int, workdir: Path, extra: list[str] = ()) -> dict:
    overrides = [f"agent={agent}", f"seed={seed}", f"total_steps={steps}", "eval.every=5000", "eval.episodes=10",
                 "checkpoint.every=0", "log.progress=false", "log.tensorboard=false", *extra]
    cfg = build_config(_compose(overrides), overrides)
    run_dir = workdir / f"{agent}-s{seed}"
    summary = run(cfg, run_dir)  # rlq.train.run: the CLI's own build-train-close
    evals = read_metrics(run_dir, "eval")
    solved = next((e["step"] for e in evals if e["return_mean"] >= 475), None)
    return {"agent": agent, "seed": seed, "solved_at": solved, "best_eval": summary["best_eval"],
            "final_eval": evals[-1]["return_mean"], "curve": [(e["step"], e["return_mean"]) for e in evals],
            "wall_s": summary["wall_s"], "sps": summary["sps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", nargs="+", default=["dqn", "double_dqn", "dueling_dqn"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=50_000)
    ap.add_argument("--name", default="cartpole_dqn", help="results file name (experiments/results/<name>.md)")
    ap.add_argument("overrides", nargs="*", help="rlq.train overrides for every run")
    args = ap.parse_args()
    # overrides written after --agents land in it (argparse): key=value words are overrides, never agent names
    args.overrides += [a for a in args.agents if "=" in a]
    args.agents = [a for a in args.agents if "=" not in a]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for agent in args.agents:
            for seed in args.seeds:
                r = run_one(agent, seed, args.steps, Path(tmp), args.overrides)
                rows.append(r)
                print(f"{agent:12s} seed {seed}: solved at {r['solved_at']}, best {r['best_eval']:.1f}, "
                      f"final {r['final_eval']:.1f}, {r['wall_s']:.0f}s", flush=True)
    lines = [
        f"# CartPole-v1, DQN family: greedy evaluation (10 episodes every 5k env steps), {args.steps // 1000}k env steps",
        "",
        *([f"Overrides on every run: `{' '.join(args.overrides)}`  "] if args.overrides else []),
        f"Command: `python {' '.join(['experiments/cartpole_dqn.py', *sys.argv[1:]])}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "| agent | seed | first eval >= 475 at step | best eval | final eval | wall (s) | env steps/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['agent']} | {r['seed']} | {r['solved_at'] or 'never'} | {r['best_eval']:.1f} | "
                     f"{r['final_eval']:.1f} | {r['wall_s']:.0f} | {r['sps']:.0f} |")
    lines += ["", "| agent | seeds solved (eval >= 475 within budget) | IQM of final eval | median wall (s) |",
              "|---|---|---|---|"]
    for agent in args.agents:
        rs = [r for r in rows if r["agent"] == agent]
        lines.append(f"| {agent} | {sum(r['solved_at'] is not None for r in rs)}/{len(rs)} | "
                     f"{iqm(np.array([r['final_eval'] for r in rs])):.1f} | {np.median([r['wall_s'] for r in rs]):.0f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
