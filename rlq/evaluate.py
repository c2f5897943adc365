"""``python -m rlq.evaluate checkpoint=<run dir|checkpoint file|'glob'> | policy=<file> [key=value ...]``

What it plays:

- ``checkpoint=runs/dqn-CartPole-s0-...``: a run directory (its newest checkpoint) or a checkpoint file;
- ``checkpoint='runs/dqn-CartPole-*'``: every run directory (or checkpoint file) a glob matches (quote
  it), or a sweep directory (``multirun/<time>``: its job directories);
- ``policy=pong.rlqp [env=Pong]``: an exported low-bit policy file (``rlq.export``), run by the
  deployment runtime (``rlq.deploy.load_policy``); the env is ``env=`` or the file's ``meta.env``, with
  that env preset's protocol.

Each run plays ``episodes`` evaluation episodes with the evaluation protocol of ``rlq.evaluation``
(greedy with probability ``1 - epsilon``; ``epsilon``, no-op starts, sticky actions and the episode cap
come from the run's env config), all runs with the same seeds. It prints each episode's return and each
run's mean ± std and IQM; with several runs, the aggregate over runs: **runs are the replication
unit**, a run's score is its mean return, and IQM, mean, median (of the runs) and optimality gap get
95% stratified-bootstrap confidence intervals (``rlq.stats``), per agent and env. The optimality gap
is measured against ``target=`` or, by default, the human score (Atari) or the env's
``reward_threshold`` (CartPole 475, ...); without either it is left out.

Options: ``episodes=10 seed=0 epsilon=<env.eval_epsilon> num_envs=<the run's eval.num_envs; 5 for a policy
file> json=false reps=2000 target=<auto>``; ``env.<key>=value`` overrides the run's env settings (``env.sticky_actions=0.25``
evaluates under sticky actions); ``record_video=true`` writes each evaluated episode as an mp4 file to
``video_dir`` (default ``<run dir>/videos/``, beside a policy file for ``policy=``), at most
``video_episodes`` of them per run. ``json=true`` prints one JSON object: a single run's result, or
``{"runs": [...], "aggregate": {...}}``.

For a checkpoint, the policy network's sparsity (the zero fraction of each Linear/Conv2d weight matrix and
overall, biases not counted) is printed when it is nonzero (EauDeQN's pruned networks) and is always in the
JSON result (``"sparsity"``).
"""
from __future__ import annotations

import functools
import glob as globlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium.vector import VectorWrapper

USAGE = ("usage: python -m rlq.evaluate checkpoint=<run_dir|file|'glob'> | policy=<file> [env=<name>] [episodes=10] "
         "[seed=0] [epsilon=E] [num_envs=K] [json=true] [record_video=true] [video_dir=DIR] [video_episodes=N] "
         "[reps=2000] [target=T] [env.<key>=value]")
KEYS = {"checkpoint": str, "policy": str, "env": str, "episodes": int, "seed": int, "epsilon": float,
        "num_envs": int, "json": bool, "record_video": bool, "video_dir": str, "video_episodes": int, "reps": int,
        "target": float}


def parse_args(argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``key=value`` arguments -> (options, env overrides). Raises ValueError with one line."""
    opts: dict[str, Any] = {"episodes": 10, "seed": 0, "epsilon": None, "num_envs": None, "json": False,
                            "policy": None, "env": None, "record_video": False, "video_dir": None,
                            "video_episodes": None, "reps": 2000, "target": None}
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
    if ("checkpoint" in opts) == (opts["policy"] is not None):
        raise ValueError(f"give one of checkpoint=<run_dir|file|'glob'> or policy=<file>; {USAGE}")
    if opts["env"] is not None and opts["policy"] is None:
        raise ValueError("env=<name> selects the env of a policy file; a checkpoint plays its run's env "
                         "(change its settings with env.<key>=value)")
    if opts["video_episodes"] is not None and opts["video_episodes"] < 1:
        raise ValueError(f"video_episodes={opts['video_episodes']} must be >= 1")
    if opts["reps"] < 1:
        raise ValueError(f"reps={opts['reps']} must be >= 1")
    if opts["episodes"] < 1:
        raise ValueError(f"episodes={opts['episodes']} must be >= 1")
    if opts["num_envs"] is not None and opts["num_envs"] < 1:
        raise ValueError(f"num_envs={opts['num_envs']} must be >= 1")
    if opts["epsilon"] is not None and not 0.0 <= opts["epsilon"] <= 1.0:
        raise ValueError(f"epsilon={opts['epsilon']} must be in [0, 1]")
    return opts, env_over


# -- video recording ---------------------------------------------------------------------------------------
@dataclass
class VideoOptions:
    """Record evaluation episodes as mp4 files: ``<directory>/<prefix>-ep<k>-return<R>.mp4``, ``k`` in the
    order the evaluation counts the episodes; at most ``max_videos`` (None: every evaluated episode)."""

    directory: Path
    prefix: str = "episode"
    max_videos: int | None = None


class _Desync(RuntimeError):
    """The twin env that renders Atari screens no longer plays the evaluated episodes."""


class _RenderFrames:
    """Frames of a Gymnasium vector env made with ``render_mode="rgb_array"`` (classic control, MuJoCo)."""

    def __init__(self, env):
        self.env = env
        self.fps = float(env.metadata.get("render_fps") or 30)

    def reset(self, seed: int | None) -> list[np.ndarray]:
        return list(self.env.render())

    def step(self, actions: np.ndarray, rewards: np.ndarray, dones: np.ndarray) -> list[np.ndarray]:
        return list(self.env.render())

    def close(self) -> None:
        pass


class _AtariScreens:
    """Full-size color screens for an Atari vector env made by ``rlq.envs.make_env``.

    ale-py's native vector env has no ``render()``, and its observations are the agent's 84x84
    grayscale stacks. So a twin ``AtariVectorEnv`` with the same ROM, options and seeds, but 210x160 RGB
    observations (max-pooled over the last two frames of each frame skip, like the agent's), is stepped
    with the same actions: the emulator is deterministic, so it plays the same episodes. Its rewards and
    episode ends are compared with the evaluated env's at every step (``_Desync`` on a difference)."""

    def __init__(self, env):
        from ale_py.vector_env import AtariVectorEnv
        from gymnasium.vector import AutoresetMode

        o = env.options
        skip, cap = int(o["frame_skip"]), o["max_episode_steps"]
        max_frames = 2**31 - 1 if cap is None else min(int(cap) * skip, 2**31 - 1)  # as rlq.envs.atari
        self.twin = AtariVectorEnv(
            env.env_id, env.num_envs, num_threads=int(o["num_threads"]), max_num_frames_per_episode=max_frames,
            repeat_action_probability=float(o["sticky_actions"]), full_action_space=bool(o["full_action_space"]),
            autoreset_mode=AutoresetMode.NEXT_STEP, img_height=210, img_width=160, grayscale=False, stack_num=1,
            frameskip=skip, maxpool=True, noop_max=int(o["noop_max"]), episodic_life=False, life_loss_info=False,
            reward_clipping=False, use_fire_reset=True)
        self.fps = 60.0 / skip

    def reset(self, seed: int | None) -> list[np.ndarray]:
        obs, _ = self.twin.reset(seed=seed)
        return list(obs[:, -1])

    def step(self, actions: np.ndarray, rewards: np.ndarray, dones: np.ndarray) -> list[np.ndarray]:
        obs, r, terminated, truncated, _ = self.twin.step(np.asarray(actions))
        if not (np.array_equal(np.asarray(r, dtype=np.float32), np.asarray(rewards, dtype=np.float32))
                and np.array_equal(terminated | truncated, dones)):
            raise _Desync("the Atari screen recorder lost sync with the evaluated env")
        return list(obs[:, -1])

    def close(self) -> None:
        self.twin.close()


class VideoRecorder(VectorWrapper):
    """Write the episodes an evaluation counts (``rlq.evaluation.run_episodes``: each sub-env plays an
    equal share) as mp4 files, streaming frames to OpenCV writers (no episode is held in memory).

    Wraps an env made by ``rlq.envs.make_env`` (so ``info["episode"]`` reports finished episodes under
    next-step autoreset); the finished paths are in ``videos``."""

    def __init__(self, env, source: _RenderFrames | _AtariScreens, options: VideoOptions, episodes: int):
        super().__init__(env)
        n = env.num_envs
        self.source, self.options, self.fps = source, options, source.fps
        self.quota = np.array([episodes // n + (i < episodes % n) for i in range(n)])  # as run_episodes
        self.counted = np.zeros(n, dtype=np.int64)
        self.prev_done = np.zeros(n, dtype=bool)
        self.writers: list[Any] = [None] * n
        self.recording = np.zeros(n, dtype=bool)
        self.finished = 0
        self.videos: list[str] = []
        self.active = True
        options.directory.mkdir(parents=True, exist_ok=True)

    def _partial(self, i: int) -> Path:
        return self.options.directory / f".{self.options.prefix}-env{i}.partial.mp4"

    def _full(self) -> bool:
        return self.options.max_videos is not None and len(self.videos) >= self.options.max_videos

    def _start(self, i: int) -> None:
        self._stop(i, None)
        self.recording[i] = self.active and self.counted[i] < self.quota[i] and not self._full()

    def _write(self, i: int, frame: np.ndarray) -> None:
        import cv2

        if not self.recording[i]:
            return
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        if self.writers[i] is None:
            h, w = frame.shape[:2]
            writer = cv2.VideoWriter(str(self._partial(i)), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not writer.isOpened():
                raise ValueError(f"OpenCV cannot write mp4 (mp4v) files to {self.options.directory}")
            self.writers[i] = writer
        self.writers[i].write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR) if frame.ndim == 3 else
                              cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))

    def _stop(self, i: int, name: str | None) -> None:
        """Close sub-env ``i``'s video: keep it as ``name`` or delete it (None)."""
        writer, self.writers[i] = self.writers[i], None
        was_recording, self.recording[i] = self.recording[i], False
        if writer is not None:
            writer.release()
        partial = self._partial(i)
        if name is not None and was_recording and writer is not None and not self._full():
            final = self.options.directory / name
            os.replace(partial, final)
            self.videos.append(str(final))
        elif partial.exists():
            partial.unlink()

    def _stop_all(self) -> None:
        for i in range(self.num_envs):
            self._stop(i, None)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        frames = self.source.reset(seed if seed is not None else getattr(self.env, "seed", None))
        self.prev_done[:] = False
        for i, frame in enumerate(frames):
            self._start(i)
            self._write(i, frame)
        return obs, info

    def step(self, actions):
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        done = np.asarray(terminated) | np.asarray(truncated)
        if self.active:
            try:
                frames = self.source.step(actions, rewards, done)
            except _Desync as e:
                print(f"warning: {e}; no more videos are recorded", file=sys.stderr)
                self.active = False
                self._stop_all()
        for i in range(self.num_envs):
            if self.prev_done[i]:  # next-step autoreset: this step reset sub-env i, a new episode starts
                self._start(i)
            if self.active:
                self._write(i, frames[i])
        for i in np.flatnonzero(done):
            if self.counted[i] < self.quota[i]:  # an episode run_episodes counts, in its order
                ret = float(info["episode"]["r"][i]) if "episode" in info else float("nan")
                self._stop(i, f"{self.options.prefix}-ep{self.finished:03d}-return{ret:g}.mp4")
                self.counted[i] += 1
                self.finished += 1
            else:
                self._stop(i, None)
        self.prev_done = done
        return obs, rewards, terminated, truncated, info

    def close(self, **kwargs: Any):
        self._stop_all()
        self.source.close()
        return self.env.close(**kwargs)


def make_video_env(env_cfg, num_envs: int, seed: int, episodes: int, video: VideoOptions) -> VideoRecorder:
    """An evaluation env (as ``rlq.trainer.make_env_from_cfg``) that records its episodes: classic control
    and MuJoCo through ``render_mode="rgb_array"``, Atari through :class:`_AtariScreens`."""
    from omegaconf import OmegaConf

    from rlq.envs import resolve_env
    from rlq.trainer import make_env_from_cfg

    if resolve_env(str(env_cfg.name)).kind == "atari":
        env = make_env_from_cfg(env_cfg, num_envs, seed)
        return VideoRecorder(env, _AtariScreens(env), video, episodes)
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # rgb_array rendering needs no display
    env = make_env_from_cfg(OmegaConf.merge(env_cfg, {"render_mode": "rgb_array"}), num_envs, seed)
    return VideoRecorder(env, _RenderFrames(env), video, episodes)


def evaluate_checkpoint(checkpoint: str, episodes: int = 10, seed: int = 0, epsilon: float | None = None,
                        num_envs: int | None = None, env_overrides: dict[str, Any] | None = None,
                        video: VideoOptions | None = None) -> dict[str, Any]:
    """Load an agent from a checkpoint/run dir and play greedy episodes; returns returns and summary.
    ``video``: also write the episodes as mp4 files (:class:`VideoOptions`); their paths are in ``videos``."""
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
    env = make_env_from_cfg(env_cfg, n, seed) if video is None else make_video_env(env_cfg, n, seed, episodes, video)
    try:
        eps = float(env_cfg.eval_epsilon) if epsilon is None else epsilon
        returns, lengths = run_episodes(lambda o: agent.act(o, explore=False), env, episodes, seed=seed, epsilon=eps)
    finally:
        env.close()
    return {"checkpoint": str(path), "env": str(env_cfg.name), "episodes": episodes, "epsilon": eps,
            "returns": returns.tolist(), "lengths": lengths.tolist(), "mean": float(returns.mean()),
            "std": float(returns.std()), "iqm": iqm(returns), "agent": str(agent.config.agent.name),
            "quant": str(OmegaConf.select(agent.config, "quant.name", default="none")),
            "sparsity": policy_sparsity(agent), "videos": list(getattr(env, "videos", []))}


def policy_sparsity(agent) -> dict[str, Any]:
    """The policy network's sparsity, measured from its weights (``rlq.nets.sparse.sparsity_report``: the zero
    fraction of each Linear/Conv2d weight and overall; biases not counted). Every agent gets it, EauDeQN's pruned
    networks and dense ones alike (a dense network's is 0: the printout leaves it out)."""
    from rlq.nets.sparse import sparsity_report

    rep = sparsity_report(agent.policy_net())
    return {"overall": rep["overall"], "layers": {k.removesuffix(".weight"): v for k, v in rep["layers"].items()},
            "params": rep["params"], "nonzero": rep["nonzero"]}


# -- other inputs: policy files, globs of runs -------------------------------------------------------------
def env_preset(name: str):
    """The env config (evaluation protocol included) of an env name: its preset in ``configs/env/``, or
    the ``atari`` / ``gym`` preset with ``name`` for other Atari games and Gymnasium ids."""
    from omegaconf import OmegaConf

    from rlq.train import _compose, rewrite_env_args

    env_cfg = _compose(rewrite_env_args([f"env={name}"])).env
    return OmegaConf.create(OmegaConf.to_container(env_cfg, resolve=True))


def evaluate_policy_file(policy: str, env: str | None = None, episodes: int = 10, seed: int = 0,
                         epsilon: float | None = None, num_envs: int | None = None,
                         env_overrides: dict[str, Any] | None = None, video: VideoOptions | None = None,
                         backend: str = "auto") -> dict[str, Any]:
    """Play evaluation episodes with an exported low-bit policy file (``rlq.deploy.load_policy``).

    The env is ``env`` or the file's ``graph["meta"]["env"]``, with that env preset's protocol
    (``env_overrides`` change it); returns the same keys as :func:`evaluate_checkpoint`, with
    ``policy`` and ``backend`` instead of ``checkpoint``."""
    from rlq.evaluation import iqm, run_episodes
    from rlq.trainer import make_env_from_cfg

    try:
        from rlq.deploy import load_policy
    except ImportError:
        raise ValueError("policy files need rlq.deploy.load_policy, which this rlq installation does not have") from None
    path = Path(policy)
    if not path.is_file():
        raise ValueError(f"policy file not found: {policy}")
    try:
        pol = load_policy(str(path), backend=backend)
    except Exception as e:  # noqa: BLE001 - a foreign, corrupt or unsupported file: one line, whatever the runtime raised
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load policy file {policy}: {first}") from None
    graph = getattr(pol, "graph", {}) or {}
    meta = dict(graph.get("meta") or {})
    name = env or meta.get("env")
    if not name:
        raise ValueError(f"policy file {policy} does not name its env (no meta.env): give env=<name>")
    env_cfg = env_preset(str(name))
    for k, v in (env_overrides or {}).items():
        env_cfg[k] = v
    n = min(num_envs or 5, episodes)
    vec = make_env_from_cfg(env_cfg, n, seed) if video is None else make_video_env(env_cfg, n, seed, episodes, video)
    try:
        expected = tuple((graph.get("observation") or {}).get("shape") or ())
        got = tuple(vec.single_observation_space.shape)
        if expected and expected != got:
            raise ValueError(f"policy file {policy} expects observations of shape {list(expected)}, but env "
                             f"{name} gives {list(got)}: give the env it was trained on (env=<name>)")
        eps = float(env_cfg.eval_epsilon) if epsilon is None else epsilon
        returns, lengths = run_episodes(lambda o: np.asarray(pol.act(o)), vec, episodes, seed=seed, epsilon=eps)
    finally:
        vec.close()
    return {"policy": str(path), "backend": str(getattr(pol, "backend", backend)), "env": str(name),
            "episodes": episodes, "epsilon": eps, "returns": returns.tolist(), "lengths": lengths.tolist(),
            "mean": float(returns.mean()), "std": float(returns.std()), "iqm": iqm(returns),
            "agent": str(meta.get("agent", "policy")), "quant": str(meta.get("quant", "none")),
            "videos": list(getattr(vec, "videos", []))}


def expand_checkpoints(spec: str) -> list[str]:
    """A ``checkpoint=`` value -> what to evaluate: the run directories (with checkpoints) and
    checkpoint files a glob matches; the job directories of a sweep directory; else ``spec`` itself."""
    from rlq.checkpoint import list_checkpoints

    def is_run(p: Path) -> bool:
        return p.is_dir() and bool(list_checkpoints(p))

    if any(c in spec for c in "*?["):
        matches = [Path(m) for m in sorted(globlib.glob(spec, recursive=True))]
        runs = [m for m in matches if is_run(m) or (m.is_file() and m.suffix == ".pt")]
        for m in matches:
            if m.is_dir() and (m / "config.yaml").is_file() and not is_run(m):
                print(f"warning: skipping {m}: a run directory without checkpoints", file=sys.stderr)
        if not runs:
            raise ValueError(f"checkpoint={spec!r} matches no run directory with checkpoints and no checkpoint "
                             f"file ({len(matches)} paths matched)")
        return [str(r) for r in runs]
    p = Path(spec)
    if p.is_dir() and not is_run(p) and not (p / "config.yaml").is_file():
        jobs = sorted(c for c in p.iterdir() if is_run(c))
        if jobs:
            return [str(j) for j in jobs]
    return [spec]


def _run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


# -- aggregate over runs -----------------------------------------------------------------------------------
def default_target(env_name: str) -> tuple[float | None, str]:
    """The optimality-gap target of an env, in raw return: the average human score of an Atari game,
    else the Gymnasium ``reward_threshold`` (CartPole-v1: 475), else None."""
    import gymnasium

    from rlq.envs import resolve_env
    from rlq.stats import ATARI_HUMAN

    try:
        spec = resolve_env(env_name)
    except ValueError:
        return None, ""
    if spec.kind == "atari":
        human = ATARI_HUMAN.get(spec.short_name)
        return (float(human), "human score") if human is not None else (None, "")
    try:
        threshold = gymnasium.spec(spec.id).reward_threshold
    except gymnasium.error.Error:
        threshold = None
    return (float(threshold), f"{spec.id} reward threshold") if threshold is not None else (None, "")


def group_label(result: dict[str, Any]) -> str:
    quant = result.get("quant") or "none"
    return f"{result.get('agent', 'policy')}{'' if quant == 'none' else '+' + quant} on {result['env']}"


def aggregate_runs(results: list[dict[str, Any]], reps: int = 2000, confidence: float = 0.95, seed: int = 0,
                   target: float | None = None) -> dict[str, dict[str, Any]]:
    """Aggregate evaluation results over runs, per agent (+quant) and env (:func:`group_label`).

    A run's score is its mean return; IQM, mean, median (:func:`rlq.stats.pooled_median`: the median of
    the runs) and the optimality gap (against ``target`` or :func:`default_target`; left out when there
    is none) get ``confidence`` stratified-bootstrap intervals from ``reps`` resamples of the runs.
    Returns ``{label: {"runs", "scores", "iqm": {"point", "low", "high"}, "mean", "median",
    "optimality_gap", "target", ...}}``."""
    from rlq import stats

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(group_label(r), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for label, rs in groups.items():
        scores = np.array([r["mean"] for r in rs], dtype=np.float64)
        gamma, source = (float(target), "target=") if target is not None else default_target(rs[0]["env"])
        fns: dict[str, Any] = {"iqm": stats.iqm, "mean": stats.mean, "median": stats.pooled_median}
        if gamma is not None:
            fns["optimality_gap"] = functools.partial(stats.optimality_gap, gamma=gamma)
        est = stats.interval_estimates({label: scores}, fns, reps=reps, confidence=confidence, seed=seed)[label]
        out[label] = {"agent": rs[0].get("agent"), "quant": rs[0].get("quant"), "env": rs[0]["env"], "runs": len(rs),
                      "episodes_per_run": [r["episodes"] for r in rs], "scores": scores.tolist(),
                      "sources": [r.get("checkpoint") or r.get("policy") for r in rs],
                      **{k: {"point": p, "low": lo, "high": hi} for k, (p, lo, hi) in est.items()},
                      "target": gamma, "target_source": source, "confidence": confidence, "reps": reps}
    return out


def _print_run(res: dict[str, Any]) -> None:
    print(f"{res.get('checkpoint') or res.get('policy')}  env {res['env']}  epsilon {res['epsilon']}")
    for i, (r, l) in enumerate(zip(res["returns"], res["lengths"])):
        print(f"  episode {i:3d}: return {r:10.2f}  length {l}")
    print(f"return {res['mean']:.2f} ± {res['std']:.2f} (mean ± std over {res['episodes']} episodes), "
          f"IQM {res['iqm']:.2f}")
    sp = res.get("sparsity")
    if sp and sp["overall"] > 0:  # a dense policy (every weight nonzero) prints nothing here
        layers = ", ".join(f"{name} {v:.1%}" for name, v in sp["layers"].items())
        print(f"policy sparsity {sp['overall']:.1%} ({sp['nonzero']} of {sp['params']} weights nonzero; {layers})")
    for v in res.get("videos") or []:
        print(f"  video {v}")
    sys.stdout.flush()


def _print_aggregate(agg: dict[str, dict[str, Any]]) -> None:
    from rlq.stats import format_interval

    first = next(iter(agg.values()))
    print(f"\naggregate over runs (a run's score is its mean return; {first['confidence']:.0%} CIs from "
          f"{first['reps']} stratified-bootstrap resamples of the runs)")
    for label, g in agg.items():
        print(f"  {label}: {g['runs']} run{'' if g['runs'] == 1 else 's'}")
        for key, name in (("iqm", "IQM"), ("mean", "mean"), ("median", "median"), ("optimality_gap", "optimality gap")):
            if key in g:
                v = g[key]
                extra = f"  (target {g['target']:g}: {g['target_source']})" if key == "optimality_gap" else ""
                print(f"    {name:15s} {format_interval(v['point'], v['low'], v['high'])}{extra}")


def main(argv: list[str] | None = None) -> int:
    from rlq.checkpoint import CheckpointError, resolve_checkpoint

    results: list[dict[str, Any]] = []
    try:
        opts, env_over = parse_args(list(sys.argv[1:] if argv is None else argv))
        common = (opts["episodes"], opts["seed"], opts["epsilon"], opts["num_envs"], env_over)
        if opts["policy"] is not None:
            policy = Path(opts["policy"])
            video = VideoOptions(Path(opts["video_dir"] or policy.parent / "videos"), policy.stem,
                                 opts["video_episodes"]) if opts["record_video"] else None
            results.append(evaluate_policy_file(str(policy), opts["env"], *common, video=video))
            if not opts["json"]:
                _print_run(results[-1])
        else:
            runs = expand_checkpoints(opts["checkpoint"])
            for run in runs:
                video = None
                if opts["record_video"]:
                    path = resolve_checkpoint(run)
                    run_dir = _run_dir_of(path)
                    where = (Path(opts["video_dir"]) / run_dir.name if len(runs) > 1 else Path(opts["video_dir"])) \
                        if opts["video_dir"] else run_dir / "videos"
                    video = VideoOptions(where, path.stem, opts["video_episodes"])
                results.append(evaluate_checkpoint(run, *common, video=video))
                if not opts["json"]:
                    _print_run(results[-1])
        agg = aggregate_runs(results, opts["reps"], target=opts["target"]) if len(results) > 1 else None
    except (ValueError, CheckpointError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    if opts["json"]:
        print(json.dumps(results[0] if agg is None else {"runs": results, "aggregate": agg}))
    elif agg is not None:
        _print_aggregate(agg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
