"""``python -m rlq.collect checkpoint=<run dir|file> steps=N noise=X out=<file> [seed=0] [num_envs=1]``

Plays a trained (or partly trained) agent in its run's env and writes the transitions as an offline dataset
(``rlq/offline.py``: safetensors tensors plus a JSON header with the env, the spaces, the behaviour policy,
the noise and the returns of the behaviour episodes). Train from it with
``python -m rlq.train agent=<name> env=<env> offline.dataset=<file>``.

Behaviour policy: the agent's greedy action (``act(obs, explore=False)``: argmax Q, or the actor's mean
action) with ``noise``:

- discrete actions: epsilon-greedy, ``noise`` = epsilon (0: greedy, 1: uniformly random);
- continuous actions: Gaussian noise of standard deviation ``noise`` in units of half the action range
  (``a = clip(mean + noise * (high - low) / 2 * N(0, 1), low, high)``, as TD3's exploration noise).

``steps`` transitions are recorded (summed over ``num_envs`` envs; the reset steps of Gymnasium's NEXT_STEP
autoreset are not transitions and are skipped). Episode ends keep the true last observation as ``next_obs``,
with ``terminated`` and ``truncated`` kept apart so that offline targets bootstrap through time limits.
Prints a JSON summary (transitions, episodes, behaviour return mean) and exits 0; bad arguments print one
line and exit 2 with nothing written.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

USAGE = ("usage: python -m rlq.collect checkpoint=<run_dir|file> steps=N out=<file> [noise=X] [seed=0] "
         "[num_envs=1] [device=cpu]")
KEYS = {"checkpoint": str, "steps": int, "noise": float, "out": str, "seed": int, "num_envs": int, "device": str}


class CollectError(ValueError):
    """A bad argument (one-line message)."""


def parse_args(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"noise": 0.0, "seed": 0, "num_envs": 1, "device": "cpu"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise CollectError(f"argument {arg!r} is not key=value; {USAGE}")
        if key not in KEYS:
            raise CollectError(f"unknown argument {key!r}: choose from {', '.join(KEYS)}")
        try:
            opts[key] = int(float(value)) if KEYS[key] is int else KEYS[key](value)
        except ValueError:
            raise CollectError(f"{key}={value!r} is not a{'n integer' if KEYS[key] is int else ' number'}") from None
    for req in ("checkpoint", "steps", "out"):
        if req not in opts:
            raise CollectError(f"{req}= is required; {USAGE}")
    if opts["steps"] < 1:
        raise CollectError(f"steps={opts['steps']} must be >= 1")
    if opts["num_envs"] < 1:
        raise CollectError(f"num_envs={opts['num_envs']} must be >= 1")
    if not (opts["noise"] >= 0 and np.isfinite(opts["noise"])):
        raise CollectError(f"noise={opts['noise']} must be >= 0 (epsilon for discrete actions, Gaussian std otherwise)")
    return opts


def behaviour(agent, space, noise: float, rng: np.random.Generator):
    """The noisy greedy policy (module docstring): obs batch -> actions."""
    discrete = hasattr(space, "n")
    if discrete and noise > 1:
        raise CollectError(f"noise={noise}: for discrete actions noise is epsilon, in [0, 1]")
    low, high = (None, None) if discrete else (np.asarray(space.low, np.float32), np.asarray(space.high, np.float32))

    def act(obs: np.ndarray) -> np.ndarray:
        a = np.asarray(agent.act(obs, explore=False))
        if noise <= 0:
            return a
        if discrete:
            rand = rng.random(len(a)) < noise
            if rand.any():
                a = a.copy()
                a[rand] = rng.integers(space.n, size=int(rand.sum()))
            return a
        a = a + noise * (high - low) / 2 * rng.standard_normal(a.shape).astype(np.float32)
        return np.clip(a, low, high).astype(np.float32)
    return act


def collect(agent, steps: int, noise: float, seed: int = 0, num_envs: int = 1) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Play ``agent`` (from ``rlq.load_agent``) in its run's env; returns (tensors, meta) of the dataset."""
    from omegaconf import OmegaConf

    from rlq.checkpoint import space_to_dict
    from rlq.trainer import make_env_from_cfg

    env_cfg = agent.config.env
    env = make_env_from_cfg(env_cfg, num_envs, seed)
    space = env.single_action_space
    rng = np.random.default_rng(seed)
    act = behaviour(agent, space, noise, rng)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "action", "reward", "terminated", "truncated",
                                                         "next_obs", "life_loss")}
    returns: list[float] = []
    lengths: list[int] = []
    recorded = 0
    life_loss = False  # Atari envs report life losses (offline targets stop bootstrapping there, as online)
    try:
        obs, _ = env.reset(seed=seed)
        resetting = np.zeros(num_envs, bool)  # NEXT_STEP autoreset: this step only resets the env
        while recorded < steps:
            actions = act(obs)
            next_obs, reward, terminated, truncated, info = env.step(actions)
            keep = ~resetting
            life_loss = life_loss or "life_loss" in info
            if keep.any():
                for k, v in (("obs", obs), ("action", actions), ("reward", reward), ("terminated", terminated),
                             ("truncated", truncated), ("next_obs", next_obs),
                             ("life_loss", info.get("life_loss", np.zeros(num_envs, bool)))):
                    cols[k].append(np.asarray(v)[keep])
                recorded += int(keep.sum())
            if "_episode" in info:
                for i in np.flatnonzero(info["_episode"]):
                    returns.append(float(info["episode"]["r"][i]))
                    lengths.append(int(info["episode"]["l"][i]))
            resetting = np.asarray(terminated) | np.asarray(truncated)
            obs = next_obs
    finally:
        env.close()
    data = {k: np.concatenate(v)[:steps] for k, v in cols.items()}
    if not life_loss:
        del data["life_loss"]
    data["obs"] = data["obs"].astype(agent.observation_space.dtype)
    data["next_obs"] = data["next_obs"].astype(agent.observation_space.dtype)
    data["reward"] = data["reward"].astype(np.float32)
    data["terminated"] = data["terminated"].astype(bool)
    data["truncated"] = data["truncated"].astype(bool)
    data["action"] = data["action"].astype(np.int64 if hasattr(space, "n") else np.float32)
    data["episode_returns"] = np.asarray(returns, np.float32)
    spaces = {}
    for name, sp in (("observation", agent.observation_space), ("action", agent.action_space)):
        d = space_to_dict(sp)
        spaces[name] = {k: (_json_floats(v.tolist()) if hasattr(v, "tolist") else v) for k, v in d.items()}
    meta = {
        "env": OmegaConf.to_container(env_cfg, resolve=True),
        "spaces": spaces,
        "policy": {"agent": str(agent.config.agent.name), "checkpoint": str(getattr(agent, "source", "")),
                   "trained_step": int(getattr(agent, "trained_step", -1))},
        "noise": float(noise), "noise_kind": "epsilon" if hasattr(space, "n") else "gaussian_std_half_range",
        "seed": int(seed), "num_envs": int(num_envs), "transitions": int(len(data["reward"])),
        "episodes": len(returns), "return_mean": float(np.mean(returns)) if returns else None,
        "return_std": float(np.std(returns)) if returns else None,
        "length_mean": float(np.mean(lengths)) if lengths else None,
    }
    return data, meta


def _json_floats(x: Any) -> Any:
    """Nested lists of floats with non-finite values as the strings "inf", "-inf", "nan" (JSON has no inf)."""
    if isinstance(x, list):
        return [_json_floats(v) for v in x]
    return x if not isinstance(x, float) or np.isfinite(x) else str(x)


def main(argv: list[str] | None = None) -> int:
    import rlq
    from rlq.checkpoint import CheckpointError, load_agent, load_checkpoint, resolve_checkpoint
    from rlq.offline import save_dataset

    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        path = resolve_checkpoint(opts["checkpoint"])
        out = Path(opts["out"])
        if out.is_dir():
            raise CollectError(f"out={opts['out']} is a directory; give a file name (e.g. {out / 'data.safetensors'})")
        agent = load_agent(path, device=opts["device"])
        agent.source = str(path)
        agent.trained_step = int(load_checkpoint(path)["trainer"]["step"])
        data, meta = collect(agent, opts["steps"], opts["noise"], opts["seed"], opts["num_envs"])
        meta["rlq_version"] = rlq.__version__
        save_dataset(out, data, meta)
    except (CollectError, CheckpointError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "transitions": meta["transitions"], "episodes": meta["episodes"],
                      "return_mean": meta["return_mean"], "return_std": meta["return_std"],
                      "env": meta["env"]["name"], "policy": meta["policy"], "noise": meta["noise"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
