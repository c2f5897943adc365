"""Atari through ale-py's native C++ vector env with the standard DQN preprocessing built in."""

from __future__ import annotations

from typing import Any

from gymnasium.vector import AutoresetMode, VectorEnv

__all__ = ["ATARI_DEFAULTS", "make_atari_vec"]

#: Keyword options of an Atari env and their defaults (see the package docstring for the protocol).
ATARI_DEFAULTS: dict[str, Any] = {
    "frame_skip": 4,
    "frame_stack": 4,
    "noop_max": 30,
    "sticky_actions": 0.0,
    "max_episode_steps": 27_000,
    "terminal_on_life_loss": False,
    "full_action_space": False,
    "num_threads": 0,
}


def atari_options(kw: dict[str, Any]) -> dict[str, Any]:
    """Defaults updated with ``kw``; unknown keys raise a TypeError naming the known ones."""
    unknown = sorted(set(kw) - set(ATARI_DEFAULTS))
    if unknown:
        raise TypeError(
            f"unknown Atari option(s) {', '.join(map(repr, unknown))}; known: {', '.join(ATARI_DEFAULTS)}"
        )
    opts = {**ATARI_DEFAULTS, **kw}
    if int(opts["frame_skip"]) < 1 or int(opts["frame_stack"]) < 1:
        raise ValueError("frame_skip and frame_stack must be >= 1")
    if not 0.0 <= float(opts["sticky_actions"]) <= 1.0:
        raise ValueError(f"sticky_actions must be a probability, got {opts['sticky_actions']}")
    if opts["max_episode_steps"] is not None and int(opts["max_episode_steps"]) < 1:
        raise ValueError(f"max_episode_steps must be >= 1 or None, got {opts['max_episode_steps']}")
    return opts


def make_atari_vec(rom: str, num_envs: int, opts: dict[str, Any]) -> VectorEnv:
    """Build ``ale_py.vector_env.AtariVectorEnv`` for ``rom`` (snake_case rom id) with resolved ``opts``."""
    from ale_py.vector_env import AtariVectorEnv

    frame_skip = int(opts["frame_skip"])
    max_steps = opts["max_episode_steps"]
    # ALE counts the cap in emulator frames (0 would truncate at once): None -> effectively no cap.
    max_frames = 2**31 - 1 if max_steps is None else min(int(max_steps) * frame_skip, 2**31 - 1)
    return AtariVectorEnv(
        rom,
        int(num_envs),
        num_threads=int(opts["num_threads"]),
        max_num_frames_per_episode=max_frames,
        repeat_action_probability=float(opts["sticky_actions"]),
        full_action_space=bool(opts["full_action_space"]),
        autoreset_mode=AutoresetMode.NEXT_STEP,
        img_height=84,
        img_width=84,
        grayscale=True,
        stack_num=int(opts["frame_stack"]),
        frameskip=frame_skip,
        maxpool=True,
        noop_max=int(opts["noop_max"]),
        episodic_life=False,
        life_loss_info=False,
        reward_clipping=False,
        use_fire_reset=True,
    )
