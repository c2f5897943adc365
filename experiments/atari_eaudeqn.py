"""EauDeQN on an Atari game (Nature CNN): train (or resume) one run, then write its sparsity and return curves.

    python experiments/atari_eaudeqn.py [--run-dir /work/runs_eau/pong_eaudeqn] [--steps 600000]
        [--dense-run DIR] [extra rlq.train overrides ...]
    python experiments/atari_eaudeqn.py --report-only [--run-dir ...] [--dense-run DIR]

The run is ``+experiment=pong_fast agent=eaudeqn agent.double=true`` (the Pong recipe of
``configs/experiment/pong_fast.yaml``: Double DQN targets, 3-step returns, 10 envs, one update of batch 32 per 10
env steps, bf16 autocast in the update, target copy = EauDeQN selection every 500 updates) with K = 5 online
networks, ``max_speed`` 0.01 and global magnitude pruning, on one torch thread, for ``--steps`` env steps, greedy
evaluation (10 episodes) every 50k (the report reads the run's own settings). A stopped run resumes when the
script is run again with the same ``--run-dir``. ``--dense-run``: a dense run of the same recipe (e.g. ``+experiment=pong_fast``) drawn on the
same axes. The report (``experiments/results/atari_eaudeqn.{md,png}``) has the curves (policy sparsity per layer
and overall, sparser selections, greedy evaluation and training-episode returns), the final checkpoint's
sparsity, speed, machine, versions and command.
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
        "+experiment=pong_fast", "agent=eaudeqn", "agent.double=true", "threads=1", f"total_steps={args.steps}",
        "eval.every=50000", "eval.target_return=null", "checkpoint.every=50000", "log.progress=false",
        *args.overrides])


def _episode_curve(recs: list[dict], window: int = 20) -> tuple[list[int], list[float]]:
    import numpy as np

    steps = [r["step"] for r in recs]
    rets = np.array([r["episode_return"] for r in recs], dtype=float)
    smooth = [float(rets[max(0, i - window + 1):i + 1].mean()) for i in range(len(rets))]
    return steps, smooth


def report(run_dir: str, dense_run: str | None, command: str) -> str:
    import numpy as np
    import torch
    import yaml

    from rlq.evaluate import policy_sparsity
    from rlq.checkpoint import load_agent
    from rlq.logging import read_metrics

    run = Path(run_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    a = cfg["agent"]
    train_recs, evals, episodes = read_metrics(run, "train"), read_metrics(run, "eval"), read_metrics(run, "episode")
    if not train_recs:
        raise SystemExit(f"no training records in {run}")
    agent = load_agent(run)
    sp = policy_sparsity(agent)
    layer_keys = [k for k in train_recs[-1] if k.startswith("sparsity/")]
    last = train_recs[-1]
    sps = [r["sps"] for r in train_recs[len(train_recs) // 10:]]
    dense = None
    if dense_run and (Path(dense_run) / "metrics.jsonl").exists():
        dense = {"evals": read_metrics(dense_run, "eval"), "episodes": read_metrics(dense_run, "episode")}
    lines = [f"# EauDeQN on {cfg['env']['name']} (Nature CNN): sparsity and return curves", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.machine()}, {cfg.get('threads')} torch thread(s), a 2-core machine shared with other "
             f"jobs; python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Recipe: `+experiment=pong_fast agent=eaudeqn agent.double=true` ({cfg['env']['num_envs']} envs, batch "
             f"{a['batch_size']}, one update per {a['train_freq'] * cfg['env']['num_envs']} env steps, n-step {a['n_step']}, "
             f"lr {a['lr']}, amp {a.get('amp')}, target copy/selection every {a['target_update_period']} updates), "
             f"K = {a['n_networks']}, max_speed {a['max_speed']}, prune_scope {a['prune_scope']}, reset_optimizer "
             f"{a['reset_optimizer']}.", "",
             f"Trained {last['step']} env steps ({int(last['updates'])} updates, {int(last.get('sparser_selections', 0))} of "
             f"{int(last['updates']) // int(a['target_update_period'])} selections went to a sparser network); median "
             f"speed {np.median(sps):.0f} env steps/s.", "",
             f"Final policy network (slot 0, the exported one): **{sp['overall']:.1%} sparse** ({sp['nonzero']} of "
             f"{sp['params']} weights nonzero); per layer: "
             + ", ".join(f"{k} {v:.1%}" for k, v in sp["layers"].items()) + ".", "",
             "| env steps | policy sparsity | " + " | ".join(k[9:] for k in layer_keys)
             + f" | greedy eval ({cfg['eval']['episodes']} ep) |"
             + (" dense run's eval |" if dense else ""),
             "|---|---|" + "---|" * len(layer_keys) + "---|" + ("---|" if dense else "")]
    by_step = {r["step"]: r for r in train_recs}
    dense_eval = {e["step"]: e["return_mean"] for e in dense["evals"]} if dense else {}
    for e in evals:
        r = by_step.get(e["step"]) or min(train_recs, key=lambda t: abs(t["step"] - e["step"]))
        row = (f"| {e['step']} | {r.get('sparsity', 0):.1%} | " + " | ".join(f"{r.get(k, 0):.1%}" for k in layer_keys)
               + f" | {e['return_mean']:.1f} |")
        if dense:
            row += f" {dense_eval.get(e['step'], float('nan')):.1f} |"
        lines.append(row)
    if plot(train_recs, evals, episodes, layer_keys, dense, RESULTS / "atari_eaudeqn.png", cfg["env"]["name"], command):
        lines += ["", "![curves](atari_eaudeqn.png)"]
    return "\n".join(lines) + "\n"


def plot(train_recs, evals, episodes, layer_keys, dense, path: Path, env: str, command: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train_recs]
    ax1.plot(steps, [100 * r.get("sparsity", 0) for r in train_recs], color="k", label="overall")
    for k in layer_keys:
        ax1.plot(steps, [100 * r.get(k, 0) for r in train_recs], alpha=0.6, label=k[9:])
    ax1.set(xlabel="env steps", ylabel="policy sparsity (%)", ylim=(0, 100), title="EauDeQN sparsity")
    ax1.legend(fontsize=7)
    if episodes:
        s, v = _episode_curve(episodes)
        ax2.plot(s, v, color="tab:blue", alpha=0.4, label="EauDeQN training episodes (20-ep mean)")
    if evals:
        ax2.plot([e["step"] for e in evals], [e["return_mean"] for e in evals], "o-", color="tab:blue",
                 label="EauDeQN greedy eval")
    if dense:
        if dense["episodes"]:
            s, v = _episode_curve(dense["episodes"])
            ax2.plot(s, v, color="tab:gray", alpha=0.4, label="dense training episodes")
        ax2.plot([e["step"] for e in dense["evals"]], [e["return_mean"] for e in dense["evals"]], "s-",
                 color="tab:gray", label="dense greedy eval")
        ax2.set_xlim(0, max(steps) * 1.05)
    ax2.set(xlabel="env steps", ylabel="return", title=f"{env} return")
    ax2.legend(fontsize=7)
    fig.suptitle(command, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="/work/runs_eau/pong_eaudeqn")
    ap.add_argument("--steps", type=int, default=600_000)
    ap.add_argument("--dense-run", default=None)
    ap.add_argument("--report-only", action="store_true")
    args, overrides = ap.parse_known_args()
    args.overrides = overrides
    command = " ".join(["python", "experiments/atari_eaudeqn.py", *sys.argv[1:]])
    if not args.report_only:
        rc = train(args)
        if rc != 0:
            raise SystemExit(rc)
    RESULTS.mkdir(exist_ok=True)
    text = report(args.run_dir, args.dense_run, command)
    (RESULTS / "atari_eaudeqn.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
