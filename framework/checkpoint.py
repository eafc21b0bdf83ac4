"""Checkpoints around `accelerator.save_state` / `load_state`, written atomically.

Layout: `output_dir/checkpoints/step_00000123/` holding accelerate's files plus a `COMPLETE` marker. A checkpoint
is written to a hidden temporary directory, flushed to disk, marked, then renamed into place, so a crash while
saving never leaves a half-written directory that `latest` would pick.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from accelerate import Accelerator

from framework.errors import ConfigError
from framework.technique import Backend

MARKER = "COMPLETE"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clear_run(output_dir: str | os.PathLike) -> None:
    """Delete an earlier run's checkpoints and metrics.jsonl (for `--overwrite true`)."""
    shutil.rmtree(checkpoint_root(output_dir), ignore_errors=True)
    Path(output_dir, "metrics.jsonl").unlink(missing_ok=True)


def save_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike, step: int, keep: int,
                    backend: Backend | None = None) -> Path:
    """Save the full training state for `step` on every rank; keep the newest `keep` checkpoints. Returns the path.

    The marker records the backend that wrote it, so a resume on an incompatible one is refused with the fix.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    temporary = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(temporary)
        with open(temporary / MARKER, "w") as marker:
            marker.write(json.dumps({"step": step, "backend": dataclasses.asdict(backend or Backend())}) + "\n")
            marker.flush()
            os.fsync(marker.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
        _fsync_dir(root)
        for old in completed_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def completed_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under output_dir, oldest first; incomplete ones are skipped with a warning."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if not match:
            continue
        if (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
        else:
            warnings.warn(f"skipping checkpoint {path}: it has no {MARKER} marker (the save was interrupted)")
    return [path for _, path in sorted(found)]


def check_resumable(path: Path, backend: Backend) -> None:
    """Refuse a checkpoint whose layout this backend cannot load (DeepSpeed's is sharded per rank and stage)."""
    written = json.loads((path / MARKER).read_text())["backend"]
    was, now = written.get("deepspeed_stage"), backend.deepspeed_stage
    if was == now and (was is None or written["num_processes"] == backend.num_processes):
        return
    wrote = f"DeepSpeed ZeRO-{was} on {written['num_processes']} processes" if was else "a run without DeepSpeed"
    runs = f"DeepSpeed ZeRO-{now} on {backend.num_processes} processes" if now else "a run without DeepSpeed"
    fix = "resume with the launch config that wrote it"
    if was is not None:
        fix += (f", or start a new run from its consolidated weights (`python {path}/zero_to_fp32.py {path} DIR "
                "--safe_serialization`, or the run's model.safetensors)")
    raise ConfigError(f"checkpoint {path} was written by {wrote} and cannot be loaded by {runs}: {fix}.")


def resolve_resume(resume_from: str | None, output_dir: str | os.PathLike, overwrite: bool = False) -> Path | None:
    """The checkpoint to resume from: `latest` (None when there is none yet: a fresh start), or a checked path.

    A fresh start in a directory that holds an earlier run's checkpoints is refused unless `overwrite`: the two
    runs' checkpoints and metrics would mix, and pruning could delete the new run's checkpoints.
    """
    if resume_from is None:
        if completed_checkpoints(output_dir) and not overwrite:
            raise ConfigError(
                f"output_dir {output_dir} holds checkpoints of an earlier run. Pass `--resume_from latest` to continue "
                "it, `--overwrite true` to start over (deleting them), or another --output_dir."
            )
        return None
    if resume_from == "latest":
        checkpoints = completed_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not (path / MARKER).is_file():
        raise ConfigError(
            f"resume_from: {path} is not a complete checkpoint (no {MARKER} marker). "
            f"Pass a directory under {checkpoint_root(output_dir)} or `latest`."
        )
    return path
