"""``python -m rlq.train agent=<name> env=<name> [key=value ...]``: the training entry point.

A Hydra app over ``configs/`` (groups ``agent/``, ``env/``, ``quant/``). Examples::

    python -m rlq.train                                   # agent=dqn env=CartPole
    python -m rlq.train agent=double_dqn env=Pong seed=3 total_steps=2e6 env.num_envs=8
    python -m rlq.train env=MountainCar-v0                # any Gymnasium id
    python -m rlq.train resume=runs/dqn-CartPole-s0-...   # continue a stopped run
    python -m rlq.train -m agent=dqn,double_dqn seed=0,1,2

Bad input (unknown agent/env/key, wrong type, bad range) prints one line and exits with status 2
before any run directory is created.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlq.config import ConfigError, apply_env_preset, config_dir, group_options, register_resolvers, validate

register_resolvers()

# keys a resumed run may change (everything else comes from the run's saved config)
RESUMABLE_OVERRIDES = ("resume", "total_steps", "log.", "checkpoint.", "eval.", "threads", "device")
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


def _check_group_choices(overrides: list[str]) -> None:
    for arg in overrides:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if sep and key in ("agent", "quant", "env") and not _is_sweep(value):
            opts = group_options(key)
            if value not in opts:
                raise ConfigError(f"unknown {key} {value!r}: choose one of {', '.join(opts)}")


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``key=value`` overrides as a dict with parsed values (Hydra's grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.key_or_group: o.value() for o in parsed if not o.is_delete()}


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(config_dir()), version_base=None):
            return compose(config_name="config", overrides=overrides)
    except (ConfigCompositionException, OverrideParseException, OmegaConfBaseException) as e:
        msg = str(e)
        cause = str(e.__cause__ or "")
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
    groups = ("agent", "env", "quant")
    user = {k: v for k, v in _parse_overrides([o for o in overrides if "=" in o]).items()
            if k not in groups and not k.startswith("hydra")}
    plain = apply_env_preset(cfg, user, spec.kind == "atari")
    plain.pop("hydra", None)
    validate(plain)
    return plain


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
                          f"(allowed: total_steps, eval.*, checkpoint.*, log.*, threads, device)")
    cfg = OmegaConf.load(saved)
    for k, v in _parse_overrides(overrides).items():
        if k != "resume":
            OmegaConf.update(cfg, k, v, merge=False)
    cfg.resume = str(run_dir)
    validate(cfg)
    return cfg


def preflight(overrides: list[str]) -> DictConfig:
    """Validate a single run's overrides before Hydra creates anything on disk."""
    _check_group_choices(overrides)
    parsed = _parse_overrides([o for o in overrides if "=" in o])
    if parsed.get("resume") not in (None, "null"):
        return resume_config(str(parsed["resume"]), [o for o in overrides if not o.startswith("hydra")])
    cfg = _compose([o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    return build_config(cfg, overrides)


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
    print(f"done: {summary['step']} steps in {summary['wall_s']:.0f}s ({summary['sps']:.0f} steps/s){ev_txt}; "
          f"run directory {run_dir}")
    return summary


def _task(hcfg: DictConfig) -> dict[str, Any] | None:
    from hydra.core.hydra_config import HydraConfig

    from rlq.checkpoint import CheckpointError
    from rlq.trainer import TrainingStopped

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    created = not (run_dir / "config.yaml").exists()
    try:
        if hcfg.resume:
            cfg = resume_config(str(hcfg.resume), overrides)
            run_dir = Path(str(hcfg.resume))
        else:
            cfg = build_config(hcfg, overrides)
        return run(cfg, run_dir)
    except (ConfigError, CheckpointError) as e:
        if created and not hcfg.resume:
            _cleanup_run_dir(run_dir)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        if "stopped by" not in str(e):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(130 if "SIGINT" in str(e) else 1)


def main(argv: list[str] | None = None) -> None:
    import hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = rewrite_env_args(argv)
        multirun = any(a in ("-m", "--multirun") for a in argv)
        if not multirun and not any(a.split("=")[0] in _HYDRA_FLAGS for a in argv):
            preflight([a for a in argv if not a.startswith("-")])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0]] + argv
    hydra.main(config_path=str(config_dir()), config_name="config", version_base=None)(_task)()


if __name__ == "__main__":
    main()
