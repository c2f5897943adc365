"""rlq: DQN-family deep RL in PyTorch, with policies deployable in low bit-widths.

Public API: ``make_env``, ``load_agent``, ``__version__``.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_agent", "make_env"]


def __getattr__(name: str):  # lazy: `import rlq` stays cheap and torch-free until needed
    if name == "load_agent":
        from rlq.checkpoint import load_agent

        return load_agent
    if name == "make_env":
        from rlq.envs import make_env

        return make_env
    raise AttributeError(f"module 'rlq' has no attribute {name!r}")
