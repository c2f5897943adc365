"""Shared by the experiment scripts that train one long run in a subprocess (``pong.py``, ``pong_rainbow.py``,
``atari_eaudeqn.py``): start it, or resume it where it stopped when its run directory already holds one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def train_or_resume(run_dir: str | Path, new: list[str], resume: list[str] = ()) -> int:
    """``python -m rlq.train resume=<run_dir> *resume`` when ``run_dir`` holds a run (its ``config.yaml``),
    else ``python -m rlq.train run_dir=<run_dir> *new`` (so an override in ``new`` still wins); the command is
    printed first. Returns its exit code."""
    run = Path(run_dir)
    if (run / "config.yaml").exists():
        cmd = [sys.executable, "-m", "rlq.train", f"resume={run}", *resume]
    else:
        cmd = [sys.executable, "-m", "rlq.train", f"run_dir={run}", *new]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)
