"""Rainbow on Pong: train (or resume) a run and write its learning curve.

    python experiments/pong_rainbow.py --steps 1000000 [--run-dir runs/pong_rainbow] [--eval-every 50000]
    python experiments/pong_rainbow.py --report-only --run-dir runs/pong_rainbow

Trains ``agent=rainbow env=Pong`` (the paper's Atari settings, ale-py native vector env, frame-
deduplicated prioritized replay) with greedy evaluation (``eval.episodes`` episodes, epsilon 0.001)
every ``--eval-every`` agent steps. A stopped run (Ctrl-C, kill, time limit) resumes where it stopped
when the script is run again with the same ``--run-dir``. The curve (agent steps, wall-clock hours,
eval return) and the first step reaching eval >= +18 go to experiments/results/pong_rainbow.md/.csv,
with the machine, versions and the command.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from _launch import train_or_resume  # (experiments/ is on sys.path when a script runs)

RESULTS = Path(__file__).resolve().parent / "results"


def train(args: argparse.Namespace) -> int:
    return train_or_resume(args.run_dir, [
        "agent=rainbow", "env=Pong", f"env.num_envs={args.num_envs}", f"total_steps={args.steps}",
        f"eval.every={args.eval_every}", f"eval.episodes={args.eval_episodes}", f"checkpoint.every={args.eval_every}",
        f"seed={args.seed}", *args.overrides], resume=[f"total_steps={args.steps}"])


def report(run_dir: str, command: str) -> str:
    import torch

    import rlq
    from rlq.logging import read_metrics

    run = Path(run_dir)
    recs = read_metrics(run)
    if not recs:
        raise SystemExit(f"no metrics in {run}")
    t0 = recs[0]["time"]
    evals = read_metrics(run, "eval")
    train = read_metrics(run, "train")
    solved = next((e for e in evals if e["return_mean"] >= 18), None)
    last_train = train[-1] if train else {}
    lines = [
        "# Rainbow on Pong (ale-py native vector env), greedy evaluation with epsilon 0.001",
        "",
        f"Command: `{command}`  ",
        f"Run directory: `{run}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"python {platform.python_version()}, torch {torch.__version__}, rlq {rlq.__version__}  ",
        f"Written: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Agent steps reached: {last_train.get('step', 0)}; last training speed {last_train.get('sps', 0):.0f} "
        f"steps/s; wall time {(recs[-1]['time'] - t0) / 3600:.2f} h (includes stops between resumes).  ",
        f"First eval >= +18: {'step %d after %.2f h' % (solved['step'], (solved['time'] - t0) / 3600) if solved else 'not yet'}.",
        "",
        "| agent steps | wall (h) | eval return (mean ± std) |",
        "|---|---|---|",
    ]
    lines += [f"| {e['step']} | {(e['time'] - t0) / 3600:.2f} | {e['return_mean']:.1f} ± {e['return_std']:.1f} |"
              for e in evals]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pong_rainbow.md").write_text(text)
    (RESULTS / "pong_rainbow.csv").write_text("step,wall_h,eval_return_mean,eval_return_std\n" + "".join(
        f"{e['step']},{(e['time'] - t0) / 3600:.4f},{e['return_mean']},{e['return_std']}\n" for e in evals))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--run-dir", default="runs/pong_rainbow")
    ap.add_argument("--num-envs", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=50_000)
    ap.add_argument("--eval-episodes", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra rlq.train overrides, e.g. agent.lr=1e-4")
    args = ap.parse_args()
    command = "python " + " ".join(["experiments/pong_rainbow.py", *sys.argv[1:]])
    rc = 0 if args.report_only else train(args)
    print(report(args.run_dir, command))
    sys.exit(rc)


if __name__ == "__main__":
    main()
