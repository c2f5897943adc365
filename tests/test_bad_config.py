"""A catalogue of bad `python -m rlq.train` inputs: each one gives exactly one line that names the bad value and
what is allowed, a non-zero exit code, and leaves no run directory behind. All cases run in one subprocess
(``rlq.train.main`` per case, ``SystemExit`` caught) so the catalogue stays cheap."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

DRIVER = r"""
import contextlib, io, json, sys
from rlq import train
out = []
for args in json.loads(sys.argv[1]):
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            train.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    out.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(out))
"""

CASES = [  # (arguments, text the one error line must contain)
    # unknown names
    (["agent=nope"], "unknown agent 'nope': choose one of double_dqn, dqn, dsac, dueling_dqn, eaudeqn"),
    (["env=NoSuchEnv"], "unknown env 'NoSuchEnv': use a short name (CartPole"),
    (["quant=int3"], "unknown quant 'int3': choose one of none, w2a8, w4a8, w8a8"),
    (["hydra/launcher=nope"], "unknown hydra/launcher 'nope': choose one of basic, joblib"),
    (["hydra/sweeper=nope"], "unknown hydra/sweeper 'nope': choose one of basic"),
    (["+experiment=nope"], "unknown experiment 'nope': choose one of"),
    (["agent.nope=1"], "unknown config key 'agent.nope': valid keys under 'agent' are"),
    (["eval.nope=1"], "unknown config key 'eval.nope': valid keys under 'eval' are episodes, every"),
    (["device=tpu"], "device='tpu' is not a device: use cpu or cuda[:N]"),
    (["nonfinite=maybe"], "nonfinite='maybe' is not a choice: use stop or skip"),
    (["overlap=maybe"], "overlap='maybe' is not a boolean: use true or false"),
    (["malloc_tuning=maybe"], "malloc_tuning='maybe' is not a boolean: use true or false"),
    (["agent=sac", "env=Pendulum", "overlap=true"], "overlap=true is not supported by agent 'sac': use overlap=false, "
                                                    "or one of"),
    (["agent.amp=fp16"], "agent.amp='fp16' is not a choice: use none or bf16"),
    (["agent.amp=bf16", "quant=w8a8"], "agent.amp=bf16 cannot be combined with quant=w8a8"),
    (["agent.encoder=conv"], "agent.encoder='conv' is not an encoder: choose one of auto, cnn, mlp"),
    (["quant=w8a8", "quant.weight_mode=foo"], "quant.weight_mode='foo': choose one of max, lsq, quest"),
    # wrong types
    (["total_steps=abc"], "total_steps='abc' is not an integer"),
    (["seed=1.5"], "seed=1.5 is not an integer"),
    (["agent.batch_size=2.5"], "agent.batch_size=2.5 is not an integer"),
    (["eval.target_return=abc"], "eval.target_return='abc' is not a number"),
    (["agent.hidden=abc"], "agent.hidden=abc must be a list of positive layer widths"),
    # negative, zero or out-of-range sizes and rates
    (["total_steps=-5"], "total_steps=-5 is out of range: must be >= 1"),
    (["total_steps=0"], "total_steps=0 is out of range: must be >= 1"),
    (["seed=-1"], "seed=-1 is out of range: must be >= 0"),
    (["env.num_envs=0"], "env.num_envs=0 is out of range: must be >= 1"),
    (["agent.lr=0"], "agent.lr=0 is out of range: must be > 0"),
    (["agent.gamma=1.5"], "agent.gamma=1.5 is out of range: must be <= 1"),
    (["agent.batch_size=0"], "agent.batch_size=0 is out of range: must be >= 1"),
    (["agent.train_freq=0"], "agent.train_freq=0 is out of range: must be >= 1"),
    (["agent.n_step=0"], "agent.n_step=0 is out of range: must be >= 1"),
    (["agent.eps_start=2"], "agent.eps_start=2 is out of range: must be <= 1"),
    (["agent.tau=2"], "agent.tau=2 is out of range: must be <= 1"),
    (["agent.target_update_period=0"], "agent.target_update_period=0 is out of range: must be >= 1"),
    (["agent.hidden=[256,0]"], "agent.hidden=[256, 0] must be a list of positive layer widths"),
    (["eval.episodes=0"], "eval.episodes=0 is out of range: must be >= 1"),
    (["checkpoint.every=-1"], "checkpoint.every=-1 is out of range: must be >= 0"),
    (["checkpoint.keep_best=maybe"], "checkpoint.keep_best='maybe' is not a boolean: use true or false"),
    (["log.every=0"], "log.every=0 is out of range: must be >= 1"),
    (["threads=-1"], "threads=-1 is out of range: must be >= 0"),
    (["env.eval_epsilon=2"], "env.eval_epsilon=2 is out of range: must be <= 1"),
    (["agent=rainbow", "agent.per_alpha=-1"], "agent.per_alpha=-1 is out of range: must be >= 0"),
    (["agent=rainbow", "agent.per_beta0=1.5"], "agent.per_beta0=1.5 is out of range: must be <= 1"),
    (["agent=rainbow", "agent.atoms=1"], "agent.atoms=1 is out of range: must be >= 2"),
    (["quant.weight_bits=9"], "quant.weight_bits=9: weight bits must be an integer in 1..8"),
    (["quant=w8a8", "quant.start_step=-1"], "quant.start_step=-1: must be >= 0"),
    (["env=Pong", "env.frame_stack=0"], "env.frame_stack=0 is out of range: must be >= 1"),
    (["env=Pong", "env.sticky_actions=1.5"], "env.sticky_actions=1.5 is out of range: must be <= 1"),
    # incompatible combinations
    (["agent.buffer_size=10", "agent.batch_size=64"], "agent.buffer_size=10 is smaller than agent.batch_size=64"),
    (["agent=rainbow", "agent.v_min=10", "agent.v_max=-10"], "agent.v_max=-10 must be greater than agent.v_min=10"),
    (["agent.encoder=cnn"], "encoder 'cnn' needs image observations (C, H, W), got shape (4,)"),
    (["env=Pong", "agent.encoder=mlp"], "encoder 'mlp' got image observations of shape (4, 84, 84)"),
    (["agent=dueling_dqn", "env=Pendulum"], "agent 'dueling_dqn' needs a discrete action space, got Box("),
    (["agent=rainbow", "env=MountainCarContinuous"], "agent 'rainbow' needs a discrete action space"),
    (["agent=sac", "env=CartPole"], "agent 'sac' needs a continuous (Box, 1-d) action space, got Discrete(2); use "
                                    "agent=sac_discrete"),
    (["agent=sac_discrete", "env=Pendulum"], "agent 'sac_discrete' needs a discrete action space, got Box("),
    (["agent=dsac", "env=Acrobot"], "agent 'dsac' needs a continuous (Box, 1-d) action space, got Discrete(3)"),
    (["agent=sac", "env=Pendulum", "agent.atoms=51"], "unknown config key 'agent.atoms': valid keys under 'agent' are"),
    (["agent=sac", "env=Pendulum", "agent.dueling=true"], "unknown config key 'agent.dueling'"),
    (["agent=dsac", "env=Pendulum", "agent.variant=v3"], "agent.variant='v3' is not a DSAC variant: choose t (DSAC-T) "
                                                         "or v1"),
    (["agent=sac", "env=Pendulum", "agent.policy_delay=0"], "agent.policy_delay=0 is out of range: must be >= 1"),
    (["agent=sac", "env=Pendulum", "agent.critic_lr=0"], "agent.critic_lr=0 is out of range: must be > 0"),
    (["agent=sac_discrete", "agent.target_entropy_scale=2"], "agent.target_entropy_scale=2 is out of range: must be "
                                                             "<= 1"),
    (["agent=eaudeqn", "agent.n_networks=1"], "agent.n_networks=1 is out of range: must be >= 2"),
    (["agent=eaudeqn", "agent.max_speed=0"], "agent.max_speed=0 is out of range: must be > 0 and <= 1"),
    (["agent=eaudeqn", "agent.prune_scope=row"], "agent.prune_scope='row' is not a pruning scope: choose layer or global"),
    (["agent=eaudeqn", "agent.tau=0.005"], "agent.tau=0.005: eaudeqn needs hard target copies (tau=1.0)"),
    (["agent=eaudeqn", "agent.noisy=true"], "agent.noisy=true is not supported by eaudeqn"),
    (["agent=eaudeqn", "env=Pendulum"], "agent 'eaudeqn' needs a discrete action space, got Box("),
    (["agent=eaudesac", "env=Pendulum", "agent.critic_sparsity=dense"], "agent.critic_sparsity='dense' is not a "
                                                                         "choice: use eaudeqn or none"),
    (["agent=eaudesac", "env=Pendulum", "agent.select_every=0"], "agent.select_every=0 is out of range: must be >= 1"),
    (["agent=eaudesac", "env=Pendulum", "quant=w8a8"], "agent.critic_sparsity=eaudeqn cannot be combined with "
                                                       "quant=w8a8"),
    (["resume=does/not/exist"], "resume='does/not/exist' is not an rlq run directory (no config.yaml)"),
    # places that cannot be written
    (["run_dir=/proc/rlq-test-run"], "run_dir=/proc/rlq-test-run: cannot write there (/proc"),
    (["run_dir=/dev/null/run"], "run_dir=/dev/null/run: cannot write there (/dev/null: not a directory)"),
]


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("bad")
    res = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([c for c, _ in CASES])], cwd=cwd,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    leftovers = [p for p in cwd.rglob("*") if p.is_file()]
    return out, leftovers


@pytest.mark.parametrize("i", range(len(CASES)), ids=[" ".join(c) for c, _ in CASES])
def test_bad_input_gives_one_clear_line(results, i):
    out, leftovers = results
    args, expected = CASES[i]
    lines = [ln for ln in out[i]["stderr"].splitlines() if ln.strip()]
    assert out[i]["code"] not in (0, None), (args, out[i])
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, lines)
    assert leftovers == []  # no run directory, config or log file was written by any case
