import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(module: str, *args: str, cwd: Path, timeout: float = 300, env_extra: dict | None = None):
    """Run ``python -m <module> args...`` in ``cwd``; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def cli(tmp_path):
    def _run(module, *args, **kw):
        return run_cli(module, *args, cwd=kw.pop("cwd", tmp_path), **kw)

    return _run
