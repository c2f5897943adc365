"""Environments: one call, ``make_env(name, num_envs, seed, **kw)``, returns a Gymnasium ``VectorEnv``.

Names
-----
- Short names: ``CartPole`` (CartPole-v1), ``Acrobot`` (-v1), ``MountainCar`` (-v0), ``Pendulum`` (-v1),
  ``LunarLander`` (-v3, Box2D), MuJoCo ``HalfCheetah``/``Hopper``/``Walker2d``/``Ant``/``Humanoid`` (-v5;
  needs ``pip install "gymnasium[mujoco]"``). Matching is case-insensitive.
- Atari: any game bundled with ale-py in CamelCase (``Pong``, ``Breakout``, ``MsPacman``,
  ``SpaceInvaders``, ...; :func:`short_names` lists them), or a Gymnasium-style Atari id
  (``ALE/Pong-v5``, ``PongNoFrameskip-v4``). The id only selects the game: the protocol below comes
  from the keyword options, whatever the version suffix (so ``ALE/Pong-v5`` does *not* switch on
  sticky actions; pass ``sticky_actions=0.25``).
- Anything else registered with Gymnasium passes through ``gymnasium.make_vec(id, num_envs,
  vectorization_mode="sync")`` with NEXT_STEP autoreset; extra keywords go to the env constructor.
- An unknown name raises a one-line ``ValueError`` (with a close match when there is one).

Seeding: ``make_env`` does not reset. Callers should call ``env.reset(seed=seed)``; a first
``env.reset()`` without a seed uses the ``seed`` given to ``make_env``, so runs are deterministic
either way. Sub-env ``i`` is seeded with ``seed + i``. Action spaces are seeded with ``seed``.

Atari protocol
--------------
Built on ``ale_py.vector_env.AtariVectorEnv`` (native C++ vector env, threads, NEXT_STEP autoreset),
with the standard DQN preprocessing done in C++: ``frame_skip=4`` with max-pool over the last two
frames, 84x84 grayscale, a stack of ``frame_stack=4`` frames (observations ``(num_envs, 4, 84, 84)``
uint8; the stack after a reset is zero-padded ``[0, 0, 0, f0]``, which the replay's frame storage
relies on), up to ``noop_max=30`` no-op actions at reset, and FIRE at reset in games that need it.

- Sticky actions: ``sticky_actions=0.0`` (ALE ``repeat_action_probability``). 0.0 matches the
  Nature-DQN / CleanRL / SB3 ``NoFrameskip-v4`` protocol our baselines use; 0.25 is the protocol
  Machado et al. (2018) recommend (and Gymnasium's ``-v5`` default).
- Episode cap: ``max_episode_steps=27000`` agent steps = 108k emulator frames = 30 minutes of play
  (converted to ALE's frame count); a capped episode ends with ``truncated=True``. ``None`` = no cap.
- Rewards: raw game scores come out of the env (as float32); reward clipping to [-1, 1] is done by
  the trainer, for learning only. Logged episode returns (``info["episode"]["r"]``) are raw.
- Episodes: ``terminated`` is game over. ``terminal_on_life_loss=True`` does not end episodes: it
  adds ``info["life_loss"]`` (bool per sub-env) so the trainer can cut the bootstrap at a life loss
  (``terminated | life_loss``) while the game and the logged return go on.
- ``full_action_space=False`` (minimal action set), ``num_threads=0`` (ALE's default).
- Evaluation: the exploration epsilon for evaluation is set by the trainer's config (0.001 for Atari,
  following Dopamine / Machado et al.; 0 for classic control); nothing here depends on it.

Episode statistics
------------------
Every env ``make_env`` returns is wrapped in :class:`EpisodeStats`: each finished episode is reported
in that step's info as ``info["episode"] = {"r": float64 (num_envs,), "l": int64 (num_envs,)}`` with
``info["_episode"]`` a bool mask, correct under NEXT_STEP autoreset (the reset step after a done
counts neither reward nor length). The wrapper carries ``is_atari``, ``env_id``, ``short_name``,
``frame_stack``, ``seed`` and ``options`` as plain attributes.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import gymnasium
from gymnasium.vector import AutoresetMode

from rlq.envs.atari import ATARI_DEFAULTS, atari_options, make_atari_vec
from rlq.envs.registry import (
    GYM_SHORT_NAMES,
    MUJOCO_SHORT_NAMES,
    ResolvedEnv,
    atari_games,
    is_atari,
    resolve_env,
    short_names,
)
from rlq.envs.wrappers import EpisodeStats

__all__ = [
    "ATARI_DEFAULTS",
    "EpisodeStats",
    "GYM_SHORT_NAMES",
    "ResolvedEnv",
    "atari_games",
    "is_atari",
    "make_env",
    "resolve_env",
    "short_names",
]


def _check_mujoco(gym_id: str) -> None:
    entry = ""
    try:
        entry = str(gymnasium.spec(gym_id).entry_point)
    except Exception:
        pass
    if (gym_id in MUJOCO_SHORT_NAMES.values() or "gymnasium.envs.mujoco" in entry) and (
        importlib.util.find_spec("mujoco") is None
    ):
        raise ImportError(f'{gym_id} needs MuJoCo, which is not installed: pip install "gymnasium[mujoco]"')


def make_env(name: str, num_envs: int = 1, seed: int = 0, **kw: Any) -> EpisodeStats:
    """Build a vector env of ``num_envs`` copies of ``name`` (not reset; call ``env.reset(seed=seed)``).

    Args:
        name: a short name (``CartPole``, ``Pong``), an Atari id (``ALE/Pong-v5``,
            ``PongNoFrameskip-v4``) or any registered Gymnasium id.
        num_envs: number of sub-environments.
        seed: seeds the action spaces, and the first ``reset()`` when it is called without a seed.
        **kw: Atari options (``frame_skip=4, frame_stack=4, noop_max=30, sticky_actions=0.0,
            max_episode_steps=27000, terminal_on_life_loss=False, full_action_space=False,
            num_threads=0``); for other envs, keyword arguments of ``gymnasium.make``
            (env constructor kwargs, ``max_episode_steps``).

    Returns:
        a ``gymnasium.vector.VectorEnv`` (an :class:`EpisodeStats` wrapper) with NEXT_STEP autoreset.
    """
    if int(num_envs) < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    spec = resolve_env(name)
    if spec.kind == "atari":
        opts = atari_options(kw)
        inner = make_atari_vec(spec.id, int(num_envs), opts)
        env = EpisodeStats(
            inner,
            is_atari=True,
            env_id=spec.id,
            short_name=spec.short_name,
            seed=seed,
            track_life_loss=bool(opts["terminal_on_life_loss"]),
            frame_stack=int(opts["frame_stack"]),
            options=opts,
        )
    else:
        if kw.pop("terminal_on_life_loss", False):
            raise ValueError(f"terminal_on_life_loss applies to Atari games only, not {spec.id}")
        _check_mujoco(spec.id)
        inner = gymnasium.make_vec(
            spec.id,
            num_envs=int(num_envs),
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP},
            **kw,
        )
        env = EpisodeStats(
            inner, is_atari=False, env_id=spec.id, short_name=spec.short_name, seed=seed, options=kw
        )
    if seed is not None:
        env.action_space.seed(seed)
        env.single_action_space.seed(seed)
    return env
