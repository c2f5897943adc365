"""``python -m rlq.train agent=<name> env=<name> [key=value ...]``: the training entry point.

A Hydra app over ``configs/`` (groups ``agent/``, ``env/``, ``quant/``). Examples::

    python -m rlq.train                                   # agent=dqn env=CartPole
    python -m rlq.train agent=double_dqn env=Pong seed=3 total_steps=2e6 env.num_envs=8
    python -m rlq.train env=MountainCar-v0                # any Gymnasium id
    python -m rlq.train resume=runs/dqn-CartPole-s0-...   # continue a stopped run
    python -m rlq.train +experiment=pong_rainbow seed=1    # a benchmark preset (configs/experiment/)
    python -m rlq.train -m agent=dqn,double_dqn seed=0,1,2                        # a sweep, one job at a time
    python -m rlq.train -m hydra/launcher=joblib agent=dqn,double_dqn seed=0,1,2  # parallel local jobs
    python -m rlq.train -m hydra/sweeper=rlq_optuna                               # hyper-parameter search

Bad input (unknown agent/env/key/experiment/launcher, wrong type, bad range) prints one line and exits
with status 2 before any run directory is created. A sweep (``-m``) is checked the same way before the
first job starts: every value of every swept key is composed and validated at least once.

The task's return value (what a Hydra sweeper sees) is the final evaluation's IQM return
(:func:`objective`): the Optuna preset (``hydra/sweeper=rlq_optuna``) maximizes it. A single run's exit
status is 0 on success, 2 for bad input, 130 after Ctrl-C, 1 if training stopped on an error.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from rlq.config import ConfigError, apply_env_preset, config_dir, group_options, register_resolvers, validate

register_resolvers()

# keys a resumed run may change (everything else comes from the run's saved config)
RESUMABLE_OVERRIDES = ("resume", "total_steps", "log.", "checkpoint.", "eval.", "threads", "device", "overlap",
                       "malloc_tuning")
# config groups of Hydra plugins -> (pip package, rlq extra that installs it), for install hints
PLUGIN_GROUPS = {
    "hydra/launcher/joblib": ("hydra-joblib-launcher", "sweep"),
    "hydra/sweeper/optuna": ("hydra-optuna-sweeper", "sweep"),
    "hydra/sweeper/sampler": ("hydra-optuna-sweeper", "sweep"),
    "hydra/launcher/submitit": ("hydra-submitit-launcher", "cluster"),
    "hydra/launcher/ray": ("hydra-ray-launcher", "cluster"),
}
PLUGIN_MODULES = {
    "hydra_plugins.hydra_joblib_launcher": ("hydra-joblib-launcher", "sweep"),
    "hydra_plugins.hydra_optuna_sweeper": ("hydra-optuna-sweeper", "sweep"),
    "hydra_plugins.hydra_submitit_launcher": ("hydra-submitit-launcher", "cluster"),
    "hydra_plugins.hydra_ray_launcher": ("hydra-ray-launcher", "cluster"),
}
# jobs composed and validated before a sweep starts, at most (chosen to cover every swept value)
MAX_PREFLIGHT_JOBS = 64
_CUSTOM_CONFIG_FLAGS = ("-cp", "--config-path", "-cd", "--config-dir", "-cn", "--config-name")
_NO_COMPOSE_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc")
_HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--version", "--shell-completion",
                "-sc", "--resolve", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun")


def _is_sweep(value: str) -> bool:
    return any(c in value for c in ",[]()") or value.startswith(("range", "choice", "glob", "interval"))


def rewrite_env_args(argv: list[str]) -> list[str]:
    """``env=X`` where X is no preset becomes ``env=atari env.name=X`` for an Atari game or
    ``env=gym env.name=X`` for any other Gymnasium id. Unknown names raise ConfigError."""
    from rlq.envs import resolve_env

    out: list[str] = []
    presets = group_options("env")
    for arg in argv:
        if arg.startswith("env=") and not _is_sweep(arg[4:]) and arg[4:] not in presets:
            name = arg[4:]
            try:
                spec = resolve_env(name)
            except ValueError as e:
                raise ConfigError(str(e).splitlines()[0]) from None
            out += [f"env={'atari' if spec.kind == 'atari' else 'gym'}", f"env.name={name}"]
        else:
            out.append(arg)
    return out


def _plugin_hint(path: str) -> str:
    """An install hint when the config ``path`` (``hydra/launcher/joblib``) comes with a Hydra plugin."""
    for prefix, (package, extra) in PLUGIN_GROUPS.items():
        if path.startswith(prefix):
            return f"; {path.rsplit('/', 1)[-1]!r} comes with the {package} plugin: pip install \"rlq[{extra}]\""
    return ""


def _hydra_group_options(group: str) -> list[str]:
    """Options of a Hydra group (``hydra/launcher``): Hydra's own, installed plugins' and ``configs/hydra/``."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(str(config_dir()), version_base=None):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def _values(arg: str) -> list[str] | None:
    """The values an override names: one, each of a discrete sweep (``a,b``, ``range(3)``), or None
    for a sweep that cannot be listed (``interval(...)``, Optuna's ``tag(...)``) or unparsable input."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        o = OverridesParser.create().parse_override(arg)
    except HydraException:
        return None
    if o.is_delete():
        return None
    if not o.is_sweep_override():
        return [o.get_value_element_as_str()]
    return list(o.sweep_string_iterator()) if o.is_discrete_sweep() else None


def _is_sweep_arg(arg: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(arg).is_sweep_override()
    except HydraException:
        return False


def _check_group_choices(overrides: list[str]) -> None:
    """Unknown options of the config groups (``agent``, ``env``, ``quant``, ``+experiment``,
    ``hydra/launcher``, ``hydra/sweeper``, ...) as one line, for single values and sweeps alike."""
    for arg in overrides:
        raw_key, sep, value = arg.partition("=")
        key = raw_key.lstrip("+~")
        if not sep:
            continue
        if key == "experiment" and not raw_key.startswith("+"):
            raise ConfigError(f"use +experiment={value} (with a '+': an experiment preset is added to the config)")
        if key in ("agent", "quant", "env", "experiment"):
            values, opts = _values(arg), group_options(key)
            if key == "env" and values and len(values) > 1 and any(v not in opts for v in values):
                bad = next(v for v in values if v not in opts)
                raise ConfigError(f"env={value}: {bad!r} is not an env preset, and a sweep over env needs presets; "
                                  f"sweep env.name instead (env=atari env.name={value} for Atari games, "
                                  f"env=gym env.name=... for Gymnasium ids)")
            for v in values or []:
                if v not in opts:
                    raise ConfigError(f"unknown {key} {v!r}: choose one of {', '.join(opts)}")
        elif key.startswith("hydra/"):
            opts = _hydra_group_options(key)
            for v in _values(arg) or []:
                if v not in opts:
                    raise ConfigError(f"unknown {key} {v!r}: choose one of {', '.join(opts)}"
                                      + _plugin_hint(f"{key}/{v}"))


def _check_plugin_targets(hydra_cfg: DictConfig) -> None:
    """The selected launcher and sweeper classes must be importable (their plugin installed)."""
    import importlib.util

    for group in ("launcher", "sweeper"):
        target = str(OmegaConf.select(hydra_cfg, f"{group}._target_", default="") or "")
        module = target.rsplit(".", 1)[0]
        try:
            found = importlib.util.find_spec(module) is not None if module else True
        except ModuleNotFoundError:
            found = False
        if not found:
            pkg = next((v for k, v in PLUGIN_MODULES.items() if module.startswith(k)), None)
            hint = f': pip install "rlq[{pkg[1]}]" (package {pkg[0]})' if pkg else ""
            raise ConfigError(f"hydra/{group} needs {module}, which is not installed{hint}")


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``key=value`` overrides as a dict with parsed values (Hydra's grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.key_or_group: o.value() for o in parsed if not o.is_delete()}


def _compose(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """Compose ``configs/config.yaml`` with ``overrides``; errors become one-line ``ConfigError``s.
    ``with_hydra``: keep the ``hydra`` node (launcher, sweeper; ``hydra...`` overrides allowed)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(config_dir()), version_base=None):
            return compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)
    except (ConfigCompositionException, OverrideParseException, OmegaConfBaseException, HydraException) as e:
        msg = str(e)
        cause = str(e.__cause__ or "")
        missing = re.search(r"Could not (?:find|load) '([^']+)'", msg)
        if missing:
            path = missing.group(1)
            where = re.search(r"In '([^']+)'", msg)
            if where and where.group(1) not in ("config", "hydra/config"):  # a preset's own defaults list
                raise ConfigError(f"{where.group(1)} needs the config {path!r}, which is missing"
                                  f"{_plugin_hint(path)}") from None
            group, _, name = path.rpartition("/")
            opts = re.search(r"Available options in '[^']*':\n((?:\t.*\n?)+)", msg)
            listed = ", ".join(o.strip() for o in opts.group(1).splitlines() if o.strip()) if opts else ""
            choose = f": choose one of {listed}" if listed else ""
            raise ConfigError(f"unknown {group or 'config'} {name!r}{choose}{_plugin_hint(path)}") from None
        if "Could not override" in msg or "not in struct" in cause:
            key = msg.split("'")[1] if "'" in msg else msg
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            base = _compose([o for o in overrides if not o.lstrip("+~").startswith(key)]) if parent else None
            node = OmegaConf.select(base, parent) if base is not None else None
            valid = f": valid keys under '{parent}' are {', '.join(sorted(node.keys()))}" if isinstance(node, DictConfig) else ""
            raise ConfigError(f"unknown config key '{key}'{valid}") from None
        line = (msg.strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(line) from None


def build_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Composed config -> the resolved run config: Atari preset applied, validated."""
    from rlq.envs import resolve_env

    try:
        spec = resolve_env(cfg.env.name)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    groups = ("agent", "env", "quant", "+experiment", "experiment")
    user = {k: v for k, v in _parse_overrides([o for o in overrides if "=" in o]).items()
            if k not in groups and not k.startswith("hydra")}
    # an experiment preset is a saved command line: its values win over the `atari:` blocks, and the
    # command line wins over the preset
    user = {**experiment_values(cfg, overrides), **user}
    plain = apply_env_preset(cfg, user, spec.kind == "atari")
    plain.pop("hydra", None)
    validate(plain)
    return plain


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, DictConfig):
        return [k for key in node for k in _leaf_keys(node._get_node(key), f"{prefix}{key}.")]
    return [prefix[:-1]]


def experiment_values(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """The values the ``+experiment=<name>`` presets among ``overrides`` set (dotted key -> value, as
    composed in ``cfg``), except their ``defaults``, ``hydra`` and ``atari`` blocks."""
    out: dict[str, Any] = {}
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if key.lstrip("+~") != "experiment" or not sep:
            continue
        path = config_dir() / "experiment" / f"{value}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown experiment {value!r}: choose one of {', '.join(group_options('experiment'))}")
        preset = OmegaConf.load(path)
        for k in _leaf_keys(preset):
            if k.split(".")[0] in ("defaults", "hydra", "atari") or k.startswith("agent.atari."):
                continue
            v = OmegaConf.select(cfg, k, default=None)
            out[k] = OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
    return out


def resume_config(run_dir: str, overrides: list[str]) -> DictConfig:
    """The saved config of ``run_dir`` with the few overrides a resume may change."""
    from rlq.checkpoint import CheckpointError, resolve_checkpoint

    path = Path(run_dir)
    saved = path / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume={run_dir!r} is not an rlq run directory (no config.yaml)")
    try:
        resolve_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"resume={run_dir!r}: {e}") from None
    bad = [o for o in overrides if not o.lstrip("+~").startswith(RESUMABLE_OVERRIDES)]
    if bad:
        raise ConfigError(f"resume cannot change {bad[0]!r}: a resumed run keeps its saved config "
                          f"(allowed: total_steps, eval.*, checkpoint.*, log.*, threads, device, overlap, "
                          f"malloc_tuning)")
    cfg = OmegaConf.load(saved)
    for k, v in _parse_overrides(overrides).items():
        if k != "resume":
            OmegaConf.update(cfg, k, v, merge=False)
    cfg.resume = str(run_dir)
    validate(cfg)
    return cfg


def _compose_checked(overrides: list[str]) -> tuple[DictConfig, DictConfig]:
    """Compose with the ``hydra`` node (launcher/sweeper choices checked, plugins importable);
    returns (the config without ``hydra``, the ``hydra`` node)."""
    cfg = _compose(overrides, with_hydra=True)
    with open_dict(cfg):
        hydra_cfg = cfg.pop("hydra")
    _check_plugin_targets(hydra_cfg)
    return cfg, hydra_cfg


def preflight(overrides: list[str]) -> DictConfig:
    """Validate a single run's overrides before Hydra creates anything on disk."""
    _check_group_choices(overrides)
    parsed = _parse_overrides([o for o in overrides if "=" in o])
    if parsed.get("resume") not in (None, "null"):
        cfg = resume_config(str(parsed["resume"]), [o for o in overrides if not o.startswith("hydra")])
        _check_writable(Path(str(parsed["resume"])), "resume")
        return cfg
    cfg, _ = _compose_checked(overrides)
    cfg = build_config(cfg, overrides)
    _check_writable(Path(str(cfg.run_dir)) if cfg.get("run_dir") else Path("runs"), "run_dir")
    return cfg


def _check_writable(target: Path, key: str) -> None:
    """The run directory can be created and written (its nearest existing ancestor takes a file)."""
    probe = target.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "not a directory")
        fd, tmp = tempfile.mkstemp(prefix=".rlq-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"{key}={target}: cannot write there ({probe}: {e.strerror or e}); choose a writable "
                          "directory") from None


def sweep_jobs(overrides: list[str], sweeper_params: dict[str, Any] | None = None) -> list[list[str]]:
    """The jobs a basic-sweeper multirun launches (each a list of ``key=value``), as Hydra's
    ``BasicSweeper`` expands them: ``hydra.sweeper.params`` first, the command line replacing the same
    keys. A sweep the basic sweeper cannot list (``interval(...)``) raises ConfigError."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args = [f"{k}={v}" for k, v in (sweeper_params or {}).items()]
    args += [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
        for o in parsed:
            if o.is_sweep_override() and not o.is_discrete_sweep():
                raise ConfigError(f"{o.input_line}: the basic sweeper takes lists (a,b), range(...) or choice(...); "
                                  f"{o.value_type.name.lower().replace('_sweep', '')}(...) needs an Optuna sweeper "
                                  f"(hydra/sweeper=rlq_optuna)")
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
    except HydraException as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    return jobs


def _covering_jobs(jobs: list[list[str]], limit: int) -> list[list[str]]:
    """Few jobs in which every ``key=value`` of the sweep appears (greedy set cover: for a grid, as many
    jobs as the longest list of values), at most ``limit``."""
    uncovered = set().union(*map(set, jobs))
    chosen: list[list[str]] = []
    while uncovered and len(chosen) < limit:
        best = max(jobs, key=lambda job: len(uncovered.intersection(job)))
        chosen.append(best)
        uncovered.difference_update(best)
    return chosen


def preflight_sweep(overrides: list[str]) -> int:
    """Validate a multirun before Hydra launches it; returns the number of jobs checked.

    Group choices (including swept ones) and the launcher/sweeper plugins are checked; for the basic
    sweeper, jobs covering every value of every swept key (``hydra.sweeper.params`` included) are
    composed and validated like single runs. For other sweepers (Optuna) the config without the swept
    keys is validated; a trial whose sampled values are invalid fails on its own."""
    _check_group_choices(overrides)
    if any(o.lstrip("+~").partition("=")[0] == "resume" for o in overrides):
        return 0
    hydra_args = [o for o in overrides if o.lstrip("+~").startswith("hydra")]
    fixed = [o for o in overrides if o not in hydra_args and not _is_sweep_arg(o)]
    cfg, hydra_cfg = _compose_checked(hydra_args + fixed)
    launcher = str(OmegaConf.select(hydra_cfg, "launcher._target_", default="") or "")
    if launcher.endswith("SlurmLauncher") and shutil.which("srun") is None:
        choice = (OmegaConf.select(hydra_cfg, "runtime.choices") or {}).get("hydra/launcher", "submitit_slurm")
        raise ConfigError(f"hydra/launcher={choice} submits SLURM jobs, but this machine has no srun: launch the "
                          f"sweep from a SLURM login node (hydra/launcher=joblib runs it here)")
    sweeper = str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="") or "")
    if sweeper.endswith("BasicSweeper"):
        params = OmegaConf.to_container(hydra_cfg.sweeper.params) if hydra_cfg.sweeper.get("params") else {}
        jobs = sweep_jobs(overrides, params)
    else:
        if sweeper.endswith("OptunaSweeper"):
            directions = hydra_cfg.sweeper.get("direction")
            directions = list(directions) if isinstance(directions, ListConfig) else [directions]
            if len(directions) != 1 or getattr(directions[0], "name", str(directions[0])) != "maximize":
                raise ConfigError(f"hydra.sweeper.direction={getattr(directions[0], 'name', directions[0])}: a trial "
                                  f"returns its final eval IQM return, to maximize: use hydra/sweeper=rlq_optuna "
                                  f"or hydra.sweeper.direction=maximize")
            if not (int(cfg.eval.every) > 0 or bool(cfg.eval.final)):
                raise ConfigError("an Optuna trial's objective is its final eval return: keep eval.final=true")
        jobs = None
    if not jobs:
        build_config(cfg, hydra_args + fixed)
        return 1
    chosen = _covering_jobs(jobs, MAX_PREFLIGHT_JOBS)
    for job in chosen:
        _check_group_choices(job)
        build_config(_compose(job), job)
    return len(chosen)


def _cleanup_run_dir(run_dir: Path) -> None:
    """Remove a run directory this invocation created if it holds nothing but Hydra's own files."""
    if run_dir.is_dir() and all(p.name in (".hydra", "train.log") for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train with a resolved config in ``run_dir`` (resuming when ``cfg.resume`` is set)."""
    from rlq.checkpoint import atomic_text, load_checkpoint
    from rlq.trainer import Trainer

    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    if ckpt is not None:
        saved_agent = ckpt["config"]["agent"]["name"]
        if saved_agent != cfg.agent.name:
            raise ConfigError(f"resume: checkpoint agent {saved_agent!r} differs from config agent {cfg.agent.name!r}")
    if OmegaConf.select(cfg, "offline.dataset") is not None:  # offline RL: batches from a dataset file
        from rlq.offline import OfflineTrainer as Trainer  # noqa: F811
    try:  # building envs, agent and buffer validates the combination (e.g. an MLP encoder on Atari)
        trainer = Trainer(cfg, run_dir, resume_from=ckpt)
    except (ValueError, TypeError, ImportError) as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_text(OmegaConf.to_yaml(cfg), run_dir / "config.yaml")
    try:
        if ckpt is not None:
            print(f"resuming {run_dir} from step {trainer.step}")
        summary = trainer.train()
    finally:
        trainer.close()
    ev = summary["eval"]
    ev_txt = f", eval return {ev['return_mean']:.2f} ± {ev['return_std']:.2f}" if ev else ""
    rate = (f"{summary['step']} updates in {summary['wall_s']:.0f}s ({summary['updates_per_s']:.0f} updates/s)"
            if OmegaConf.select(cfg, "offline.dataset") is not None else
            f"{summary['step']} steps in {summary['wall_s']:.0f}s ({summary['sps']:.0f} steps/s)")
    print(f"done: {rate}{ev_txt}; run directory {run_dir}")
    return summary


class JobFailed(RuntimeError):
    """One job of a sweep failed (bad config, diverged); the sweep records it and goes on."""


def objective(summary: dict[str, Any]) -> float:
    """A finished run's score for sweepers: the IQM return of its last evaluation (the final one with
    ``eval.final=true``, the default), NaN if it never evaluated."""
    ev = summary.get("eval") or {}
    return float(ev["return_iqm"]) if "return_iqm" in ev else math.nan


_DEFAULT_THREADS: int | None = None


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def job_threads(hydra_cfg: DictConfig) -> int:
    """Torch threads for one job of a sweep: the CPUs this process may use, divided among the jobs a
    local parallel launcher (joblib) runs at once (joblib: ``n_jobs=-1`` all CPUs, ``-2`` all but one)."""
    cpus = _cpu_count()
    if "JoblibLauncher" in str(OmegaConf.select(hydra_cfg, "launcher._target_", default="")):
        n_jobs = int(OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=-1) or -1)
        parallel = n_jobs if n_jobs > 0 else max(1, cpus + 1 + n_jobs)
        return max(1, cpus // parallel)
    return cpus


def _set_job_threads(hydra_cfg: DictConfig) -> None:
    """Each job of a sweep starts from torch's default thread count (a process may run several jobs)
    capped at its share of the CPUs; the Trainer then applies ``threads`` (1 for vector observations)."""
    import torch

    global _DEFAULT_THREADS
    _DEFAULT_THREADS = _DEFAULT_THREADS or torch.get_num_threads()
    torch.set_num_threads(min(_DEFAULT_THREADS, job_threads(hydra_cfg)))


def _task(hcfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from rlq.checkpoint import CheckpointError
    from rlq.trainer import TrainingStopped

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    created = not (run_dir / "config.yaml").exists()
    try:
        if hcfg.resume:
            cfg = resume_config(str(hcfg.resume), overrides)
            run_dir = Path(str(hcfg.resume))
        else:
            cfg = build_config(hcfg, overrides)
        if multirun:
            _set_job_threads(hc)
        return objective(run(cfg, run_dir))
    except (ConfigError, CheckpointError) as e:
        if created and not hcfg.resume:
            _cleanup_run_dir(run_dir)
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            raise JobFailed(f"job {hc.job.num} ({' '.join(overrides)}): {e}") from None
        sys.exit(2)
    except TrainingStopped as e:
        stopped = "stopped by" in str(e)
        if not stopped:
            print(f"error: {e}", file=sys.stderr)
            if multirun:
                raise JobFailed(f"job {hc.job.num} ({' '.join(overrides)}): {e}") from None
        sys.exit(130 if "SIGINT" in str(e) else 1)


def main(argv: list[str] | None = None) -> None:
    import hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = rewrite_env_args(argv)
        multirun = any(a in ("-m", "--multirun") for a in argv)
        overrides = [a for a in argv if not a.startswith("-")]
        flags = [a.split("=")[0] for a in argv if a.startswith("-")]
        if not any(f in _HYDRA_FLAGS for f in flags):
            preflight_sweep(overrides) if multirun else preflight(overrides)
        elif not any(f in _CUSTOM_CONFIG_FLAGS + _NO_COMPOSE_FLAGS for f in flags):
            _check_group_choices(overrides)  # --cfg, --info, ...: one line for a config that cannot compose
            _compose([o for o in overrides if ("=" in o or o.startswith("~")) and not _is_sweep_arg(o)],
                     with_hydra=True)  # (a flag's value, as in `--cfg job`, has no "=")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0]] + argv
    hydra.main(config_path=str(config_dir()), config_name="config", version_base=None)(_task)()


if __name__ == "__main__":
    main()
