"""Run logging: ``metrics.jsonl`` (one JSON object per record), TensorBoard scalars and a console
progress line. All three receive the same figures."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


class ProgressLine:
    """A one-line console progress display: redrawn in place on a terminal, a plain line every
    ``interval`` seconds otherwise (log files, CI)."""

    def __init__(self, total: int, enabled: bool = True, interval: float = 10.0, stream=None):
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.interval = interval if not self.tty else 0.2
        self.last = 0.0

    def update(self, step: int, fields: dict[str, Any], force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        frac = min(step / self.total, 1.0) if self.total else 1.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        parts = " ".join(f"{k} {_fmt(v)}" for k, v in fields.items() if v is not None)
        line = f"[{bar}] {step}/{self.total} {parts}"
        if self.tty:
            self.stream.write("\r" + line[: os.get_terminal_size(self.stream.fileno()).columns - 1] + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


class RunLogger:
    """Writes scalars to ``<run_dir>/metrics.jsonl`` and TensorBoard (``<run_dir>/tb``)."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, resume_step: int | None = None):
        """``resume_step``: the run continues from its checkpoint at this step, so records after it (written
        by the interrupted process, past its last checkpoint) and a torn last line are dropped first."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            _truncate_metrics(path, resume_step)
        self._jsonl = open(path, "a", buffering=1, encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        """One record: ``{"step": step, "kind": kind, "time": unix, <metrics>}``; NaN/inf become null."""
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items() if v is not None}
        self._jsonl.write(json.dumps({"step": int(step), "kind": kind, "time": round(time.time(), 3), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the whole records with ``step <= step`` (atomically: a temporary file renamed over ``path``)."""
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
            keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (optionally of one kind); a torn last line is skipped."""
    out = []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or rec.get("kind") == kind:
            out.append(rec)
    return out
