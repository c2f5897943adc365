"""EauDeQN vs dense DQN on CartPole under the same budget: final policy sparsity and greedy return, 3 seeds.

    python experiments/cartpole_eaudeqn.py [--agents eaudeqn dqn] [--seeds 0 1 2] [--steps 100000]
        [--runs /work/runs_eau/cartpole] [--episodes 30] [agent.key=value ...]
    python experiments/cartpole_eaudeqn.py --report-only    # rebuild the report from the stored rows
    python experiments/cartpole_eaudeqn.py --reevaluate --agents eaudeqn  # re-evaluate stored runs' checkpoints

Each agent x seed trains ``--steps`` env steps with the agent's CartPole defaults (``configs/agent/<agent>.yaml``,
plus any ``agent.key=value`` given; the same ones for every agent that has the key), greedy evaluation (10
episodes) every 5k steps. Its final checkpoint is then evaluated with ``rlq.evaluate``'s protocol on
``--episodes`` greedy episodes (seeds 0..episodes-1, the same for every run): that is the run's "greedy return";
the policy network's sparsity is measured from the checkpoint's weights (zero fraction of the Linear weights).
Rows accumulate in experiments/results/cartpole_eaudeqn.json (an agent x seed re-run replaces its row), so runs
can be made one at a time; the report (.md) and the plot (.png: sparsity and evaluation return over training)
are rebuilt from every row each time (a ``## Notes`` section at the end of the .md is kept). Every run also keeps
``checkpoints/best.pt`` (the best in-training evaluation), re-evaluated the same way and reported beside the final
checkpoint. Each EauDeQN variant is compared with dense DQN of the same budget on the seeds both ran (paired): the
ratio of the means, with a 95% percentile-bootstrap interval over those seeds.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rlq.evaluate import evaluate_checkpoint
from rlq.logging import read_metrics
from rlq.train import _compose, build_config, run

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "cartpole_eaudeqn"


def run_one(agent: str, seed: int, steps: int, runs: Path, episodes: int, extra: list[str]) -> dict:
    overrides = [f"agent={agent}", f"seed={seed}", f"total_steps={steps}", "eval.every=5000", "eval.episodes=10",
                 "checkpoint.every=0", "checkpoint.keep_best=true", "log.progress=false", "log.tensorboard=false", "threads=1"]
    composed = _compose(overrides)
    mine = [o for o in extra if o.split("=", 1)[0].removeprefix("agent.") in composed.agent]
    overrides += mine
    cfg = build_config(_compose(overrides), overrides)
    tag = "".join(f"-{o.removeprefix('agent.')}" for o in mine)  # a variant's runs keep their own directories
    run_dir = runs / f"{agent}{tag}{'' if steps == 50_000 else f'-{steps // 1000}k'}-s{seed}"
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    summary = run(cfg, run_dir)  # rlq.train.run: the CLI's own build-train-close
    wall = summary["wall_s"]
    evals = read_metrics(run_dir, "eval")
    train = read_metrics(run_dir, "train")
    return {"agent": agent, "seed": seed, "steps": steps, "overrides": mine, "run_dir": str(run_dir),
            **evaluate_run(run_dir, episodes), "inrun_eval_policy": inrun_eval_policy(agent, run_dir),
            "last5_eval": float(np.mean([e["return_mean"] for e in evals[-5:]])),
            "eval_curve": [(e["step"], e["return_mean"]) for e in evals],
            "sparsity_curve": [(r["step"], r.get("sparsity", 0.0)) for r in train],
            "sparser_selections": train[-1].get("sparser_selections"), "wall_s": wall, "sps": summary["sps"]}


# EauDeQN's greedy acting (the in-training evaluations: eval curve, last-5, the choice of best.pt) used slot 0
# before commit 47e9a0b (2026-12-01 21:45:36 UTC) and the selected network (the target) since
POLICY_CHANGE = 1796161536.0


def inrun_eval_policy(agent: str, run_dir: Path) -> str:
    """What a run's in-training evaluations acted with, from when the run started."""
    if agent != "eaudeqn":
        return "online"
    first = read_metrics(run_dir)[0]["time"]
    return "slot 0" if first < POLICY_CHANGE else "selected network"


def evaluate_run(run_dir: Path, episodes: int) -> dict:
    """The final checkpoint and ``best.pt`` evaluated with ``rlq.evaluate``'s protocol (greedy, evaluation seeds
    0..episodes-1) by the current code, and the final policy's sparsity."""
    final = evaluate_checkpoint(str(run_dir), episodes=episodes, seed=0)
    best_path = run_dir / "checkpoints" / "best.pt"  # the best in-training evaluation's checkpoint (keep_best)
    best = evaluate_checkpoint(str(best_path), episodes=episodes, seed=0)
    best_step = int(torch.load(best_path, weights_only=True, map_location="cpu")["best_eval"]["step"])
    return {"greedy_return": final["mean"], "greedy_std": final["std"], "episodes": episodes,
            "sparsity": final["sparsity"]["overall"], "layers": final["sparsity"]["layers"],
            "nonzero": final["sparsity"]["nonzero"], "params": final["sparsity"]["params"],
            "best_return": best["mean"], "best_std": best["std"], "best_sparsity": best["sparsity"]["overall"],
            "best_step": best_step, "evaluated": time.strftime("%Y-%m-%d %H:%M")}


def variant(r: dict) -> str:
    """A row's agent with its overrides and budget (rows of the same variant are averaged together)."""
    return " ".join([r["agent"], *r["overrides"], f"({r['steps'] // 1000}k steps)"])


def report(rows: list[dict]) -> str:
    agents = sorted({variant(r) for r in rows}, key=lambda a: (not a.startswith("eaudeqn"), a))
    cmd = " ".join(["python", "experiments/cartpole_eaudeqn.py", *sys.argv[1:]])
    lines = [f"# EauDeQN vs dense DQN on CartPole-v1: policy sparsity and greedy return under the same budget", "",
             f"Last command: `{cmd}` (each row records its own settings)  ",
             f"Machine: {platform.machine()}, 1 torch thread, a 2-core machine shared with other jobs; python "
             f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M')}", "",
             "Greedy return: the final checkpoint evaluated on the episodes shown (greedy, evaluation seeds 0..n-1, "
             "`rlq.evaluate`). Sparsity: zero fraction of the policy network's Linear weights, measured from the "
             "checkpoint (biases not counted). last-5 eval: mean of the last five in-training evaluations (10 episodes "
             "each, every 5k steps). best checkpoint: `checkpoints/best.pt` (`checkpoint.keep_best=true`: the "
             "checkpoint of the best in-training evaluation), re-evaluated the same way, with its sparsity. "
             "in-run evals: what the in-training evaluations (last-5, the choice of best.pt) acted with; EauDeQN's "
             "greedy policy is the selected network since commit 47e9a0b, its earlier runs evaluated slot 0 "
             "while training (their final and best checkpoints are re-evaluated with the selected network).", "",
             "| agent | seed | steps | overrides | greedy return | last-5 eval | sparsity | nonzero / weights | "
             "sparser selections | best checkpoint: step, greedy return, sparsity | in-run evals | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in agents:
        for r in sorted((r for r in rows if variant(r) == a), key=lambda r: r["seed"]):
            lines.append(f"| {r['agent']} | {r['seed']} | {r['steps']} | {' '.join(r['overrides']) or '-'} | "
                         f"{r['greedy_return']:.1f} ± {r['greedy_std']:.1f} ({r['episodes']} ep) | {r['last5_eval']:.1f} | "
                         f"{r['sparsity']:.1%} | {r['nonzero']} / {r['params']} | {r['sparser_selections'] or '-'} | "
                         f"{r['best_step']}, {r['best_return']:.1f}, {r['best_sparsity']:.1%} | "
                         f"{r.get('inrun_eval_policy', '-')} | {r['wall_s']:.0f} |")
    lines += ["", "| agent | seeds | mean greedy return | mean last-5 eval | min / mean sparsity | best checkpoints: "
              "mean greedy return, min / mean sparsity |", "|---|---|---|---|---|---|"]
    means, last5, bests = {}, {}, {}
    for a in agents:
        rs = [r for r in rows if variant(r) == a]
        means[a] = float(np.mean([r["greedy_return"] for r in rs]))
        last5[a] = float(np.mean([r["last5_eval"] for r in rs]))
        bests[a] = float(np.mean([r.get("best_return", np.nan) for r in rs]))
        sp = [r["sparsity"] for r in rs]
        bsp = [r.get("best_sparsity", np.nan) for r in rs]
        lines.append(f"| {a} | {len(rs)} | {means[a]:.1f} | {last5[a]:.1f} | {min(sp):.1%} / {np.mean(sp):.1%} | "
                     f"{bests[a]:.1f}, {min(bsp):.1%} / {np.mean(bsp):.1%} |")
    for a in (a for a in agents if a.startswith("eaudeqn")):
        dqn = f"dqn {a[a.index('('):]}"  # dense DQN under the same budget
        mine = {r["seed"]: r for r in rows if variant(r) == a}
        ref = {r["seed"]: r for r in rows if variant(r) == dqn}
        seeds = sorted(set(mine) & set(ref))  # paired: the seeds both were run on
        later = [s for s in seeds if mine[s].get("inrun_eval_policy") == "selected network"]
        for subset, which in ((seeds, "on the"), (later if later != seeds else [], "runs started after 47e9a0b, on the")):
            if not subset:
                continue
            parts = []
            for key, what in (("greedy_return", "final greedy return"), ("last5_eval", "last-5 eval"),
                              ("best_return", "best checkpoint's greedy return")):
                x = np.array([mine[s][key] for s in subset])
                y = np.array([ref[s][key] for s in subset])
                low, high = ratio_ci(x, y)
                parts.append(f"{what} {x.mean() / max(y.mean(), 1e-9):.1%} [{low:.1%}, {high:.1%}]")
            lines += ["", f"{a} / {dqn}, {which} {len(subset)} seeds both ran ({', '.join(map(str, subset))}): "
                          + ", ".join(parts) + " (ratio of the means; 95% bootstrap CI over seeds, paired)."]
    return "\n".join(lines) + "\n"


def ratio_ci(x: np.ndarray, y: np.ndarray, reps: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``mean(x) / mean(y)``, resampling the seeds (pairs ``x[i], y[i]``)."""
    idx = np.random.default_rng(seed).integers(0, len(x), size=(reps, len(x)))
    ratios = x[idx].mean(1) / np.maximum(y[idx].mean(1), 1e-9)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = sorted({variant(r) for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.18 * len(names)))
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    for name in names:  # thin: each seed; thick: the mean over seeds (labelled once per variant)
        rs = [r for r in rows if variant(r) == name]
        c, label = colors[name], f"{name}, {len(rs)} seed{'s' * (len(rs) > 1)}"
        for key, ax, scale in (("eval_curve", ax1, 1.0), ("sparsity_curve", ax2, 100.0)):
            if key == "sparsity_curve" and rs[0]["agent"] != "eaudeqn":
                continue
            curves = [dict(r[key]) for r in rs]
            for cur in curves:
                ax.plot(list(cur), np.array(list(cur.values())) * scale, color=c, alpha=0.25, lw=0.7)
            steps = sorted(set.intersection(*(set(cur) for cur in curves)))
            ax.plot(steps, [np.mean([cur[t] for cur in curves]) * scale for t in steps], color=c, lw=2,
                    label=label)
    ax1.set(xlabel="env steps", ylabel="greedy eval return (10 episodes)", title="return (thick: mean over seeds)")
    ax2.set(xlabel="env steps", ylabel="policy sparsity (%)", title="EauDeQN sparsity", ylim=(0, 100))
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.suptitle("CartPole-v1: EauDeQN vs dense DQN (python experiments/cartpole_eaudeqn.py)", fontsize=9)
    fig.tight_layout(rect=(0, 0.03 * math.ceil(len(names) / 2) + 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    return True


def write_reports(rows: list[dict]) -> None:
    """The .md (keeping a hand-written ``## Notes`` section at its end) and the .png, from every stored row."""
    md = RESULTS / f"{NAME}.md"
    old = md.read_text(encoding="utf-8") if md.exists() else ""
    notes = old[old.index("## Notes"):] if "## Notes" in old else ""
    md.write_text(report(rows) + ("\n" + notes if notes else ""), encoding="utf-8")
    plot(rows, RESULTS / f"{NAME}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", nargs="+", default=["eaudeqn", "dqn"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--runs", type=Path, default=Path("/work/runs_eau/cartpole"))
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--report-only", action="store_true", help="rebuild the .md and .png from the stored rows")
    ap.add_argument("--reevaluate", action="store_true",
                    help="re-evaluate the stored rows of --agents (final and best checkpoints, --episodes) with the "
                         "current code, then rebuild the report; nothing is trained")
    args, extra = ap.parse_known_args()
    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / f"{NAME}.json"
    if args.report_only or args.reevaluate:
        with open(store, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rows = json.loads(store.read_text())
            if args.reevaluate:
                for r in rows:
                    if r["agent"] in args.agents:
                        r.update(evaluate_run(Path(r["run_dir"]), args.episodes),
                                 inrun_eval_policy=inrun_eval_policy(r["agent"], Path(r["run_dir"])))
                store.write_text(json.dumps(rows, indent=1))
            write_reports(rows)
        print(report(rows))
        return
    for agent in args.agents:
        for seed in args.seeds:
            r = run_one(agent, seed, args.steps, args.runs, args.episodes, extra)
            # Re-read the store under a lock just before merging: several invocations (one per seed, on
            # different cores) may finish at about the same time, and each must keep the others' rows.
            with open(store, "a") as lock:  # the store itself is the lock (created empty if missing)
                fcntl.flock(lock, fcntl.LOCK_EX)
                text = store.read_text()
                rows = json.loads(text) if text.strip() else []
                rows = [x for x in rows if (variant(x), x["seed"]) != (variant(r), seed)] + [r]  # a rerun replaces
                store.write_text(json.dumps(rows, indent=1))
                write_reports(rows)
            print(f"{agent} seed {seed}: greedy {r['greedy_return']:.1f}, sparsity {r['sparsity']:.1%}, "
                  f"{r['wall_s']:.0f}s", flush=True)
    print(report(rows))


if __name__ == "__main__":
    main()
