"""Score versus bits: fp32, post-training quantization (PTQ) and quantization-aware training (QAT) of the
same Double DQN policies, several seeds, IQM with 95% stratified-bootstrap CIs, greedy-action agreement.

    python experiments/qat_sweep.py --env CartPole     [--seeds 0 1 2 3 4] [--workdir DIR] [--analyse-only]
    python experiments/qat_sweep.py --env LunarLander  [--seeds 0 1 2 3 4] [--workdir DIR] [--analyse-only]
                                                       [--scratch w4a8] [--delayed w4a8 w2a8 [--delay 0.5]]
                                                       [--agent double_dqn|dueling_dqn]

Protocol (the same for every env; the recipes are in ``RECIPES``, chosen on dev seeds 100 and 101 only):

1. **fp32**: Double DQN trains for ``steps`` env steps; every ``eval_every`` steps a greedy evaluation plays
   ``eval_episodes`` *selection* episodes (the trainer's eval env, seeded ``seed + 10000``, the same
   episodes each time) and ``checkpoint.keep_best=true`` keeps the best one (SB3 EvalCallback / Dopamine
   practice). The fp32 policy is that best-evaluation checkpoint. 5000 replay-buffer observations are
   saved for calibration.
2. **PTQ**: that same fp32 policy, converted with ``quantize_`` (per-channel max weight scales) and
   calibrated on the saved replay observations (``minmax``, ``percentile`` 99.99, ``mse``); then with the two
   corrections of ``rlq.quant``, both from the same replay observations: ``bias_correct`` after minmax
   calibration, and ``equalize_`` (cross-layer scaling of the float network, alpha 0.5) before it.
3. **QAT** (W8A8: max weights, W4A8 / W2A8: LSQ weights; first and last layers 8-bit; EMA activation
   ranges): fine-tuning *from the fp32 policy* (the "start from a trained float network" form of
   ``quant.start_step``): the quantized network gets the fp32 weights (online and target), its activation
   ranges are initialised by PTQ calibration on the replay observations (then the EMA observers run), and it
   trains ``ft_steps`` more env steps with a fresh replay buffer, epsilon fixed at the recipe's final
   epsilon and learning rate ``ft_lr``, evaluated like fp32 (the initial PTQ-initialised network is the
   first candidate), keeping its best-evaluation checkpoint.
4. **fp32 fine-tune (control)**: step 3 without quantization, to show what the extra training alone does.
5. ``--scratch w4a8 [w2a8 ...]`` (optional): QAT from the first update, ``quant.start_step=0``, with the fp32
   recipe and budget (no fine-tuning recipe involved), selected and scored like fp32 (rows "QAT ... from
   scratch"; a seed scored before gets these rows added).
6. ``--delayed w4a8 [w2a8 ...]`` (optional): the same, with QAT switched on at ``--delay`` (a fraction of the
   budget, default 0.5; ``quant.start_step``): QuaRL's quantization delay, in one run with the fp32 recipe
   (lr, epsilon schedule). Only evaluations from the switch on are candidates for the selected checkpoint
   (the trainer's rule for ``checkpoint.keep_best`` with QAT). Rows "QAT ... delayed (50%)".

Scores: every selected policy plays ``test_episodes`` *test* episodes on other seeds (``50000 + seed``),
never used for selection or tuning; a run's score is their mean return; IQM over seeds with a 95%
stratified-bootstrap CI (5000 resamples). Agreement: fraction of greedy actions equal to the same seed's
fp32 policy on 10k held-out states visited by that fp32 policy (epsilon 0.1, seeds ``70000 + seed``).
"% of fp32" is the ratio of IQMs; "normalized" is ``(IQM - random) / (IQM_fp32 - random)`` with the
random policy's return on the test episodes (the raw ratio depends on where the env puts return 0).

Resumable: finished runs (``done.json``) and scored seeds (``analysis-s<seed>.json``, written right after a
seed's runs) are skipped. Runs are one at a time, 1 torch thread, so two
sweeps (or other engineers' jobs) can share a 2-core machine. Writes experiments/results/qat_<env>.md,
.json and .png.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
QAT = {"QAT W8A8": "w8a8", "QAT W4A8": "w4a8", "QAT W2A8": "w2a8"}
AGENT_NAMES = {"double_dqn": "Double DQN", "dueling_dqn": "Dueling Double DQN"}
TARGETS = {"PTQ W8A8 (minmax)": 0.99, "PTQ W8A8 (equalized + bias correction)": 0.99, "QAT W4A8": 0.97,
           "QAT W2A8": 0.90}
RECIPES = {  # env: fp32 training overrides, steps, evaluation and fine-tuning budget
    "CartPole": dict(
        overrides=["agent=double_dqn"], steps=50_000, eval_every=2_500, eval_episodes=10,
        # (dev seed 100: the fine-tunes' best evaluations came at 2k-6k of 20k steps, later ones were worse)
        ft_steps=10_000, ft_learning_starts=1_000, ft_lr=1e-4, ft_eval_every=2_000, test_episodes=30),
    "LunarLander": dict(  # RL Baselines3 Zoo's DQN LunarLander settings (lr 6.3e-4, batch 128, 1 update/step)
        overrides=["agent=double_dqn", "agent.lr=6.3e-4", "agent.batch_size=128", "agent.buffer_size=100000",
                   "agent.learning_starts=10000", "agent.train_freq=4", "agent.gradient_steps=4",
                   "agent.target_update_period=250", "agent.eps_end=0.1", "agent.eps_decay_steps=24000"],
        steps=100_000, eval_every=5_000, eval_episodes=10,
        ft_steps=20_000, ft_learning_starts=2_000, ft_lr=6.3e-5, ft_eval_every=2_500, test_episodes=30),
}
COMMON = ["checkpoint.every=0", "checkpoint.keep_best=true", "log.progress=false", "log.tensorboard=false",
          "threads=1", "eval.num_envs=5"]


def _cfg(env: str, overrides: list[str]):
    from rlq.train import _compose, build_config
    ov = [f"env={env}", *overrides]
    return build_config(_compose(ov), ov)


def targets(rows: dict) -> dict[str, float]:
    """The issue's targets (IQM ratio to fp32) of the rows present: ``TARGETS``, and the W4A8 / W2A8 ones for
    the from-scratch and delayed QAT rows too."""
    out = {k: t for k, t in TARGETS.items() if k in rows}
    for k in rows:
        for prefix in ("QAT W4A8 ", "QAT W2A8 "):
            if k.startswith(prefix):
                out[k] = TARGETS[prefix.strip()]
    return out


def extra_runs(args: argparse.Namespace) -> list[tuple[str, str, str, float]]:
    """(row name, run-directory prefix, quant preset, quant.start_step) of the ``--scratch`` and ``--delayed``
    runs."""
    out = [(f"QAT {q.upper()} from scratch", f"scratch-{q}", q, 0.0) for q in args.scratch]
    pct = round(100 * args.delay)
    return out + [(f"QAT {q.upper()} delayed ({pct}%)", f"delay{pct}-{q}", q, args.delay) for q in args.delayed]


def train_fp32(env: str, seed: int, work: Path, r: dict, quant: str = "none", start: float = 0.0,
               name: str = "fp32") -> str:
    """Step 1: fp32 Double DQN with best-evaluation checkpointing; saves calibration observations. With
    ``quant`` (``--scratch`` / ``--delayed``): the same run with QAT from ``quant.start_step=start``, in the
    run directory ``<name>-s<seed>``."""
    from rlq.trainer import Trainer
    run = work / f"{name}-s{seed}"
    if (run / "done.json").exists():
        return f"{name} seed {seed}: done before"
    shutil.rmtree(run, ignore_errors=True)  # an interrupted run starts over
    qat = [] if quant == "none" else [f"quant={quant}", f"quant.start_step={start}"]
    cfg = _cfg(env, [*r["overrides"], *COMMON, *qat, f"seed={seed}", f"total_steps={r['steps']}",
                     f"eval.every={r['eval_every']}", f"eval.episodes={r['eval_episodes']}", "eval.final=true"])
    t0 = time.time()
    tr = Trainer(cfg, run)
    try:
        tr.train()
        np.save(run / "calib_obs.npy", tr.buffer.sample(5000).obs.numpy())
    finally:
        tr.close()
    (run / "done.json").write_text(json.dumps({"wall_s": time.time() - t0, "best_eval": tr.best_eval}))
    return f"{name} seed {seed}: trained in {time.time() - t0:.0f}s, best selection eval {tr.best_eval:.1f}"


def fine_tune(env: str, seed: int, quant: str, work: Path, r: dict) -> str:
    """Steps 3/4: fine-tune the fp32 policy with (``quant`` != none) or without quantization."""
    from rlq.checkpoint import best_checkpoint_path, load_checkpoint
    from rlq.quant import calibrate, quant_layers
    from rlq.trainer import Trainer
    run = work / f"ft-{quant}-s{seed}"
    if (run / "done.json").exists():
        return f"fine-tune {quant} seed {seed}: done before"
    shutil.rmtree(run, ignore_errors=True)
    src = work / f"fp32-s{seed}"
    eps = next(float(o.split("=")[1]) for o in [*r["overrides"], "agent.eps_end=0.05"] if o.startswith("agent.eps_end="))
    cfg = _cfg(env, [*r["overrides"], *COMMON, f"quant={quant}", "quant.start_step=0", f"seed={seed}",
                     f"total_steps={r['ft_steps']}", f"agent.learning_starts={r['ft_learning_starts']}",
                     f"agent.lr={r['ft_lr']}", f"agent.eps_start={eps}", f"agent.eps_end={eps}",
                     f"eval.every={r['ft_eval_every']}", f"eval.episodes={r['eval_episodes']}", "eval.final=true"])
    t0 = time.time()
    tr = Trainer(cfg, run)
    try:
        agent = tr.agent
        state = load_checkpoint(best_checkpoint_path(src))["agent"]["online"]
        missing, unexpected = agent.online.load_state_dict(state, strict=False)
        assert not unexpected and all(k.split(".")[-2] in ("act", "wq") or k.endswith("_extra_state")
                                      for k in missing), (missing, unexpected)
        if quant != "none":  # PTQ initialisation of the activation ranges, then the EMA observers run on
            calibrate(agent.online, np.load(src / "calib_obs.npy"))
            for m in quant_layers(agent.online):
                if not m.act.on_grid:
                    m.act.frozen = False
        agent.target.load_state_dict(agent.online.state_dict())
        tr.evaluate()  # the starting network is the first candidate (saved as best.pt at step 0)
        tr.train()
    finally:
        tr.close()
    (run / "done.json").write_text(json.dumps({"wall_s": time.time() - t0, "best_eval": tr.best_eval}))
    return f"fine-tune {quant} seed {seed}: {time.time() - t0:.0f}s, best selection eval {tr.best_eval:.1f}"


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


def analyse(args: argparse.Namespace, r: dict) -> tuple[dict, float]:
    """Every seed's rows (cached per seed in ``analysis-s<seed>.json``, so a seed is scored once, right
    after its runs), and the random policy's mean test return."""
    rows: dict[str, dict[int, dict]] = {}
    random_returns = []
    for seed in args.seeds:
        seed_rows, random_return = analyse_seed(args, r, seed)
        for name, v in seed_rows.items():
            rows.setdefault(name, {})[seed] = v
        random_returns.append(random_return)
    return rows, float(np.mean(random_returns))


def analyse_seed(args: argparse.Namespace, r: dict, seed: int) -> tuple[dict, float]:
    cache = Path(args.workdir) / f"analysis-s{seed}.json"
    extra = [name for name, *_ in extra_runs(args)]
    if cache.exists():
        data = json.loads(cache.read_text())
        missing = [name for name in extra if name not in data["rows"]]
        if not missing:
            return data["rows"], data["random_return"]
        rows, _ = _analyse_seed(args, r, seed, only=missing)  # extra runs added to a scored seed
        data["rows"].update(rows)
    else:
        rows, random_return = _analyse_seed(args, r, seed)
        data = {"rows": rows, "random_return": random_return}
    cache.write_text(json.dumps(data))
    return data["rows"], data["random_return"]


def _analyse_seed(args: argparse.Namespace, r: dict, seed: int, only: list[str] | None = None) -> tuple[dict, float]:
    """Score every setting of one seed (``only``: just these rows, for runs added later)."""
    import torch

    from rlq.checkpoint import best_checkpoint_path, load_agent, load_checkpoint
    from rlq.evaluation import run_episodes
    from rlq.quant import QuantConfig, bias_correct, calibrate, equalize_, quantize_
    from rlq.trainer import make_env_from_cfg

    torch.set_num_threads(1)
    work = Path(args.workdir)
    rows: dict[str, dict] = {}
    n_test = r["test_episodes"]

    def test_return(act, env_cfg, seed):
        env = make_env_from_cfg(env_cfg, 10, 50_000 + seed)
        ret, _ = run_episodes(act, env, n_test, seed=50_000 + seed)
        env.close()
        return float(ret.mean())

    best = best_checkpoint_path(work / f"fp32-s{seed}")
    fp32 = load_agent(best)
    env_cfg = fp32.config.env
    n_act = fp32.action_space.n
    rng = np.random.default_rng(seed)
    states = heldout_states(fp32, env_cfg, 10_000, 70_000 + seed)
    ref_actions = fp32.act(states, explore=False)
    run_of = {name: prefix for name, prefix, *_ in extra_runs(args)}
    if only is not None:
        for name in only:
            ckpt = best_checkpoint_path(work / f"{run_of[name]}-s{seed}")
            agent = load_agent(ckpt)
            rows[name] = {"return": test_return(lambda o: agent.act(o, explore=False), env_cfg, seed),
                          "agreement": float((agent.act(states, explore=False) == ref_actions).mean()),
                          "selected_step": int(load_checkpoint(ckpt)["best_eval"]["step"])}
            print(f"  seed {seed} {name}: {rows[name]}", flush=True)
        return rows, math.nan
    random_return = test_return(lambda o: rng.integers(n_act, size=len(o)), env_cfg, seed)

    def record(name, agent, ckpt=None):
        rows[name] = {
            "return": test_return(lambda o: agent.act(o, explore=False), env_cfg, seed),
            "agreement": float((agent.act(states, explore=False) == ref_actions).mean())}
        if ckpt is not None:
            rows[name]["selected_step"] = int(load_checkpoint(ckpt)["best_eval"]["step"])
        print(f"  seed {seed} {name}: {rows[name]}", flush=True)

    record("fp32", fp32, best)
    calib = np.load(work / f"fp32-s{seed}" / "calib_obs.npy")
    for bits, methods in ((8, ("minmax", "percentile", "mse")), (4, ("minmax",))):
        for method in methods:
            agent = load_agent(best)
            quantize_(agent.online, QuantConfig(name=f"w{bits}a8", weight_bits=bits), torch.as_tensor(calib[:8]))
            calibrate(agent.online, calib, method=method)
            record(f"PTQ W{bits}A8 ({method})", agent)
    for eq in (False, True):  # the two PTQ corrections of rlq.quant (their docstrings)
        agent = load_agent(best)
        if eq:
            equalize_(agent.online, calib, alpha=0.5)
        quantize_(agent.online, QuantConfig(name="w8a8"), torch.as_tensor(calib[:8]))
        calibrate(agent.online, calib)
        bias_correct(agent.online, calib)
        record("PTQ W8A8 (equalized + bias correction)" if eq else "PTQ W8A8 (minmax + bias correction)", agent)
    for name, quant in QAT.items():
        ckpt = best_checkpoint_path(work / f"ft-{quant}-s{seed}")
        record(name, load_agent(ckpt), ckpt)
    ckpt = best_checkpoint_path(work / f"ft-none-s{seed}")
    record("fp32 fine-tune (control)", load_agent(ckpt), ckpt)
    for name, prefix, *_ in extra_runs(args):
        ckpt = best_checkpoint_path(work / f"{prefix}-s{seed}")
        record(name, load_agent(ckpt), ckpt)
    return rows, random_return


def report(rows: dict, random_return: float, args: argparse.Namespace, r: dict, command: str) -> str:
    import torch

    results = Path(args.results)
    from rlq.stats import interval_estimates

    scores = {k: np.array([[v[s]["return"]] for s in args.seeds]) for k, v in rows.items()}
    ci = interval_estimates(scores, reps=5000)
    base = ci["fp32"]["IQM"][0]
    wall = {}
    for name, run in [("fp32", "fp32"), *[(k, f"ft-{q}") for k, q in QAT.items()], ("fp32 fine-tune", "ft-none"),
                      *[(name, prefix) for name, prefix, *_ in extra_runs(args)]]:
        wall[name] = [json.loads((Path(args.workdir) / f"{run}-s{s}" / "done.json").read_text())["wall_s"]
                      for s in args.seeds]
    fp32_ov = " ".join(r["overrides"])
    lines = [
        f"# Score versus bits: {AGENT_NAMES[args.agent]} on {args.env} ({len(args.seeds)} seeds)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()}; python {platform.python_version()}, "
        f"torch {torch.__version__}; one run at a time, 1 torch thread  ",
        f"Written: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "Protocol (see the docstring of `experiments/qat_sweep.py`):",
        f"- fp32: `{fp32_ov}`, {r['steps']} env steps; greedy evaluation every {r['eval_every']} steps on "
        f"{r['eval_episodes']} selection episodes; the policy is the best-evaluation checkpoint "
        "(`checkpoint.keep_best=true`).",
        "- PTQ: that fp32 policy, per-channel max weight scales, activation ranges calibrated on 5000 replay "
        "observations of its run; \"bias correction\": then `rlq.quant.bias_correct` on the same observations "
        "(every channel's mean output set to the float network's); \"equalized\": `rlq.quant.equalize_` (alpha "
        "0.5) on the float network first.",
        f"- QAT: fine-tuning of that fp32 policy with quantization on from the start: {r['ft_steps']} env steps, "
        f"lr {r['ft_lr']}, fixed epsilon, fresh replay ({r['ft_learning_starts']} steps before updates), "
        "activation ranges initialised by PTQ calibration then EMA; W8A8 max weight scales, W4A8/W2A8 LSQ "
        f"weights; first and last layers 8-bit; evaluation every {r['ft_eval_every']} steps on the same "
        "selection episodes, best checkpoint kept (the PTQ-initialised start is the first candidate).",
        "- fp32 fine-tune (control): the same fine-tuning without quantization.",
        *([f"- From scratch / delayed: the fp32 recipe and budget with QAT switched on at the first update / at "
           f"{args.delay:.0%} of the budget (`quant.start_step`); selected like fp32, among evaluations of the "
           "quantized network only."] if args.scratch or args.delayed else []),
        f"- Score of a run: mean return of its selected policy over {r['test_episodes']} test episodes "
        "(other seeds than selection; never used for tuning). IQM over seeds, 95% stratified-bootstrap CI "
        "(5000 resamples). Agreement: greedy actions equal to the same seed's fp32 policy on 10k held-out "
        "states (mean over seeds). Normalized: (IQM - random) / (IQM_fp32 - random), "
        f"random policy {random_return:.1f}. Recipes chosen on dev seeds 100 and 101.",
        "",
        "| setting | IQM return [95% CI] | % of fp32 IQM | normalized | mean return | agreement with fp32 | "
        "per-seed returns |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, per_seed in rows.items():
        point, lo, hi = ci[name]["IQM"]
        rets = [per_seed[s]["return"] for s in args.seeds]
        agree = np.mean([per_seed[s]["agreement"] for s in args.seeds])
        norm = (point - random_return) / (base - random_return)
        lines.append(f"| {name} | {point:.1f} [{lo:.1f}, {hi:.1f}] | {100 * point / base:.1f}% | {100 * norm:.1f}% | "
                     f"{np.mean(rets):.1f} | {100 * agree:.2f}% | {', '.join(f'{x:.0f}' for x in rets)} |")
    lines += ["", "Targets (IQM ratio to fp32): " + "; ".join(
        f"{k} >= {100 * t:.0f}%: {100 * ci[k]['IQM'][0] / base:.1f}% "
        f"({'met' if ci[k]['IQM'][0] >= t * base else 'not met'})" for k, t in targets(rows).items())]
    sel = {k: [v[s].get("selected_step") for s in args.seeds] for k, v in rows.items()
           if "selected_step" in v[args.seeds[0]]}
    lines += ["", "Selected checkpoints (env step of the best selection evaluation, per seed): " + "; ".join(
        f"{k} {', '.join(str(x) for x in v)}" for k, v in sel.items())]
    lines += ["", "Training wall time per run (s, median; machine shared with other jobs): " + ", ".join(
        f"{k} {np.median(v):.0f}" for k, v in wall.items())]
    text = "\n".join(lines) + "\n"
    stem = f"qat_{args.env.lower()}" + ("" if args.agent == "double_dqn" else f"_{args.agent.split('_')[0]}")
    results.mkdir(parents=True, exist_ok=True)
    old = results / f"{stem}.md"
    if old.exists() and "## Reading" in old.read_text():  # keep the hand-written analysis below the tables
        text += "\n" + old.read_text()[old.read_text().index("## Reading"):]
    old.write_text(text)
    (results / f"{stem}.json").write_text(json.dumps({"command": command, "random_return": random_return,
                                                      "rows": rows}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = list(rows)
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
        for i, n in enumerate(names):
            p, lo, hi = ci[n]["IQM"]
            ax.errorbar(p, i, xerr=[[p - lo], [hi - p]], fmt="o", capsize=4, color="C0")
            ax.scatter([rows[n][s]["return"] for s in args.seeds], [i] * len(args.seeds), s=12, alpha=0.5, color="C1")
        ax.axvline(base, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel(f"{args.env} test return (IQM over {len(args.seeds)} seeds, 95% CI; dots: seeds)")
        ax.set_title(f"{AGENT_NAMES[args.agent]} on {args.env}: fp32 vs PTQ vs QAT")
        fig.tight_layout()
        fig.savefig(results / f"{stem}.png", dpi=120)
        text += f"\nPlot: experiments/results/{stem}.png\n"
    except ImportError:
        text += "\n(matplotlib not installed: no plot)\n"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="CartPole", choices=sorted(RECIPES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--agent", default="double_dqn", choices=["double_dqn", "dueling_dqn"],
                    help="the agent every run uses (the recipe's other overrides stay)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("--scratch", nargs="*", default=[], choices=list(QAT.values()),
                    help="also train (and score) QAT runs from the first update with the fp32 recipe")
    ap.add_argument("--delayed", nargs="*", default=[], choices=list(QAT.values()),
                    help="also train (and score) runs of the fp32 recipe with QAT switched on at --delay")
    ap.add_argument("--delay", type=float, default=0.5, help="fraction of the budget before QAT (--delayed)")
    ap.add_argument("--no-report", action="store_true", help="train only (e.g. dev seeds)")
    ap.add_argument("--results", default=str(RESULTS), help="where the report goes (dev seeds: elsewhere)")
    args = ap.parse_args()
    if not 0.0 < args.delay < 1.0:
        ap.error(f"--delay {args.delay}: must be a fraction of the budget in (0, 1)")
    r = dict(RECIPES[args.env])
    r["overrides"] = [f"agent={args.agent}" if o.startswith("agent=") else o for o in r["overrides"]]
    args.workdir = args.workdir or f"runs/qat_sweep_{args.env.lower()}"
    command = "python " + " ".join(["experiments/qat_sweep.py", *sys.argv[1:]])
    import torch
    torch.set_num_threads(1)
    work = Path(args.workdir)
    if not args.analyse_only:
        for seed in args.seeds:
            print(train_fp32(args.env, seed, work, r), flush=True)
            for quant in (*QAT.values(), "none"):
                print(fine_tune(args.env, seed, quant, work, r), flush=True)
            for _, prefix, quant, start in extra_runs(args):
                print(train_fp32(args.env, seed, work, r, quant, start, prefix), flush=True)
            if not args.no_report:  # score the seed now: a partial sweep has finished seeds to report
                analyse_seed(args, r, seed)
    if args.no_report:
        return
    rows, random_return = analyse(args, r)
    print(report(rows, random_return, args, r, command))


if __name__ == "__main__":
    main()
