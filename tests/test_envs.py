"""Tests for rlq.envs: name resolution, episode statistics under NEXT_STEP autoreset, Atari protocol."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.spaces import Box, Discrete

from rlq.envs import EpisodeStats, atari_games, is_atari, make_env, resolve_env, short_names


# ---------------------------------------------------------------- names
@pytest.mark.parametrize(
    "name, kind, gid",
    [
        ("CartPole", "gym", "CartPole-v1"),
        ("Acrobot", "gym", "Acrobot-v1"),
        ("MountainCar", "gym", "MountainCar-v0"),
        ("LunarLander", "gym", "LunarLander-v3"),
        ("Pendulum", "gym", "Pendulum-v1"),
        ("HalfCheetah", "gym", "HalfCheetah-v5"),
        ("Walker2d", "gym", "Walker2d-v5"),
        ("cartpole", "gym", "CartPole-v1"),
        ("Pong", "atari", "pong"),
        ("Breakout", "atari", "breakout"),
        ("MsPacman", "atari", "ms_pacman"),
        ("SpaceInvaders", "atari", "space_invaders"),
        ("Seaquest", "atari", "seaquest"),
        ("ALE/Pong-v5", "atari", "pong"),
        ("PongNoFrameskip-v4", "atari", "pong"),
        ("MsPacmanNoFrameskip-v4", "atari", "ms_pacman"),
        ("MountainCarContinuous-v0", "gym", "MountainCarContinuous-v0"),
        ("CartPole-v0", "gym", "CartPole-v0"),
    ],
)
def test_resolve(name, kind, gid):
    r = resolve_env(name)
    assert (r.kind, r.id) == (kind, gid)
    assert is_atari(name) == (kind == "atari")


def test_short_names_lists():
    names = short_names()
    assert {"CartPole", "Acrobot", "MountainCar", "LunarLander", "Pendulum", "Pong", "Breakout"} <= set(names)
    games = atari_games()
    assert len(games) > 50 and "MsPacman" in games and "Combat" not in games
    assert all(resolve_env(g).kind == "atari" for g in games)


@pytest.mark.parametrize("bad", ["Foo", "Pongg", "NotAnEnv-v3"])
def test_unknown_name_one_line(bad):
    with pytest.raises(ValueError) as ei:
        make_env(bad)
    msg = str(ei.value)
    assert "\n" not in msg
    assert f"unknown env {bad!r}" in msg
    assert "registered Gymnasium id" in msg and "Atari games" in msg
    assert not is_atari(bad)


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="did you mean 'Pong'"):
        resolve_env("Pongg")
    with pytest.raises(ValueError, match="did you mean 'CartPole'"):
        resolve_env("CartPol")


def test_unknown_atari_option():
    with pytest.raises(TypeError, match="frame_skipp"):
        make_env("Pong", frame_skipp=4)


def test_mujoco_missing_or_works():
    import importlib.util

    if importlib.util.find_spec("mujoco") is None:
        with pytest.raises(ImportError, match=r'pip install "gymnasium\[mujoco\]"'):
            make_env("HalfCheetah")
    else:
        env = make_env("HalfCheetah")
        assert env.env_id == "HalfCheetah-v5"
        env.close()


# ---------------------------------------------------------------- gym passthrough
def test_gym_id_passthrough():
    env = make_env("MountainCarContinuous-v0", num_envs=2, seed=1)
    assert isinstance(env, EpisodeStats) and not env.is_atari
    assert env.env_id == "MountainCarContinuous-v0"
    assert isinstance(env.single_action_space, Box)
    obs, _ = env.reset(seed=1)
    assert obs.shape == (2, 2)
    obs, r, te, tr, info = env.step(env.action_space.sample())
    assert r.shape == (2,) and r.dtype == np.float32
    env.close()


def test_gym_kwargs_reach_make():
    env = make_env("CartPole-v1", num_envs=2, max_episode_steps=7)
    env.reset(seed=0)
    lengths = []
    for _ in range(20):
        _, _, _, _, info = env.step(np.zeros(2, dtype=np.int64))
        if "episode" in info:
            lengths += list(info["episode"]["l"][info["_episode"]])
    assert lengths and max(lengths) <= 7
    env.close()
    env = make_env("Pendulum", g=3.0)
    assert env.env.envs[0].unwrapped.g == 3.0
    env.close()


def test_terminal_on_life_loss_rejected_for_gym():
    with pytest.raises(ValueError, match="Atari"):
        make_env("CartPole", terminal_on_life_loss=True)


def test_unseeded_first_reset_uses_make_env_seed():
    a, b = make_env("CartPole", 2, seed=5), make_env("CartPole", 2, seed=5)
    oa, _ = a.reset()
    ob, _ = b.reset(seed=5)
    np.testing.assert_array_equal(oa, ob)
    assert a.action_space.sample().tolist() == b.action_space.sample().tolist()


# ---------------------------------------------------------------- episode statistics
def _brute_force_episodes(rewards, terminated, truncated):
    """Per-env list of (return, length) from raw step outputs under NEXT_STEP autoreset."""
    T, n = rewards.shape
    out = [[] for _ in range(n)]
    for i in range(n):
        ret, length, prev_done = 0.0, 0, False
        for t in range(T):
            if prev_done:  # reset step: its reward and the step itself are not part of any episode
                ret, length, prev_done = 0.0, 0, False
                continue
            ret += float(rewards[t, i])
            length += 1
            if terminated[t, i] or truncated[t, i]:
                out[i].append((ret, length, t))
                prev_done = True
    return out


def _reported_episodes(infos, n):
    out = [[] for _ in range(n)]
    for t, info in enumerate(infos):
        if "episode" in info:
            for i in np.flatnonzero(info["_episode"]):
                out[i].append((float(info["episode"]["r"][i]), int(info["episode"]["l"][i]), t))
    return out


def _run(env, steps, seed=0, actions=None):
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    R, TE, TR, infos = [], [], [], []
    for _ in range(steps):
        a = env.action_space.sample() if actions is None else actions(rng)
        _, r, te, tr, info = env.step(a)
        R.append(np.array(r)), TE.append(np.array(te)), TR.append(np.array(tr)), infos.append(info)
    return np.array(R), np.array(TE), np.array(TR), infos


def test_cartpole_episode_stats_match_brute_force():
    env = make_env("CartPole", num_envs=3, seed=0)
    R, TE, TR, infos = _run(env, 400)
    expect = _brute_force_episodes(R, TE, TR)
    got = _reported_episodes(infos, 3)
    assert sum(map(len, expect)) >= 20
    assert got == expect
    for info in infos:
        if "episode" in info:
            assert info["episode"]["r"].dtype == np.float64 and info["episode"]["l"].dtype == np.int64
            assert info["_episode"].dtype == bool and info["_episode"].shape == (3,)
    env.close()


def test_pendulum_truncated_episode_stats():
    # Non-integer rewards, and truncations at the same step in every sub-env.
    env = make_env("Pendulum", num_envs=2, seed=3, max_episode_steps=30)
    R, TE, TR, infos = _run(env, 100, seed=3)
    expect = _brute_force_episodes(R, TE, TR)
    got = _reported_episodes(infos, 2)
    assert [[(l, t) for _, l, t in e] for e in got] == [[(30, 29), (30, 60), (30, 91)]] * 2
    for e, g in zip(expect, got):
        np.testing.assert_allclose([x[0] for x in g], [x[0] for x in e], rtol=1e-5)
    env.close()


def test_same_step_autoreset_stats():
    import gymnasium
    from gymnasium.vector import AutoresetMode

    inner = gymnasium.make_vec("CartPole-v1", 2, vectorization_mode="sync",
                               vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP})
    env = EpisodeStats(inner)
    env.reset(seed=0)
    lengths, count = [], np.zeros(2, dtype=int)
    for _ in range(200):
        _, _, te, tr, info = env.step(env.action_space.sample())
        count += 1
        if "episode" in info:
            lengths += list(info["episode"]["l"][info["_episode"]])
            np.testing.assert_array_equal(info["episode"]["l"][info["_episode"]], count[info["_episode"]])
        count[te | tr] = 0
    assert lengths
    env.close()


@pytest.mark.filterwarnings("ignore:builtin type .* has no __module__:DeprecationWarning")
def test_lunar_lander():
    env = make_env("LunarLander", num_envs=2, seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (2, 8) and isinstance(env.single_action_space, Discrete)
    for _ in range(20):
        obs, r, te, tr, info = env.step(env.action_space.sample())
    assert obs.shape == (2, 8)
    env.close()


# ---------------------------------------------------------------- Atari
def test_pong_protocol():
    env = make_env("Pong", num_envs=2, seed=0, max_episode_steps=100)
    assert env.is_atari and env.env_id == "pong" and env.short_name == "Pong" and env.frame_stack == 4
    assert env.single_action_space == Discrete(6)
    assert env.single_observation_space.shape == (4, 84, 84)
    obs, info = env.reset(seed=0)
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    assert (obs[:, :3] == 0).all() and (obs[:, 3] > 0).any(axis=(1, 2)).all()  # zero-padded reset stack
    R, TE, TR, infos = [], [], [], []
    rng = np.random.default_rng(0)
    for t in range(205):
        obs, r, te, tr, info = env.step(rng.integers(0, 6, size=2))
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
        R.append(r), TE.append(te), TR.append(tr), infos.append(info)
        if t == 100:  # reset step after the truncation at t == 99: new episode, zero-padded stack
            assert (obs[:, :3] == 0).all()
    R = np.array(R)
    assert set(np.unique(R)) <= {-1.0, 0.0, 1.0} and R.dtype == np.float32
    got = _reported_episodes(infos, 2)
    assert got == _brute_force_episodes(R, np.array(TE), np.array(TR))
    for e in got:
        assert [(l, t) for _, l, t in e] == [(100, 99), (100, 200)]
    assert infos[99]["_episode"].tolist() == [True, True] and np.array(TR)[99].all()
    env.close()


def test_atari_options_reach_ale():
    env = make_env("PongNoFrameskip-v4", num_envs=1, frame_stack=2, full_action_space=True)
    assert env.single_observation_space.shape == (2, 84, 84)
    assert env.single_action_space == Discrete(18)
    assert env.options["sticky_actions"] == 0.0 and env.options["max_episode_steps"] == 27000
    env.close()


def test_breakout_life_loss():
    env = make_env("Breakout", num_envs=2, seed=0, terminal_on_life_loss=True)
    _, info = env.reset(seed=0)
    assert info["life_loss"].tolist() == [False, False]
    prev_lives = info["lives"].copy()
    prev_done = np.zeros(2, dtype=bool)
    rng = np.random.default_rng(0)
    losses = 0
    for _ in range(3000):
        _, r, te, tr, info = env.step(rng.integers(0, 4, size=2))
        lives = info["lives"]
        expected = (lives < prev_lives) & ~prev_done
        np.testing.assert_array_equal(info["life_loss"], expected)
        # a life loss with lives left does not end the episode
        assert not (info["life_loss"] & (lives > 0) & te).any()
        losses += int(info["life_loss"].sum())
        prev_lives, prev_done = lives.copy(), te | tr
        if losses >= 4:
            break
    assert losses >= 4
    env.close()
