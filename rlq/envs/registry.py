"""Short-name registry: maps ``CartPole``, ``Pong``, ``ALE/Pong-v5``, ``PongNoFrameskip-v4`` or any
registered Gymnasium id to what :func:`rlq.envs.make_env` builds."""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["ResolvedEnv", "resolve_env", "is_atari", "short_names", "atari_games"]

#: Short names of non-Atari environments -> Gymnasium ids.
CLASSIC_SHORT_NAMES: dict[str, str] = {
    "CartPole": "CartPole-v1",
    "Acrobot": "Acrobot-v1",
    "MountainCar": "MountainCar-v0",
    "MountainCarContinuous": "MountainCarContinuous-v0",
    "Pendulum": "Pendulum-v1",
    "LunarLander": "LunarLander-v3",
    "LunarLanderContinuous": "LunarLanderContinuous-v3",
}

#: MuJoCo short names (need ``pip install "gymnasium[mujoco]"``).
MUJOCO_SHORT_NAMES: dict[str, str] = {
    name: f"{name}-v5"
    for name in (
        "HalfCheetah", "Hopper", "Walker2d", "Ant", "Humanoid", "HumanoidStandup", "Swimmer",
        "Reacher", "Pusher", "InvertedPendulum", "InvertedDoublePendulum",
    )
}

GYM_SHORT_NAMES: dict[str, str] = {**CLASSIC_SHORT_NAMES, **MUJOCO_SHORT_NAMES}

# ROMs that ale-py ships but that have no single-player mode (ale_py.registration skips them too).
_MULTIPLAYER_ONLY_ROMS = frozenset({"combat", "joust", "maze_craze", "warlords"})

# `ALE/Pong-v5`, `Pong-v5`, `PongNoFrameskip-v4`, `PongDeterministic-v4` (RAM ids are not Atari here)
_ATARI_ID_RE = re.compile(r"^(?:ALE/)?(?P<game>[A-Za-z0-9_]+?)(?:NoFrameskip|Deterministic)?-v\d+$")


@dataclass(frozen=True)
class ResolvedEnv:
    """What a name resolves to.

    kind: ``"atari"`` (built with ale-py's native vector env) or ``"gym"`` (``gymnasium.make_vec``).
    id: the ALE rom id (``"pong"``, ``"ms_pacman"``) for Atari, the Gymnasium id otherwise.
    short_name: ``"Pong"``, ``"CartPole"``; the Gymnasium id itself when there is no short name.
    """

    kind: Literal["atari", "gym"]
    id: str
    short_name: str


def _camel(rom: str) -> str:
    # Same rule as ale_py.registration.rom_id_to_name: "ms_pacman" -> "MsPacman".
    return rom.title().replace("_", "")


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


@functools.cache
def _atari_table() -> dict[str, tuple[str, str]]:
    """normalised key -> (rom id, CamelCase name) for every single-player ROM bundled with ale-py."""
    try:
        from ale_py import roms
    except ImportError:  # pragma: no cover - ale-py is a core dependency
        return {}
    table: dict[str, tuple[str, str]] = {}
    for rom in roms.get_all_rom_ids():
        if rom in _MULTIPLAYER_ONLY_ROMS:
            continue
        table[_key(rom)] = (rom, _camel(rom))
    return table


@functools.cache
def _gym_short_table() -> dict[str, tuple[str, str]]:
    return {_key(short): (gid, short) for short, gid in GYM_SHORT_NAMES.items()}


def atari_games() -> list[str]:
    """CamelCase names of all Atari games available through ale-py (``Pong``, ``MsPacman``, ...)."""
    return sorted(camel for _, camel in _atari_table().values())


def short_names() -> list[str]:
    """Every short name :func:`make_env` accepts: classic control, Box2D, MuJoCo, then Atari games."""
    return list(GYM_SHORT_NAMES) + atari_games()


def _lookup_atari(name: str) -> ResolvedEnv | None:
    table = _atari_table()
    hit = table.get(_key(name))
    if hit is None:
        m = _ATARI_ID_RE.match(name)
        if m is not None:
            hit = table.get(_key(m.group("game")))
    if hit is None:
        return None
    return ResolvedEnv("atari", hit[0], hit[1])


def _unknown(name: str) -> ValueError:
    classic = "CartPole, Acrobot, MountainCar, LunarLander, Pendulum, HalfCheetah"
    msg = (
        f"unknown env {name!r}: use a short name ({classic}, ..., Pong, Breakout, ... "
        f"any of {len(_atari_table())} Atari games) or a registered Gymnasium id"
    )
    candidates = short_names()
    try:
        import gymnasium

        candidates += [k for k in gymnasium.registry if not k.startswith("ALE/")]
    except Exception:  # pragma: no cover
        pass
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    if close:
        msg += f" (did you mean {by_lower[close[0]]!r}?)"
    return ValueError(msg)


def resolve_env(name: str) -> ResolvedEnv:
    """Resolve a short name, an Atari id or a Gymnasium id; unknown names raise a one-line ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"unknown env {name!r}: expected a non-empty string")
    if name in GYM_SHORT_NAMES:
        return ResolvedEnv("gym", GYM_SHORT_NAMES[name], name)
    hit = _gym_short_table().get(_key(name)) if "-v" not in name else None
    if hit is not None:
        return ResolvedEnv("gym", hit[0], hit[1])
    atari = _lookup_atari(name)
    if atari is not None:
        return atari
    import gymnasium

    if name in gymnasium.registry:
        return ResolvedEnv("gym", name, _short_for_gym_id(name))
    try:
        spec = gymnasium.spec(name)
    except Exception:
        raise _unknown(name) from None
    return ResolvedEnv("gym", spec.id, _short_for_gym_id(spec.id))


def _short_for_gym_id(gym_id: str) -> str:
    for short, gid in GYM_SHORT_NAMES.items():
        if gid == gym_id:
            return short
    return gym_id


def is_atari(name: str) -> bool:
    """True when ``name`` resolves to an Atari game (``Pong``, ``ALE/Pong-v5``, ``PongNoFrameskip-v4``)."""
    try:
        return resolve_env(name).kind == "atari"
    except ValueError:
        return False
