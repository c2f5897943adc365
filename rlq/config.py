"""Config helpers: locating ``configs/``, run-directory names, the Atari preset merge, and validation
that turns bad input into one clear line (``ConfigError``)."""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """Bad user input. The message is one line naming the bad value and what is allowed."""


def config_dir() -> Path:
    """The ``configs/`` directory: beside the package in a checkout or editable install, or shipped
    inside the package (``rlq/configs``) in a wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs", here / "configs"):
        if (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError(f"rlq configs not found next to {here}")


def group_options(group: str) -> list[str]:
    d = config_dir() / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def run_name(agent: str, env: str, seed: Any) -> str:
    safe_env = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(env))
    return f"{agent}-{safe_env}-s{seed}"


def default_run_dir(run_dir: Any, resume: Any, agent: str, env: str, seed: Any) -> str:
    if run_dir not in (None, "None", "null", ""):
        return str(run_dir)
    if resume not in (None, "None", "null", ""):
        return str(resume)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return str(Path("runs") / f"{run_name(agent, env, seed)}-{stamp}")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("rlq_run_dir"):
        OmegaConf.register_new_resolver("rlq_run_dir", default_run_dir)
    if not OmegaConf.has_resolver("rlq_output_subdir"):  # a resumed run keeps its original .hydra/
        OmegaConf.register_new_resolver("rlq_output_subdir",
                                        lambda resume: None if resume not in (None, "None", "null", "") else ".hydra")
    if not OmegaConf.has_resolver("rlq_unless"):  # ${rlq_unless:${.noisy},1.0}: 0 when the flag is on
        OmegaConf.register_new_resolver("rlq_unless", lambda flag, value: 0.0 if flag else value)
    if not OmegaConf.has_resolver("rlq_run_name"):
        OmegaConf.register_new_resolver("rlq_run_name", run_name)


def apply_env_preset(cfg: DictConfig, user_overrides: dict[str, Any], is_atari: bool) -> DictConfig:
    """Return a plain (non-struct) copy of ``cfg`` with the ``atari:`` blocks applied for Atari envs.

    Two blocks exist: the top-level ``atari:`` of ``config.yaml`` (eval/checkpoint cadence) and the
    agent's ``agent.atari:`` (its Atari hyper-parameters). For an Atari env each replaces the values it
    names, then the user's explicit ``key=value`` overrides are applied again so the command line wins.
    """
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    top = plain.pop("atari", None)
    agent = plain.agent.pop("atari", None) if "agent" in plain else None
    if is_atari:
        if top:
            plain = OmegaConf.merge(plain, top)
        if agent:
            plain.agent = OmegaConf.merge(plain.agent, agent)
        for k, v in user_overrides.items():
            OmegaConf.update(plain, k, v, merge=False)
    return plain


# -- validation -------------------------------------------------------------------------------------------
def _num(cfg: DictConfig, key: str, kind: type, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, allow_zero: bool = True) -> None:
    val = OmegaConf.select(cfg, key)
    if val is None:
        raise ConfigError(f"{key} is missing (expected {kind.__name__})")
    ok_types = (int, float) if kind is float else (int,)
    if kind is int and isinstance(val, float) and val.is_integer():
        OmegaConf.update(cfg, key, int(val), merge=False)  # allow total_steps=2e6
        val = int(val)
    if isinstance(val, bool) or not isinstance(val, ok_types):
        raise ConfigError(f"{key}={val!r} is not a{'n integer' if kind is int else ' number'}")
    if lo is not None and (val < lo or (lo_open and val == lo)):
        rel = ">" if lo_open else ">="
        raise ConfigError(f"{key}={val} is out of range: must be {rel} {lo}" + (f" and <= {hi}" if hi is not None else ""))
    if hi is not None and val > hi:
        raise ConfigError(f"{key}={val} is out of range: must be <= {hi}")


def validate(cfg: DictConfig) -> None:
    """Check a composed config before anything is built or written. Raises ``ConfigError``."""
    from rlq.agents import agent_names

    _num(cfg, "seed", int, 0)
    _num(cfg, "total_steps", int, 1)
    _num(cfg, "threads", int, 0)
    _num(cfg, "env.num_envs", int, 1)
    _num(cfg, "eval.every", int, 0)
    _num(cfg, "eval.episodes", int, 1)
    _num(cfg, "eval.num_envs", int, 1)
    _num(cfg, "checkpoint.every", int, 0)
    _num(cfg, "checkpoint.keep", int, 0)
    _num(cfg, "log.every", int, 1)
    _num(cfg, "env.eval_epsilon", float, 0, 1)
    if cfg.eval.get("target_return") is not None:
        _num(cfg, "eval.target_return", float, None, None)
    if not isinstance(cfg.checkpoint.get("keep_best", False), bool):
        raise ConfigError(f"checkpoint.keep_best={cfg.checkpoint.keep_best!r} is not a boolean: use true or false")
    if not isinstance(cfg.get("malloc_tuning", True), bool):
        raise ConfigError(f"malloc_tuning={cfg.malloc_tuning!r} is not a boolean: use true or false")
    if not isinstance(cfg.get("overlap", False), bool):
        raise ConfigError(f"overlap={cfg.overlap!r} is not a boolean: use true or false")
    if cfg.get("nonfinite", "stop") not in ("stop", "skip"):
        raise ConfigError(f"nonfinite={cfg.nonfinite!r} is not a choice: use stop or skip")
    if cfg.device not in ("cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise ConfigError(f"device={cfg.device!r} is not a device: use cpu or cuda[:N]")
    a = cfg.agent
    if a.name not in agent_names():
        raise ConfigError(f"unknown agent name {a.name!r}: choose one of {', '.join(agent_names())}")
    if cfg.get("overlap", False):
        from rlq.agents.base import agent_class

        able = [n for n in agent_names() if agent_class(n).acting_nets]
        if not agent_class(a.name).acting_nets:
            raise ConfigError(f"overlap=true is not supported by agent {a.name!r}: use overlap=false, or one of "
                              f"{', '.join(able)}")
    for key, kind, lo, hi in (("gamma", float, 0, 1), ("lr", float, 0, None), ("batch_size", int, 1, None),
                              ("buffer_size", int, 1, None), ("learning_starts", int, 0, None),
                              ("train_freq", int, 1, None), ("gradient_steps", int, 1, None),
                              ("n_step", int, 1, None)):
        if key in a:
            _num(cfg, f"agent.{key}", kind, lo, hi, lo_open=(key == "lr"))
    if "buffer_size" in a and "batch_size" in a and a.buffer_size < a.batch_size:
        raise ConfigError(f"agent.buffer_size={a.buffer_size} is smaller than agent.batch_size={a.batch_size}")
    if "buffer_size" in a and a.buffer_size < cfg.env.num_envs * 8:
        raise ConfigError(f"agent.buffer_size={a.buffer_size} is too small for env.num_envs={cfg.env.num_envs}: "
                          f"needs >= {cfg.env.num_envs * 8}")
    for key in ("tau", "eps_start", "eps_end"):
        if key in a:
            _num(cfg, f"agent.{key}", float, 0, 1)
    if "target_update_period" in a:
        _num(cfg, "agent.target_update_period", int, 1)
    for key, kind, lo, hi, lo_open in (("per_alpha", float, 0, None, False), ("per_beta0", float, 0, 1, False),
                                       ("per_eps", float, 0, None, True), ("atoms", int, 2, None, False),
                                       ("sigma0", float, 0, None, False), ("adam_eps", float, 0, None, True),
                                       ("max_grad_norm", float, 0, None, False), ("eps_decay_steps", int, 0, None, False),
                                       ("head_hidden", int, 0, None, False), ("cnn_features", int, 0, None, False)):
        if key in a:
            _num(cfg, f"agent.{key}", kind, lo, hi, lo_open=lo_open)
    for key in ("actor_lr", "critic_lr", "alpha_lr", "alpha"):  # the SAC agents
        if key in a:
            _num(cfg, f"agent.{key}", float, 0, None, lo_open=True)
    if "policy_delay" in a:
        _num(cfg, "agent.policy_delay", int, 1)
    if "target_entropy_scale" in a:
        _num(cfg, "agent.target_entropy_scale", float, 0, 1)
    if "max_speed" in a:  # EauDeQN (agent=eaudeqn; the critics of agent=eaudesac)
        _num(cfg, "agent.n_networks", int, 2)
        _num(cfg, "agent.max_speed", float, 0, 1, lo_open=True)
        if a.get("prune_scope") not in ("layer", "global"):
            raise ConfigError(f"agent.prune_scope={a.get('prune_scope')!r} is not a pruning scope: choose layer or global")
        if "critic_sparsity" in a:
            if a.critic_sparsity not in ("none", "eaudeqn"):
                raise ConfigError(f"agent.critic_sparsity={a.critic_sparsity!r} is not a choice: use eaudeqn or none")
            _num(cfg, "agent.select_every", int, 1)
            if a.critic_sparsity == "eaudeqn" and cfg.quant.name != "none":
                raise ConfigError(f"agent.critic_sparsity=eaudeqn cannot be combined with quant={cfg.quant.name} "
                                  "(the stacked critic sets are pruned in float): use quant=none")
        elif a.get("tau", 1.0) < 1.0:
            raise ConfigError(f"agent.tau={a.tau}: {a.name} needs hard target copies (tau=1.0): the target is the "
                              "online network selected at each copy")
        if a.get("noisy", False):
            raise ConfigError(f"agent.noisy=true is not supported by {a.name} (it prunes Linear/Conv2d weights, "
                              "NoisyLinear is neither): use agent.noisy=false")
    for key in ("n_members", "n_critics"):  # Q-ensembles (agent=qensemble; the SAC critics)
        if key in a:
            _num(cfg, f"agent.{key}", int, 1)
    if a.get("distributional", False) and (a.get("n_critics", 2) != 2 or a.get("target_reduction", "min") != "min"):
        raise ConfigError(f"agent.n_critics={a.get('n_critics', 2)} / agent.target_reduction={a.get('target_reduction')!r}: "
                          f"{a.name} keeps its own distributional critics (use agent=sac or sac_n for critic ensembles)")
    from rlq.agents.qensemble import NATIVE_STEP
    if "native_step" in a and str(a.native_step).lower() not in NATIVE_STEP:
        raise ConfigError(f"agent.native_step={a.native_step!r} is not a choice: use auto, true or false")
    if "target_reduction" in a:
        if a.target_reduction not in ("min", "mean", "redq"):
            raise ConfigError(f"agent.target_reduction={a.target_reduction!r} is not a target reduction: choose "
                              f"one of min, mean, redq")
        n_key = "n_members" if "n_members" in a else "n_critics"
        if a.target_reduction == "redq":
            _num(cfg, "agent.redq_m", int, 1)
            if a.redq_m > a.get(n_key, 2):
                raise ConfigError(f"agent.redq_m={a.redq_m} is out of range: REDQ's subset needs 1 <= redq_m <= "
                                  f"agent.{n_key}={a.get(n_key, 2)}")
    if OmegaConf.select(cfg, "offline.dataset") is not None:
        from rlq.offline import check_offline_config

        check_offline_config(cfg)
    if "variant" in a and a.variant not in ("t", "v1"):
        raise ConfigError(f"agent.variant={a.variant!r} is not a DSAC variant: choose t (DSAC-T) or v1 (DSAC)")
    if "log_std_mode" in a and a.log_std_mode not in ("tanh", "clamp"):
        raise ConfigError(f"agent.log_std_mode={a.log_std_mode!r} is not a log-std mapping: choose tanh or clamp")
    if "log_std_min" in a and "log_std_max" in a:
        _num(cfg, "agent.log_std_min", float)
        _num(cfg, "agent.log_std_max", float)
        if not a.log_std_max > a.log_std_min:
            raise ConfigError(f"agent.log_std_max={a.log_std_max} must be greater than agent.log_std_min={a.log_std_min}")
    if "v_min" in a and "v_max" in a:
        _num(cfg, "agent.v_min", float)
        _num(cfg, "agent.v_max", float)
        if not a.v_max > a.v_min:
            raise ConfigError(f"agent.v_max={a.v_max} must be greater than agent.v_min={a.v_min} (the C51 support)")
    if "hidden" in a and not (OmegaConf.is_list(a.hidden) and all(isinstance(h, int) and not isinstance(h, bool)
                                                                   and h >= 1 for h in a.hidden)):
        raise ConfigError(f"agent.hidden={a.hidden} must be a list of positive layer widths, e.g. [256, 256]")
    for key, lo, hi in (("frame_skip", 1, None), ("frame_stack", 1, None), ("noop_max", 0, None),
                        ("sticky_actions", 0, 1)):
        if key in cfg.env:
            _num(cfg, f"env.{key}", float if key == "sticky_actions" else int, lo, hi)
    if "amp" in a:
        if a.amp not in ("none", "bf16"):
            raise ConfigError(f"agent.amp={a.amp!r} is not a choice: use none or bf16")
        if a.amp != "none" and cfg.quant.name != "none":
            raise ConfigError(f"agent.amp={a.amp} cannot be combined with quant={cfg.quant.name}: fake-quant "
                              "grids need fp32 (use agent.amp=none)")
    if "encoder" in a and a.encoder not in ("auto", "cnn", "mlp"):
        raise ConfigError(f"agent.encoder={a.encoder!r} is not an encoder: choose one of auto, cnn, mlp")
    from rlq.quant.api import QuantConfig

    try:
        QuantConfig.from_cfg(cfg.quant)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
