"""Score versus bits: fp32, post-training quantization (PTQ) and quantization-aware training (QAT) of
the same agent on one environment, several seeds, with IQM and 95% stratified-bootstrap CIs.

    python experiments/qat_sweep.py [--env CartPole] [--agent dqn] [--seeds 0 1 2 3 4] [--steps 50000]
                                    [--start 0.5] [--jobs 2] [--workdir runs/qat_sweep]

Training phase (resumable: a finished run is skipped), one process per run with 1 torch thread:
``fp32`` and QAT ``w8a8`` / ``w4a8`` / ``w2a8`` (``quant.start_step=--start``: float training first,
then online and target networks quantized together). Each fp32 run also saves 5000 observations
sampled from its replay buffer for PTQ calibration.

Analysis phase: every final policy plays ``--episodes`` greedy episodes (the same evaluation seeds for
all); PTQ rows quantize each fp32 policy (W8A8 and W4A8, per-channel max weights) with ranges calibrated
on its replay observations (minmax and MSE); "agreement" is the fraction of greedy actions equal to the
fp32 policy of the same seed on 10k held-out states (visited by that fp32 policy, epsilon 0.1).
Writes experiments/results/qat_<env>.md / .json and a PNG plot (if matplotlib is installed).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
QAT = {"fp32": "none", "QAT W8A8": "w8a8", "QAT W4A8": "w4a8", "QAT W2A8": "w2a8"}


def train_one(job: tuple) -> str:
    name, quant, seed, args = job
    import torch

    from rlq.train import _compose, build_config
    from rlq.trainer import Trainer

    torch.set_num_threads(1)
    run = Path(args["workdir"]) / f"{quant}-s{seed}"
    if (run / "done.json").exists():
        return f"{name} seed {seed}: done before"
    ov = [f"agent={args['agent']}", f"env={args['env']}", f"quant={quant}", f"seed={seed}",
          f"total_steps={args['steps']}", f"quant.start_step={args['start']}", "eval.every=0", "eval.final=false",
          "checkpoint.every=0", "log.progress=false", "log.tensorboard=false", "threads=1", *args["overrides"]]
    cfg = build_config(_compose(ov), ov)
    t0 = time.time()
    tr = Trainer(cfg, run)
    try:
        tr.train()
        if quant == "none":
            batch = tr.buffer.sample(5000)
            np.save(run / "calib_obs.npy", batch.obs.numpy())
    finally:
        tr.close()
    (run / "done.json").write_text(json.dumps({"wall_s": time.time() - t0}))
    return f"{name} seed {seed}: trained in {time.time() - t0:.0f}s"


def heldout_states(agent, env_cfg, n: int, seed: int) -> np.ndarray:
    from rlq.trainer import make_env_from_cfg

    env = make_env_from_cfg(env_cfg, 8, seed)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    out = []
    while sum(len(o) for o in out) < n:
        out.append(obs.copy())
        act = agent.act(obs, explore=False)
        rand = rng.random(len(act)) < 0.1
        act[rand] = rng.integers(env.single_action_space.n, size=int(rand.sum()))
        obs, *_ = env.step(act)
    env.close()
    return np.concatenate(out)[:n]


def analyse(args: argparse.Namespace) -> dict:
    import torch

    from rlq.checkpoint import load_agent
    from rlq.evaluation import run_episodes
    from rlq.quant import QuantConfig, calibrate, quantize_
    from rlq.trainer import make_env_from_cfg

    torch.set_num_threads(2)
    work = Path(args.workdir)
    rows: dict[str, dict[int, dict]] = {}

    def evaluate(agent, env_cfg, seed):
        env = make_env_from_cfg(env_cfg, 10, 50_000 + seed)
        ret, _ = run_episodes(lambda o: agent.act(o, explore=False), env, args.episodes, seed=50_000 + seed)
        env.close()
        return float(ret.mean())

    for seed in args.seeds:
        fp32 = load_agent(work / f"none-s{seed}")
        env_cfg = fp32.config.env
        states = heldout_states(fp32, env_cfg, 10_000, 70_000 + seed)
        ref_actions = fp32.act(states, explore=False)

        def record(name, agent):
            rows.setdefault(name, {})[seed] = {
                "return": evaluate(agent, env_cfg, seed),
                "agreement": float((agent.act(states, explore=False) == ref_actions).mean())}
            print(f"  seed {seed} {name}: {rows[name][seed]}", flush=True)

        record("fp32", fp32)
        calib = np.load(work / f"none-s{seed}" / "calib_obs.npy")
        for bits in (8, 4):
            for method in ("minmax", "mse"):
                agent = load_agent(work / f"none-s{seed}")
                qc = QuantConfig(name=f"w{bits}a8", weight_bits=bits)
                quantize_(agent.online, qc, torch.as_tensor(calib[:8]))
                calibrate(agent.online, calib, method=method)
                record(f"PTQ W{bits}A8 ({method})", agent)
        for name, quant in QAT.items():
            if quant != "none":
                record(name, load_agent(work / f"{quant}-s{seed}"))
    return rows


def report(rows: dict, args: argparse.Namespace, command: str, wall: dict) -> str:
    import torch

    from rlq.stats import interval_estimates

    IQM_NAME = "IQM"

    fp32 = np.array([rows["fp32"][s]["return"] for s in args.seeds])
    scores = {k: np.array([[v[s]["return"]] for s in args.seeds]) for k, v in rows.items()}
    ci = interval_estimates(scores, reps=5000)
    base = ci["fp32"][IQM_NAME][0]
    lines = [
        f"# Score versus bits: {args.agent} on {args.env} ({len(args.seeds)} seeds, {args.steps} env steps)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()}; python {platform.python_version()}, "
        f"torch {torch.__version__}  ",
        f"Written: {time.strftime('%Y-%m-%d %H:%M')}. QAT starts at {args.start} of training "
        "(float before, online and target quantized together after). Return: mean of "
        f"{args.episodes} greedy episodes of the final policy; IQM over seeds with a 95% stratified-bootstrap "
        "CI (5000 resamples); agreement: greedy actions equal to the same seed's fp32 policy on 10k held-out "
        "states (mean over seeds). First and last layers are 8-bit in every setting; PTQ uses max-based "
        "per-channel weight scales.",
        "",
        "| setting | IQM return [95% CI] | % of fp32 IQM | mean return | agreement with fp32 | per-seed returns |",
        "|---|---|---|---|---|---|",
    ]
    for name, per_seed in rows.items():
        point, lo, hi = ci[name][IQM_NAME]
        rets = [per_seed[s]["return"] for s in args.seeds]
        agree = np.mean([per_seed[s]["agreement"] for s in args.seeds])
        lines.append(f"| {name} | {point:.1f} [{lo:.1f}, {hi:.1f}] | {100 * point / base:.1f}% | {np.mean(rets):.1f} | "
                     f"{100 * agree:.2f}% | {', '.join(f'{r:.0f}' for r in rets)} |")
    if wall:
        lines += ["", "Training wall time per run (s, median): " + ", ".join(
            f"{k} {np.median(v):.0f}" for k, v in wall.items())]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    stem = f"qat_{args.env.lower()}"
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = list(rows)
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1))
        for i, n in enumerate(names):
            p, lo, hi = ci[n][IQM_NAME]
            ax.errorbar(p, i, xerr=[[p - lo], [hi - p]], fmt="o", capsize=4)
            ax.scatter([rows[n][s]["return"] for s in args.seeds], [i] * len(args.seeds), s=10, alpha=0.4)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel(f"{args.env} return (IQM over seeds, 95% CI; dots: seeds)")
        fig.tight_layout()
        fig.savefig(RESULTS / f"{stem}.png", dpi=120)
        text += f"\nPlot: experiments/results/{stem}.png\n"
    except ImportError:
        text += "\n(matplotlib not installed: no plot)\n"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="CartPole")
    ap.add_argument("--agent", default="dqn")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=50_000)
    ap.add_argument("--start", type=float, default=0.5)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra rlq.train overrides")
    args = ap.parse_args()
    args.workdir = args.workdir or f"runs/qat_sweep_{args.env.lower()}"
    command = "python " + " ".join(["experiments/qat_sweep.py", *sys.argv[1:]])
    if not args.analyse_only:
        shared = {"agent": args.agent, "env": args.env, "steps": args.steps, "start": args.start,
                  "workdir": args.workdir, "overrides": args.overrides}
        jobs = [(name, quant, seed, shared) for seed in args.seeds for name, quant in QAT.items()]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for msg in pool.imap_unordered(train_one, jobs):
                print(msg, flush=True)
    wall = {}
    for name, quant in QAT.items():
        w = [json.loads((Path(args.workdir) / f"{quant}-s{s}" / "done.json").read_text())["wall_s"] for s in args.seeds]
        wall[name] = w
    rows = analyse(args)
    print(report(rows, args, command, wall))


if __name__ == "__main__":
    main()
