"""``python -m rlq.evaluate checkpoint=<run_dir|file> [episodes=N] [seed=S] [epsilon=E] [num_envs=K]``

Plays ``episodes`` greedy evaluation episodes (protocol: ``rlq.evaluation``) with a trained agent and
prints each return, then mean ± std and the interquartile mean. ``epsilon`` defaults to the run's
``env.eval_epsilon``; any ``env.<key>=value`` overrides the run's env settings (e.g. ``env.num_envs``
is ignored, ``env.sticky_actions=0.25`` evaluates under sticky actions).
"""
from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

USAGE = "usage: python -m rlq.evaluate checkpoint=<run_dir|file> [episodes=10] [seed=0] [epsilon=E] [num_envs=K] [json=true]"
KEYS = {"checkpoint": str, "episodes": int, "seed": int, "epsilon": float, "num_envs": int, "json": bool}


def parse_args(argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``key=value`` arguments -> (options, env overrides). Raises ValueError with one line."""
    opts: dict[str, Any] = {"episodes": 10, "seed": 0, "epsilon": None, "num_envs": None, "json": False}
    env_over: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"argument {arg!r} is not key=value; {USAGE}")
        if key.startswith("env."):
            from omegaconf import OmegaConf  # parse YAML scalars the way the config does

            env_over[key[4:]] = OmegaConf.create({"v": value}).v
            continue
        if key not in KEYS:
            raise ValueError(f"unknown argument {key!r}: choose from {', '.join(KEYS)} or env.<key>")
        kind = KEYS[key]
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                opts[key] = value.lower() in ("true", "1")
            else:
                opts[key] = kind(float(value)) if kind is int else kind(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a{'n integer' if kind is int else ' ' + kind.__name__}") from None
    if "checkpoint" not in opts:
        raise ValueError(f"checkpoint=<run_dir|file> is required; {USAGE}")
    if opts["episodes"] < 1:
        raise ValueError(f"episodes={opts['episodes']} must be >= 1")
    if opts["num_envs"] is not None and opts["num_envs"] < 1:
        raise ValueError(f"num_envs={opts['num_envs']} must be >= 1")
    if opts["epsilon"] is not None and not 0.0 <= opts["epsilon"] <= 1.0:
        raise ValueError(f"epsilon={opts['epsilon']} must be in [0, 1]")
    return opts, env_over


def evaluate_checkpoint(checkpoint: str, episodes: int = 10, seed: int = 0, epsilon: float | None = None,
                        num_envs: int | None = None, env_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load an agent from a checkpoint/run dir and play greedy episodes; returns returns and summary."""
    from omegaconf import OmegaConf

    from rlq.checkpoint import load_agent, resolve_checkpoint
    from rlq.evaluation import iqm, run_episodes
    from rlq.trainer import make_env_from_cfg

    path = resolve_checkpoint(checkpoint)
    agent = load_agent(path)
    env_cfg = OmegaConf.create(OmegaConf.to_container(agent.config.env))
    for k, v in (env_overrides or {}).items():
        env_cfg[k] = v
    n = min(num_envs or int(agent.config.eval.num_envs), episodes)
    env = make_env_from_cfg(env_cfg, n, seed)
    try:
        eps = float(env_cfg.eval_epsilon) if epsilon is None else epsilon
        returns, lengths = run_episodes(lambda o: agent.act(o, explore=False), env, episodes, seed=seed, epsilon=eps)
    finally:
        env.close()
    return {"checkpoint": str(path), "env": str(env_cfg.name), "episodes": episodes, "epsilon": eps,
            "returns": returns.tolist(), "lengths": lengths.tolist(), "mean": float(returns.mean()),
            "std": float(returns.std()), "iqm": iqm(returns)}


def main(argv: list[str] | None = None) -> int:
    from rlq.checkpoint import CheckpointError

    try:
        opts, env_over = parse_args(list(sys.argv[1:] if argv is None else argv))
        res = evaluate_checkpoint(opts["checkpoint"], opts["episodes"], opts["seed"], opts["epsilon"],
                                  opts["num_envs"], env_over)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if opts["json"]:
        print(json.dumps(res))
        return 0
    print(f"{res['checkpoint']}  env {res['env']}  epsilon {res['epsilon']}")
    for i, (r, l) in enumerate(zip(res["returns"], res["lengths"])):
        print(f"  episode {i:3d}: return {r:10.2f}  length {l}")
    print(f"return {res['mean']:.2f} ± {res['std']:.2f} (mean ± std over {res['episodes']} episodes), "
          f"IQM {res['iqm']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
