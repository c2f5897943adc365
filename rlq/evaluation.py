"""Greedy evaluation episodes (the protocol shared by the trainer and ``python -m rlq.evaluate``).

Protocol: the policy acts greedily except for a random action with probability ``epsilon``
(``env.eval_epsilon``: 0.001 for Atari as in Dopamine, 0 for classic control); Atari evaluation
episodes use the same no-op starts and episode cap as training (``env.max_episode_steps``); the raw,
unclipped return is reported. With several eval envs each env plays an equal share of the episodes, so
short episodes are not over-represented.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def run_episodes(act: Callable[[np.ndarray], np.ndarray], env, episodes: int, seed: int,
                 epsilon: float = 0.0, max_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Play ``episodes`` episodes on a vector env made by ``rlq.envs.make_env``.

    Returns (returns, lengths) in completion order per env. ``max_steps`` bounds the total vector steps
    as a safeguard against envs that never end (ValueError if reached)."""
    n = env.num_envs
    quota = np.array([episodes // n + (i < episodes % n) for i in range(n)])
    rng = np.random.default_rng(seed)
    returns: list[float] = []
    lengths: list[int] = []
    obs, _ = env.reset(seed=seed)
    steps = 0
    n_actions = getattr(env.single_action_space, "n", None)
    while quota.sum() > 0:
        actions = act(obs)
        if epsilon > 0 and n_actions is not None:
            rand = rng.random(n) < epsilon
            if rand.any():
                actions = actions.copy()
                actions[rand] = rng.integers(n_actions, size=int(rand.sum()))
        obs, _, _, _, info = env.step(actions)
        steps += 1
        if "_episode" in info:
            done = info["_episode"] & (quota > 0)
            for i in np.flatnonzero(done):
                returns.append(float(info["episode"]["r"][i]))
                lengths.append(int(info["episode"]["l"][i]))
                quota[i] -= 1
        if max_steps is not None and steps >= max_steps:
            raise ValueError(f"evaluation did not finish {episodes} episodes within {max_steps} steps")
    return np.asarray(returns), np.asarray(lengths)


def iqm(x: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% (scipy's trim_mean(x, 0.25) convention)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = len(x)
    if n == 0:
        return float("nan")
    cut = int(np.floor(0.25 * n))
    mid = x[cut: n - cut] if n - 2 * cut > 0 else x
    return float(mid.mean())
