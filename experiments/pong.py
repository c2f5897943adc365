"""Pong to +18 with the fastest configuration found (``+experiment=pong_fast``): train (or resume) a run, then
write its wall time, steps and learning curves.

    python experiments/pong.py [--run-dir runs/pong_fast] [--seed 0] [extra rlq.train overrides ...]
    python experiments/pong.py --report-only --run-dir runs/pong_fast

The run stops at the first greedy evaluation (10 episodes, epsilon 0.001) whose mean return is >= 18
(``eval.target_return``), or at ``total_steps``. A stopped run (Ctrl-C, kill, time limit) resumes where it
stopped when the script is run again with the same ``--run-dir``. The report
(``experiments/results/pong_fast.{md,csv,png}``) has the wall time and agent steps to +18, the evaluation
curve, the training-episode returns, training speed, the machine, versions and the command; a hand-written
``## Reading`` section at the end of the .md survives regeneration.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from _launch import train_or_resume  # (experiments/ is on sys.path when a script runs)

RESULTS = Path(__file__).resolve().parent / "results"


def train(args: argparse.Namespace) -> int:
    return train_or_resume(args.run_dir, [f"+experiment={args.preset}", f"seed={args.seed}", "log.progress=false",
                                          *args.overrides])


def report(run_dir: str, command: str, out: str) -> str:
    import numpy as np
    import torch
    import yaml

    import rlq
    from rlq.logging import read_metrics

    run = Path(run_dir)
    recs = read_metrics(run)
    if not recs:
        raise SystemExit(f"no metrics in {run}")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    a = cfg["agent"]
    evals, train, episodes = read_metrics(run, "eval"), read_metrics(run, "train"), read_metrics(run, "episode")
    t0 = recs[0]["time"]
    # wall time while training: gaps between records longer than 10 minutes are stops between resumes
    times = np.array([r["time"] for r in recs])
    gaps = np.diff(times)
    paused = float(gaps[gaps > 600].sum()) if len(gaps) else 0.0

    def wall(t: float) -> float:
        return (t - t0 - float(gaps[(gaps > 600) & (times[1:] <= t)].sum())) / 3600

    solved = next((e for e in evals if e["return_mean"] >= 18), None)
    last = train[-1] if train else {}
    sps = [r["sps"] for r in train if r["step"] > int(a["learning_starts"]) + 20_000]
    ups = [r["updates_per_s"] for r in train if r["step"] > int(a["learning_starts"]) + 20_000]
    lines = [
        "# Pong to +18 on a 2-core CPU: `+experiment=pong_fast`",
        "",
        f"Command: `{command}`  ",
        f"Run directory: `{run}`  ",
        f"Machine: {_cpu()}; python {platform.python_version()}, torch {torch.__version__}, rlq {rlq.__version__}  ",
        f"Written: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Agent: {a['name']} (double={a['double']}, dueling={a['dueling']}, n_step={a['n_step']}), Nature CNN, "
        f"Adam lr {a['lr']}, batch {a['batch_size']}, replay {a['buffer_size']}, {cfg['env']['num_envs']} envs, "
        f"one update per {int(a['train_freq']) * int(cfg['env']['num_envs']) // int(a['gradient_steps'])} env steps, "
        f"target copy every {a['target_update_period']} updates, epsilon {a['eps_start']} -> {a['eps_end']} over "
        f"{a['eps_decay_steps']} steps, learning starts at {a['learning_starts']}; amp={a.get('amp', 'none')}, "
        f"overlap={cfg.get('overlap', False)}, threads={cfg['threads']}.",
        "",
        f"**Result: {'first eval >= +18 at %d agent steps (%.1f M frames) after %.2f h of wall time' % (solved['step'], solved['step'] * 4 / 1e6, wall(solved['time'])) if solved else 'eval >= +18 not reached yet'}.** "
        f"Agent steps reached: {last.get('step', 0)}; wall time {wall(recs[-1]['time']):.2f} h"
        + (f" (plus {paused / 3600:.2f} h stopped between resumes, not counted)" if paused else "") + ".  ",
        (f"Training speed after warm-up: median {np.median(sps):.0f} env steps/s, {np.median(ups):.1f} updates/s "
         f"(per log interval; evaluation time excluded)." if sps else ""),
        "",
        "| agent steps | wall (h) | eval return (mean ± std over episodes) | recent training return |",
        "|---|---|---|---|",
    ]
    for e in evals:
        recent = [x["episode_return"] for x in episodes if e["step"] - 50_000 < x["step"] <= e["step"]]
        lines.append(f"| {e['step']} | {wall(e['time']):.2f} | {e['return_mean']:.1f} ± {e['return_std']:.1f} | "
                     f"{np.mean(recent) if recent else float('nan'):.1f} |")
    lines += ["", f"Curves: `{Path(out).name}.png`; the evaluations as csv: `{Path(out).name}.csv`."]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    old = Path(out + ".md").read_text() if Path(out + ".md").exists() else ""
    if "\n## Reading" in old:  # the hand-written analysis survives a regenerated report
        text += old[old.index("\n## Reading"):]
    Path(out + ".md").write_text(text)
    Path(out + ".csv").write_text("step,wall_h,eval_return_mean,eval_return_std\n" + "".join(
        f"{e['step']},{wall(e['time']):.4f},{e['return_mean']},{e['return_std']}\n" for e in evals))
    _plot(evals, episodes, wall, out + ".png")
    return text


def _plot(evals, episodes, wall, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    if episodes:
        episodes = sorted(episodes, key=lambda x: x["step"])
        s = np.array([x["step"] for x in episodes])
        r = np.array([x["episode_return"] for x in episodes])
        k = max(1, min(20, len(r) // 5))
        ax[0].plot(s, r, ".", ms=2, alpha=0.3, color="gray", label="training episodes")
        if len(r) >= k:
            ax[0].plot(s[k - 1:], np.convolve(r, np.ones(k) / k, "valid"), color="gray", label=f"mean of {k}")
    if evals:
        es = [e["step"] for e in evals]
        ax[0].errorbar(es, [e["return_mean"] for e in evals], [e["return_std"] for e in evals], fmt="o-",
                       color="C0", ms=3, capsize=2, label="greedy eval")
        ax[1].plot([wall(e["time"]) for e in evals], [e["return_mean"] for e in evals], "o-", ms=3, color="C0")
    for a_ in ax:
        a_.axhline(18, ls="--", color="C3", lw=1)
        a_.set_ylabel("return")
        a_.set_ylim(-22, 22)
    ax[0].set_xlabel("agent steps")
    ax[1].set_xlabel("wall time (h)")
    ax[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Pong, +experiment=pong_fast")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/pong_fast")
    ap.add_argument("--preset", default="pong_fast", help="the configs/experiment/ preset to train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "pong_fast"), help="report path without extension")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra rlq.train overrides, e.g. agent.lr=2e-4")
    args = ap.parse_args()
    command = "python " + " ".join(["experiments/pong.py", *sys.argv[1:]])
    rc = 0 if args.report_only else train(args)
    print(report(args.run_dir, command, args.out))
    sys.exit(rc)


if __name__ == "__main__":
    main()
