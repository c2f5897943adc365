"""Aggregate training runs into tables and plots you can trust: runs are the replication unit, and every
aggregate carries a 95% stratified-bootstrap confidence interval (``rlq.stats``, after Agarwal et al.,
"Deep RL at the Edge of the Statistical Precipice", NeurIPS 2021).

    python experiments/aggregate.py <run dirs, sweep dirs or 'globs' ...> [--out DIR] [--metric eval]
                                    [--name-by agent|quant|<config key>[,<key>...]] [--reps 2000] [--title T]
                                    [--note TEXT]

    python experiments/aggregate.py multirun/2026-11-22_10-00-00                # every job of a sweep
    python experiments/aggregate.py 'runs/dqn-CartPole-*' 'runs/rainbow-CartPole-*' --out results/cp
    python experiments/aggregate.py multirun/<time> --name-by quant             # group by quant preset
    python experiments/aggregate.py multirun/<time> --metric eval.return_iqm    # another eval field

Inputs: a run directory (``config.yaml`` + ``metrics.jsonl``), a directory holding run directories (a
Hydra sweep directory, ``runs/``), or a quoted glob of either. Runs are grouped by algorithm: the agent
name, the quant preset (when not ``none``) and every config value that differs between runs of the same
agent, quant and env (``agent.lr=0.0005``); seeds and bookkeeping keys (``seed``, ``run_dir``,
``eval.*``, ``checkpoint.*``, ``log.*``, ``threads``, ``device``) never split groups. ``--name-by``
groups by the given config keys instead (``agent`` and ``quant`` stand for their ``name``). Each env is
a separate task, with its own table and plots.

The metric is ``<kind>[.<field>]`` of ``metrics.jsonl`` records: ``eval`` (= ``eval.return_mean``, the
greedy evaluation's mean return; the default), ``eval.return_iqm``, ``episode`` (=
``episode.episode_return``, training episodes), ``train.return_recent``. A run's final score is its
last ``eval`` record (the mean of its last 10 records for other kinds).

Writes to ``--out`` (default: ``aggregate/`` beside the runs' common parent):

- ``summary.md``: per env and group, runs, final IQM / mean / median with 95% CIs, best evaluation
  (mean over runs of each run's best), env steps and wall time; probability of improvement between
  groups (2+ groups); one row per run; the plots.
- ``summary.csv`` (one row per env and group) and ``runs.csv`` (one row per run).
- ``learning_curves.png``: the metric against env steps, each run linearly interpolated onto the steps
  all runs of the group reached, IQM across runs with a 95% CI band (the bootstrap resamples whole runs).
- ``final_scores.png``: interval estimates of the final IQM, mean and median per group.
- ``performance_profile.png``: the fraction of runs whose final score exceeds each threshold, with CIs.
- ``probability_of_improvement.png``: P(X > Y) with CIs for every pair of groups (2+ groups).

Plots need matplotlib (``pip install matplotlib``; the tables do not).
"""
from __future__ import annotations

import argparse
import csv
import glob as globlib
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from rlq import stats
from rlq.logging import read_metrics

# config keys that never tell algorithms apart (replicates, bookkeeping, the evaluation protocol's cadence)
IGNORED_KEYS = ("seed", "run_dir", "resume", "device", "threads", "eval.", "checkpoint.", "log.", "hydra.")
DEFAULT_FIELDS = {"eval": "return_mean", "episode": "episode_return", "train": "return_recent"}
MAX_CURVE_POINTS = 200
LAST_RECORDS = 10  # final score of a non-eval metric: the mean of the run's last records


class AggregateError(ValueError):
    """Bad input (no runs, unknown metric or key); the message is one line."""


@dataclass
class Run:
    """One run directory's config and metric."""

    path: Path
    config: dict[str, Any]           # flattened: dotted key -> value (lists as tuples)
    env: str
    steps: np.ndarray                # env steps of the metric's records
    values: np.ndarray               # the metric at those steps
    final: float                     # the run's final score
    best: float                      # the best value over the run
    last_step: int                   # the newest record's step (any kind)
    wall_s: float                    # from the run's start to its newest record
    label: str = ""


# -- loading ------------------------------------------------------------------------------------------------
def _is_run(p: Path) -> bool:
    return (p / "config.yaml").is_file() and (p / "metrics.jsonl").is_file()


def find_runs(specs: list[str]) -> list[Path]:
    """Run directories named by ``specs``: run directories, directories holding them, or globs."""
    found: list[Path] = []
    for spec in specs:
        paths = [Path(p) for p in sorted(globlib.glob(spec, recursive=True))] if any(c in spec for c in "*?[") \
            else [Path(spec)]
        if not paths or not any(p.exists() for p in paths):
            raise AggregateError(f"{spec!r} matches no file or directory")
        for p in paths:
            if _is_run(p):
                found.append(p)
            elif p.is_dir():
                found += [m.parent for m in p.rglob("metrics.jsonl") if _is_run(m.parent)]
    runs = sorted(set(found))
    if not runs:
        raise AggregateError(f"no run directories (config.yaml + metrics.jsonl) in {' '.join(specs)}")
    return runs


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A config as ``{dotted key: leaf value}``; lists become tuples (hashable)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(node, list):
        return {prefix[:-1]: tuple(node)}
    return {prefix[:-1]: node}


def parse_metric(metric: str) -> tuple[str, str]:
    kind, _, fld = metric.partition(".")
    if not fld:
        if kind not in DEFAULT_FIELDS:
            raise AggregateError(f"--metric {metric!r}: give <kind>.<field> (the defaults are "
                                 f"{', '.join(f'{k} = {k}.{v}' for k, v in DEFAULT_FIELDS.items())})")
        fld = DEFAULT_FIELDS[kind]
    return kind, fld


def load_run(path: Path, kind: str, fld: str) -> Run | None:
    """A run's config and metric; None (with a warning) when it has no record of the metric."""
    cfg = OmegaConf.load(path / "config.yaml")
    flat = flatten(OmegaConf.to_container(cfg, resolve=False))
    records = read_metrics(path)
    recs = [r for r in records if r.get("kind") == kind and r.get(fld) is not None]
    if not recs:
        print(f"warning: skipping {path}: no {kind!r} records with {fld!r} in metrics.jsonl", file=sys.stderr)
        return None
    by_step = {int(r["step"]): float(r[fld]) for r in recs}  # a resumed run re-logs steps: the newest counts
    steps = np.array(sorted(by_step), dtype=np.float64)
    values = np.array([by_step[s] for s in sorted(by_step)], dtype=np.float64)
    final = float(values[-1]) if kind == "eval" else float(values[-LAST_RECORDS:].mean())
    times = [r["time"] for r in records if "time" in r]
    start = min([min(times), (path / "config.yaml").stat().st_mtime]) if times else 0.0
    return Run(path=path, config=flat, env=str(flat.get("env.name", "?")), steps=steps, values=values, final=final,
               best=float(values.max()), last_step=int(max(r["step"] for r in records)),
               wall_s=float(max(times) - start) if times else math.nan)


# -- grouping -----------------------------------------------------------------------------------------------
def _ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS)


def _fmt_value(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def label_runs(runs: list[Run], name_by: list[str] | None = None) -> None:
    """Set each run's group label (see the module docstring)."""
    if name_by:
        for run in runs:
            parts = []
            for key in name_by:
                k = f"{key}.name" if f"{key}.name" in run.config and key not in run.config else key
                if k not in run.config:
                    raise AggregateError(f"--name-by {key!r}: no such config key in {run.path / 'config.yaml'}")
                v = _fmt_value(run.config[k])
                parts.append(v if k.endswith(".name") else f"{key}={v}")
            run.label = " ".join(parts)
        return
    base = {id(r): r.config.get("agent.name", "?") + ("" if r.config.get("quant.name", "none") == "none"
                                                       else f"+{r.config['quant.name']}") for r in runs}
    buckets: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        buckets.setdefault((base[id(r)], r.env), []).append(r)
    varying: set[str] = set()
    for members in buckets.values():
        keys = set().union(*(m.config for m in members))
        for k in keys:
            if _ignored(k) or k in ("agent.name", "quant.name", "env.name"):
                continue
            if len({repr(m.config.get(k)) for m in members}) > 1:
                varying.add(k)
    for r in runs:
        extra = " ".join(f"{k}={_fmt_value(r.config.get(k))}" for k in sorted(varying))
        r.label = base[id(r)] + (f" {extra}" if extra else "")


# -- statistics ---------------------------------------------------------------------------------------------
def common_steps(runs: list[Run]) -> np.ndarray:
    """Steps every run of a group reached: the union of their record steps within the overlap."""
    lo = max(r.steps[0] for r in runs)
    hi = min(r.steps[-1] for r in runs)
    if hi < lo:
        return np.empty(0)
    steps = np.unique(np.concatenate([r.steps for r in runs]))
    steps = steps[(steps >= lo) & (steps <= hi)]
    return np.linspace(lo, hi, MAX_CURVE_POINTS) if len(steps) > MAX_CURVE_POINTS else steps


def curves(runs: list[Run], reps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, IQM, low, high) of a group's learning curve, or None without a common step."""
    steps = common_steps(runs)
    if len(steps) == 0:
        return None
    y = np.stack([np.interp(steps, r.steps, r.values) for r in runs])  # (runs, points)
    point, low, high = stats.curve_interval_estimates({"g": y}, stats.iqm, reps=reps, seed=seed)["g"]
    return steps, point, low, high


FINAL_AGGREGATES = {"IQM": stats.iqm, "Mean": stats.mean, "Median": stats.pooled_median}


@dataclass
class TaskSummary:
    """Everything reported for one env."""

    env: str
    groups: dict[str, list[Run]]
    estimates: dict[str, dict[str, tuple[float, float, float]]]
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None]
    poi: list[tuple[str, str, tuple[float, float, float]]]
    profile_taus: np.ndarray
    profiles: dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]


def summarize(runs: list[Run], reps: int, seed: int) -> list[TaskSummary]:
    out = []
    for env in sorted({r.env for r in runs}):
        groups: dict[str, list[Run]] = {}
        for r in sorted((r for r in runs if r.env == env), key=lambda r: (r.label, str(r.path))):
            groups.setdefault(r.label, []).append(r)
        scores = {g: np.array([r.final for r in rs]) for g, rs in groups.items()}
        est = stats.interval_estimates(scores, FINAL_AGGREGATES, reps=reps, seed=seed)
        names = list(groups)
        poi = [(x, y, stats.probability_of_improvement(scores[x], scores[y], reps=reps, seed=seed))
               for i, x in enumerate(names) for y in names[i + 1:]]
        allv = np.concatenate(list(scores.values()))
        span = max(float(allv.max() - allv.min()), 1e-9)
        taus = np.linspace(float(allv.min()) - 0.02 * span, float(allv.max()) + 0.02 * span, 101)
        profiles = stats.performance_profile(scores, taus, reps=reps, seed=seed)
        out.append(TaskSummary(env, groups, est, {g: curves(rs, reps, seed) for g, rs in groups.items()}, poi,
                               taus, profiles))
    return out


# -- tables -------------------------------------------------------------------------------------------------
def _wall(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _steps(rs: list[Run]) -> str:
    lo, hi = min(r.last_step for r in rs), max(r.last_step for r in rs)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def write_tables(tasks: list[TaskSummary], out: Path, metric: str, reps: int, command: str, title: str,
                 plots: list[str], note: str | None = None) -> None:
    import rlq

    nruns = sum(len(rs) for t in tasks for rs in t.groups.values())
    written = (f"Written: {time.strftime('%Y-%m-%d %H:%M')}; rlq {rlq.__version__}; {nruns} runs, "
               f"{sum(len(t.groups) for t in tasks)} groups, {len(tasks)} env(s)  ")
    protocol = (f"Metric: `{metric}`; a run's final score is its last record"
                f"{'' if metric.startswith('eval') else f' (mean of the last {LAST_RECORDS})'}. Runs are the "
                f"replication unit: IQM, mean and median are over the runs' final scores, with 95% percentile "
                f"intervals from {reps} stratified-bootstrap resamples of the runs (`rlq.stats`). Best: the mean "
                f"over runs of each run's best value. Wall time: mean over runs, from start to last record.")
    lines = [f"# {title}", "", *([note, ""] if note else []), f"Command: `{command}`  ", written, protocol, ""]
    summary_rows, run_rows = [], []
    for t in tasks:
        header = ("| group | runs | final IQM [95% CI] | final mean [95% CI] | final median [95% CI] | best | "
                  "env steps | wall time |")
        lines += [f"## {t.env}", "", header, "|---|---|---|---|---|---|---|---|"]
        for g, rs in t.groups.items():
            e = t.estimates[g]
            best = float(np.mean([r.best for r in rs]))
            wall = float(np.mean([r.wall_s for r in rs]))
            lines.append(f"| {g} | {len(rs)} | {stats.format_interval(*e['IQM'])} | "
                         f"{stats.format_interval(*e['Mean'])} | {stats.format_interval(*e['Median'])} | "
                         f"{best:.2f} | {_steps(rs)} | {_wall(wall)} |")
            summary_rows.append({"env": t.env, "group": g, "runs": len(rs),
                                 **{f"{m.lower()}{suffix}": v for m, iv in e.items()
                                    for suffix, v in zip(("", "_low", "_high"), iv)},
                                 "best_mean": best, "steps_min": min(r.last_step for r in rs),
                                 "steps_max": max(r.last_step for r in rs), "wall_s_mean": wall})
            for r in rs:
                run_rows.append({"env": t.env, "group": g, "seed": r.config.get("seed"), "final": r.final,
                                 "best": r.best, "steps": r.last_step, "wall_s": r.wall_s, "run_dir": str(r.path)})
        if t.poi:
            intro = ("Probability of improvement P(X > Y): the chance that a run of X scores higher than a run of Y "
                     "(ties count 1/2), with its 95% CI:")
            lines += ["", intro, "", "| X | Y | P(X > Y) [95% CI] |", "|---|---|---|"]
            lines += [f"| {x} | {y} | {stats.format_interval(*p)} |" for x, y, p in t.poi]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""] if plots else []
    lines += ["## Runs", "", "| env | group | seed | final | best | env steps | wall time | run directory |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['env']} | {r['group']} | {r['seed']} | {r['final']:.2f} | {r['best']:.2f} | {r['steps']} | "
              f"{_wall(r['wall_s'])} | `{r['run_dir']}` |" for r in run_rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, rows in (("summary.csv", summary_rows), ("runs.csv", run_rows)):
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


# -- plots --------------------------------------------------------------------------------------------------
def write_plots(tasks: list[TaskSummary], out: Path, metric: str) -> list[str]:
    """The PNG files (empty when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed: tables only (pip install matplotlib)", file=sys.stderr)
        return []
    written: list[str] = []
    n = len(tasks)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of = {g: colors[i % len(colors)] for i, g in enumerate(sorted({g for t in tasks for g in t.groups}))}

    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for g, c in t.curves.items():
            if c is None:
                continue
            steps, point, low, high = c
            ax.plot(steps, point, color=color_of[g], label=f"{g} ({len(t.groups[g])} runs)")
            ax.fill_between(steps, low, high, color=color_of[g], alpha=0.2, linewidth=0)
        ax.set(title=t.env, xlabel="env steps", ylabel=f"{metric} (IQM over runs, 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "learning_curves.png"))

    fig, axes = plt.subplots(n, len(FINAL_AGGREGATES), figsize=(4 * len(FINAL_AGGREGATES), 0.6 + 0.5 *
                             max(len(t.groups) for t in tasks) * n + 0.8 * n), squeeze=False)
    for row, t in zip(axes, tasks):
        names = list(t.groups)
        for ax, metric_name in zip(row, FINAL_AGGREGATES):
            for y, g in enumerate(names):
                point, low, high = t.estimates[g][metric_name]
                ax.barh(y, high - low, left=low, height=0.6, color=color_of[g], alpha=0.5)
                ax.plot([point, point], [y - 0.3, y + 0.3], color="black", linewidth=1.5)
            ax.set_yticks(range(len(names)), names if metric_name == "IQM" else [""] * len(names), fontsize=8)
            ax.set_title(f"{t.env}: final {metric_name}" if n > 1 else f"final {metric_name}", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, out / "final_scores.png"))

    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for g, (profile, low, high) in t.profiles.items():
            ax.step(t.profile_taus, profile, where="post", color=color_of[g], label=g)
            if low is not None:
                ax.fill_between(t.profile_taus, low, high, step="post", color=color_of[g], alpha=0.2, linewidth=0)
        ax.set(title=t.env, xlabel=r"final score threshold $\tau$", ylabel=r"fraction of runs with score > $\tau$",
               ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "performance_profile.png"))

    with_poi = [t for t in tasks if t.poi]
    if with_poi:
        fig, axes = plt.subplots(1, len(with_poi), figsize=(6 * len(with_poi), 1.4 + 0.5 *
                                 max(len(t.poi) for t in with_poi)), squeeze=False)
        for ax, t in zip(axes[0], with_poi):
            for y, (x_name, y_name, (point, low, high)) in enumerate(t.poi):
                ax.barh(y, high - low, left=low, height=0.6, color=color_of[x_name], alpha=0.5)
                ax.plot([point, point], [y - 0.3, y + 0.3], color="black", linewidth=1.5)
            ax.axvline(0.5, color="gray", linestyle="--", linewidth=1)
            ax.set_yticks(range(len(t.poi)), [f"P({x} > {y})" for x, y, _ in t.poi], fontsize=8)
            ax.set(title=f"{t.env}: probability of improvement", xlim=(0, 1))
            ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out / "probability_of_improvement.png"))
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# -- entry point --------------------------------------------------------------------------------------------
def aggregate(specs: list[str], out: str | None = None, metric: str = "eval", name_by: list[str] | None = None,
              reps: int = 2000, seed: int = 0, title: str | None = None, command: str = "",
              note: str | None = None) -> Path:
    """Find, load, group and summarize runs; write the tables and plots; returns the output directory."""
    if reps < 1:
        raise AggregateError(f"--reps {reps} must be >= 1")
    kind, fld = parse_metric(metric)
    paths = find_runs(specs)
    runs = [r for r in (load_run(p, kind, fld) for p in paths) if r is not None]
    if not runs:
        raise AggregateError(f"none of the {len(paths)} runs has {kind!r} records with {fld!r}")
    label_runs(runs, name_by)
    tasks = summarize(runs, reps, seed)
    out_dir = Path(out) if out else Path(os.path.commonpath([str(p.parent.resolve()) for p in paths])) / "aggregate"
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(tasks, out_dir, f"{kind}.{fld}")
    write_tables(tasks, out_dir, f"{kind}.{fld}", reps, command, title or f"rlq runs: {kind}.{fld}", plots, note)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories, directories holding runs (sweeps), or quoted globs")
    ap.add_argument("--out", default=None, help="output directory (default: <common parent of the runs>/aggregate)")
    ap.add_argument("--metric", default="eval", help="<kind>[.<field>] of metrics.jsonl records (default: eval)")
    ap.add_argument("--name-by", default=None,
                    help="group by these comma-separated config keys (agent, quant, agent.lr, ...) instead")
    ap.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--title", default=None, help="title of summary.md")
    ap.add_argument("--note", default=None, help="a paragraph under the title (e.g. how the runs were made)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    name_by = [k.strip() for k in args.name_by.split(",") if k.strip()] if args.name_by else None
    shown = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(shown):  # the note is printed above the command: elide it here
        if a == "--note" and i + 1 < len(shown):
            shown[i + 1] = "..."
        elif a.startswith("--note="):
            shown[i] = "--note=..."
    command = "python experiments/aggregate.py " + " ".join(a if a == "..." else shlex.quote(a) for a in shown)
    try:
        out = aggregate(args.runs, args.out, args.metric, name_by, args.reps, args.seed, args.title, command,
                        args.note)
    except AggregateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "summary.md").read_text(encoding="utf-8"))
    print(f"written to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
