"""Offline RL on CartPole from a mediocre behaviour policy: an online Q-ensemble is trained until its greedy
evaluation first reaches ``--behaviour-return`` (a mediocre policy), ``rlq.collect`` records ``--transitions``
transitions of it with epsilon-greedy noise, then offline agents train from that dataset alone (no env steps
except evaluation) and their greedy evaluation is reported next to the behaviour policy's.

    python experiments/offline_cartpole.py [--behaviour-return 150] [--transitions 20000] [--noise 0.3]
        [--updates 3000] [--agents dqn qensemble:min dqn@256 qensemble:min@256] [--seeds 0 1 2]

An agent is ``name[:target_reduction][@batch]`` (``qensemble:min@512``: 10 members, min target, batch 512 with the
learning rate scaled by the square root of the batch ratio, as LB-SAC).

Every step is the CLI command printed in the results file (``python -m rlq.train ...``, ``python -m rlq.collect
...``, ``python -m rlq.train ... offline.dataset=...``), run in this process. Writes
experiments/results/offline_cartpole.md (machine, versions, command).
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

from rlq.evaluate import evaluate_checkpoint
from rlq.evaluation import iqm
from rlq.logging import read_metrics
from rlq.train import _compose, build_config, run

RESULTS = Path(__file__).resolve().parent / "results"
QUIET = ["threads=1", "log.progress=false", "log.tensorboard=false"]


def train(ov: list[str], run_dir: Path) -> dict:
    cfg = build_config(_compose(ov), ov)
    return run(cfg, run_dir)


def agent_overrides(spec: str) -> list[str]:
    """``name[:reduction][@batch]``: ``qensemble`` has 10 members and the given target reduction (default redq);
    ``@batch`` trains with that batch size and the learning rate scaled by sqrt(batch / default batch), LB-SAC's
    rule (Nikulin et al. 2022; ``configs/agent/lb_sac.yaml`` is its SAC-N form)."""
    spec, _, batch = spec.partition("@")
    name, _, reduction = spec.partition(":")
    ov = [f"agent={name}"]
    if name == "qensemble":
        ov += ["agent.n_members=10", f"agent.target_reduction={reduction or 'redq'}"]
    if batch:
        a = _compose(list(ov)).agent
        lr = float(a.lr) * (int(batch) / int(a.batch_size)) ** 0.5
        ov += [f"agent.batch_size={int(batch)}", f"agent.lr={lr:.3g}"]
    return ov


def write_report(args, commands, t0, b_evals, greedy, meta, rows) -> None:
    """Rewrite the results file from the rows so far (after every run, so a stopped script leaves its rows)."""
    lines = [
        "# Offline RL on CartPole from a mediocre behaviour policy",
        "",
        f"Command: `python experiments/offline_cartpole.py {' '.join(sys.argv[1:])}` ({time.perf_counter() - t0:.0f} s)  ",
        f"Machine: {platform.processor() or platform.machine()} (2 cores shared with other jobs), 1 torch thread; "
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "Steps (each is the CLI command shown, run in-process by the script):",
        "",
        *[f"{i + 1}. `{c}`" for i, c in enumerate(commands)],
        "",
        "## Behaviour policy and dataset",
        "",
        f"- behaviour policy: online `agent=qensemble` stopped at its first evaluation >= {args.behaviour_return:g}: "
        f"step {b_evals[-1]['step']}, evaluations {', '.join(str(round(e['return_mean'])) for e in b_evals)}",
        f"- its greedy return (`rlq.evaluate`, 20 episodes): **{greedy['mean']:.1f} ± {greedy['std']:.1f}**",
        f"- dataset: {meta['transitions']} transitions, epsilon = {meta['noise']:g}, {meta['episodes']} behaviour "
        f"episodes with return **{meta['return_mean']:.1f} ± {meta['return_std']:.1f}** (the data's own return)",
        "",
        f"## Offline agents ({args.updates} gradient updates each, greedy evaluation of 10 episodes every "
        f"{max(args.updates // 10, 1)} updates)",
        "",
        "| agent | seed | final eval | best eval | evaluations | wall (s) | updates/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        curve = ", ".join(f"{v:.0f}" for _, v in r["curve"])
        lines.append(f"| {r['agent']} | {r['seed']} | {r['final']:.1f} | {r['best']:.1f} | {curve} | {r['wall_s']:.0f} | "
                     f"{r['ups']:.0f} |")
    lines += ["", "| agent | IQM of final evals over seeds | mean of final evals | vs behaviour greedy | vs dataset return |",
              "|---|---|---|---|---|"]
    for spec in dict.fromkeys(r["agent"] for r in rows):
        finals = np.array([r["final"] for r in rows if r["agent"] == spec])
        lines.append(f"| {spec} | {iqm(finals):.1f} | {finals.mean():.1f} | {finals.mean() - greedy['mean']:+.1f} | "
                     f"{finals.mean() - meta['return_mean']:+.1f} |")
    path = RESULTS / "offline_cartpole.md"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    notes = old[old.index("## Notes"):] if "## Notes" in old else ""
    path.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--behaviour-return", type=float, default=150.0)
    ap.add_argument("--transitions", type=int, default=20_000)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--updates", type=int, default=3_000)
    ap.add_argument("--agents", nargs="+", default=["dqn", "qensemble:min", "dqn@256", "qensemble:min@256"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--workdir", default=None, help="keep the runs and the dataset here (default: a temp dir)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name)
    commands = []
    t0 = time.perf_counter()

    # 1. a mediocre behaviour policy: online training stopped at the first evaluation >= behaviour_return
    behaviour = work / "behaviour"
    ov = ["agent=qensemble", "seed=100", "total_steps=50000", "eval.every=1000", "eval.episodes=10",
          f"eval.target_return={args.behaviour_return}", "checkpoint.every=0", *QUIET]
    commands.append("python -m rlq.train " + " ".join(ov) + f" run_dir={behaviour}")
    train(ov, behaviour)
    b_evals = read_metrics(behaviour, "eval")
    greedy = evaluate_checkpoint(str(behaviour), episodes=20, seed=0)

    # 2. the dataset
    from rlq.collect import main as collect
    data = work / "cartpole.safetensors"
    cargs = [f"checkpoint={behaviour}", f"steps={args.transitions}", f"noise={args.noise}", f"out={data}", "seed=0"]
    commands.append("python -m rlq.collect " + " ".join(cargs))
    assert collect(cargs) == 0
    from rlq.offline import dataset_meta
    meta = dataset_meta(data)

    # 3. offline agents
    rows = []
    for spec in args.agents:
        for seed in args.seeds:
            run_dir = work / f"off-{spec.replace(':', '-').replace('@', '-b')}-s{seed}"
            ov = [*agent_overrides(spec), f"offline.dataset={data}", f"seed={seed}", f"total_steps={args.updates}",
                  f"eval.every={max(args.updates // 10, 1)}", "eval.episodes=10", "checkpoint.every=0", *QUIET]
            if seed == args.seeds[0]:
                commands.append("python -m rlq.train " + " ".join(ov).replace(f"seed={seed}", "seed=<s>"))
            t = time.perf_counter()
            summary = train(ov, run_dir)
            evals = read_metrics(run_dir, "eval")
            rows.append({"agent": spec, "seed": seed, "final": evals[-1]["return_mean"],
                         "best": max(e["return_mean"] for e in evals),
                         "curve": [(e["step"], e["return_mean"]) for e in evals], "wall_s": time.perf_counter() - t,
                         "ups": summary["updates_per_s"]})
            print(f"{spec} seed {seed}: final {rows[-1]['final']:.1f}, best {rows[-1]['best']:.1f}, "
                  f"{rows[-1]['wall_s']:.0f}s", flush=True)
            write_report(args, commands, t0, b_evals, greedy, meta, rows)
    print(open(RESULTS / "offline_cartpole.md").read())
    tmp.cleanup()


if __name__ == "__main__":
    main()
