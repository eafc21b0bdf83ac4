"""Checkpoint integrity: each checkpoint's COMPLETE marker lists its files' sizes and SHA-256 sums; a damaged newest
checkpoint (random bytes written into it, or cut short) is named in a warning and `latest` falls back to the one
before; an explicit damaged path, or no intact checkpoint at all, is one clear error. Retention never deletes the
newest checkpoint with finite weights for one with non-finite weights."""

from __future__ import annotations

import json
import os

import pytest
import torch

from framework.checkpoint import MARKER, completed_checkpoints, resolve_resume
from framework.errors import ConfigError
from framework.technique import Technique
from helpers import make_trainer, reset_accelerate


def finished_run(tmp_path, epochs=3, keep=3, techniques=()):
    """4 steps per epoch: checkpoints at steps 4, 8, 12."""
    trainer = make_trainer(tmp_path, list(techniques), batch_size=4, n=16, epochs=epochs, keep_checkpoints=keep,
                           doctor=False)
    trainer.fit()
    reset_accelerate()
    return [p.name for p in completed_checkpoints(tmp_path)]


def scribble(path, count, seed=0):
    """Overwrite `count` bytes in the middle of `path` with random bytes (the file keeps its size)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - count // 2)
    noise = torch.randint(0, 256, (min(count, len(data)),), generator=torch.Generator().manual_seed(seed))
    data[start:start + len(noise)] = bytes(noise.tolist())
    path.write_bytes(bytes(data))


def test_marker_lists_every_file_with_size_and_checksum(tmp_path):
    finished_run(tmp_path)
    marker = json.loads((tmp_path / "checkpoints" / "step_00000012" / MARKER).read_text())
    files = marker["files"]
    on_disk = {p.name for p in (tmp_path / "checkpoints" / "step_00000012").iterdir()} - {MARKER}
    assert set(files) == on_disk and {"model.safetensors", "optimizer.bin"} <= on_disk
    import hashlib

    for name, entry in files.items():
        data = (tmp_path / "checkpoints" / "step_00000012" / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert marker["finite"] is True


@pytest.mark.parametrize("damage", ["optimizer.bin scribbled", "model.safetensors scribbled",
                                    "model.safetensors truncated", "optimizer.bin deleted"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    finished_run(tmp_path)
    name, how = damage.split()
    newest = tmp_path / "checkpoints" / "step_00000012" / name
    if how == "scribbled":
        scribble(newest, 4096 if name == "optimizer.bin" else 64)
    elif how == "truncated":
        os.truncate(newest, newest.stat().st_size // 2)
    else:
        newest.unlink()
    with pytest.warns(UserWarning, match=f"step_00000012.*{name}"):
        assert resolve_resume("latest", tmp_path).name == "step_00000008"
    # And training resumes from it: the run continues from step 8 to the end.
    with pytest.warns(UserWarning, match="step_00000012"):
        trainer = make_trainer(tmp_path, batch_size=4, n=16, epochs=4, resume_from="latest", doctor=False)
    trainer.fit()
    assert trainer.state.step == 16


def test_explicit_damaged_checkpoint_and_no_intact_one_are_clear_errors(tmp_path):
    finished_run(tmp_path)
    for step in (4, 8, 12):
        scribble(tmp_path / "checkpoints" / f"step_{step:08d}" / "model.safetensors", 64, seed=step)
    with pytest.raises(ConfigError, match=r"step_00000008.*model.safetensors.*checksum"):
        resolve_resume(str(tmp_path / "checkpoints" / "step_00000008"), tmp_path)
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="no intact checkpoint"):
        resolve_resume("latest", tmp_path)


class PoisonAfter(Technique):
    """Makes the weights non-finite after a given step (a run that diverged)."""

    def __init__(self, step):
        self.step = step

    def after_optimizer_step(self, state):
        if state.step >= self.step:
            with torch.no_grad():
                state.accelerator.unwrap_model(state.model).weight.fill_(float("nan"))


def test_retention_keeps_the_newest_checkpoint_with_finite_weights(tmp_path):
    kept = finished_run(tmp_path, epochs=4, keep=1, techniques=[PoisonAfter(6)])
    # keep_checkpoints 1 would keep only step 16; step 4, the last with finite weights, is kept as well.
    assert kept == ["step_00000004", "step_00000016"]
    markers = {name: json.loads((tmp_path / "checkpoints" / name / MARKER).read_text()) for name in kept}
    assert markers["step_00000004"]["finite"] is True and markers["step_00000016"]["finite"] is False
    with pytest.warns(UserWarning, match="non-finite"):
        assert resolve_resume("latest", tmp_path).name == "step_00000004"
