"""Learning bars of the Q-ensembles (issue 7): ``agent=qensemble`` on CartPole (>= 475 within 50k env steps) and
the SAC critic ensemble (SAC-N / REDQ) on Pendulum (>= -250), several seeds, each run stopped at the first
evaluation that reaches the bar (``eval.target_return``), as the ``slow`` tests do.

    python experiments/qensemble_learning.py --suite cartpole [--seeds 0 1 2] [--extra agent.n_members=10 ...]
    python experiments/qensemble_learning.py --suite pendulum --agent redq_utd5 [--seeds 0 1 2]

Each run is the CLI command printed in the table (``python -m rlq.train ...``), run in this process. Appends a
section to experiments/results/qensemble.md with the machine, versions and command.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rlq.logging import read_metrics
from rlq.train import _compose, build_config, run

RESULTS = Path(__file__).resolve().parent / "results"
SUITES = {
    "cartpole": {"agent": "qensemble", "bar": 475.0, "steps": 50_000,
                 "overrides": ["env=CartPole", "eval.every=2500", "eval.episodes=10"]},
    "pendulum": {"agent": "sac_n", "bar": -250.0, "steps": 15_000,
                 "overrides": ["env=Pendulum", "agent.learning_starts=1000", "eval.every=1000", "eval.episodes=10"]},
}


def run_one(overrides: list[str], run_dir: Path) -> dict:
    cfg = build_config(_compose(overrides), overrides)
    summary = run(cfg, run_dir)  # rlq.train.run: the CLI's own build-train-close
    evals = read_metrics(run_dir, "eval")
    return {"evals": [(e["step"], e["return_mean"]) for e in evals], "wall_s": summary["wall_s"],
            "updates": summary["updates"], "sps": summary["sps"], "ups": summary["updates_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--agent", default=None, help="agent preset (default: qensemble / sac_n)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides")
    ap.add_argument("--note", default="", help="a line written under the table")
    args = ap.parse_args()
    suite = SUITES[args.suite]
    agent, steps, bar = args.agent or suite["agent"], args.steps or suite["steps"], suite["bar"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            ov = [f"agent={agent}", *suite["overrides"], f"seed={seed}", f"total_steps={steps}",
                  f"eval.target_return={bar}", "threads=1", "checkpoint.every=0", "log.progress=false",
                  "log.tensorboard=false", *args.extra]
            r = run_one(ov, Path(tmp) / f"s{seed}")
            reached = next((s for s, v in r["evals"] if v >= bar), None)
            rows.append({"seed": seed, "reached": reached, **r, "command": "python -m rlq.train " + " ".join(ov)})
            print(f"seed {seed}: bar reached at {reached}, evals {r['evals']}, {r['wall_s']:.0f}s", flush=True)
    lines = [
        f"## {args.suite}: `agent={agent}` {' '.join(args.extra)} (bar {bar:g} within {steps} env steps)",
        "",
        f"Command: `python experiments/qensemble_learning.py {' '.join(sys.argv[1:])}`; each run is "
        f"`{rows[0]['command'].replace(f'seed={args.seeds[0]}', 'seed=<s>')}`  ",
        f"Machine: {platform.processor() or platform.machine()} (2 cores shared with other jobs), 1 torch thread; "
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "| seed | bar reached at env step | evaluations (step: mean return of 10 greedy episodes) | updates | wall (s) | updates/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        curve = ", ".join(f"{s}: {v:.0f}" for s, v in r["evals"])
        lines.append(f"| {r['seed']} | {r['reached'] or 'not reached'} | {curve} | {r['updates']} | "
                     f"{r['wall_s']:.0f} | {r['ups']:.0f} |")
    lines += ["", f"Seeds reaching the bar: {sum(r['reached'] is not None for r in rows)}/{len(rows)}."]
    if args.note:
        lines += ["", args.note]
    path = RESULTS / "qensemble.md"
    head = "" if path.exists() else ("# Q-ensembles: learning bars (issue 7)\n\nWritten by "
                                     "`experiments/qensemble_learning.py`; one section per invocation.\n\n")
    with path.open("a", encoding="utf-8") as f:
        f.write(head + "\n".join(lines) + "\n\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
