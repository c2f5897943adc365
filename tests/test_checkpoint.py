"""Checkpoint files: atomic writes, retention, and refusing bad or hostile files without running them."""
import os
import pickle

import pytest
import torch

from rlq.checkpoint import (CheckpointError, atomic_save, list_checkpoints, load_checkpoint, resolve_checkpoint,
                            save_checkpoint)


def test_save_keeps_newest_and_resolves_run_dir(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"x": torch.tensor([step])}, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_0000000030.pt", "step_0000000040.pt"]
    assert resolve_checkpoint(tmp_path).name == "step_0000000040.pt"
    assert int(load_checkpoint(tmp_path)["x"]) == 40
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    atomic_save({"format": "rlq-checkpoint", "v": 1}, path)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


@pytest.mark.parametrize("content, match", [
    (b"", "is empty"),
    (b"not a checkpoint at all", "not a readable rlq checkpoint"),
    (None, "not an rlq checkpoint"),  # a valid torch file without our header
])
def test_bad_files_get_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(tmp_path, 1, {"w": torch.randn(1000)})
    full = resolve_checkpoint(tmp_path).read_bytes()
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupted or foreign"):
        load_checkpoint(path)


def test_missing_checkpoint_and_empty_run_dir(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no checkpoint found in run directory"):
        load_checkpoint(tmp_path)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_pickle_payload_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"format": "rlq-checkpoint", "version": 1, "agent": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()
