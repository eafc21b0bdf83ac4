"""A Trainer's output directory: one run at a time in it (its lock), the checkpoint a run resumes from and the
settings changed since, or, for a fresh start with --overwrite, the earlier run's files emptied out; and the
checkpoints the run writes there."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator

from framework.backend import Backend, local_weights_finite, on_main_process, weights_finite
from framework.checkpoint import (
    acquire_run_lock,
    batch_position_for_world_size,
    check_overwritable,
    check_resumable,
    clear_run,
    load_checkpoint,
    newest_healthy_checkpoint,
    release_run_lock,
    resolve_resume,
    save_checkpoint,
    saved_batch_position,
    saved_world_size,
)
from framework.config import TrainerConfig, config_to_yaml, resume_changes
from framework.optim import scale_learning_rates_
from framework.state import TrainState
from framework.tracking import drop_metrics_after


@dataclass
class RunDir:
    """What `open_run_dir` found: the checkpoint to resume from (None: a fresh start), the number of processes that
    wrote it, the settings changed since (key, checkpoint's value, this run's value), and whether this run holds the
    directory's lock (the modes that train nothing do not take it)."""

    output_dir: str
    resume_path: Path | None = None
    resumed_world: int = 1
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    holds_lock: bool = False

    def release(self, accelerator: Accelerator) -> None:
        if self.holds_lock and accelerator.is_main_process:
            release_run_lock(self.output_dir)


def open_run_dir(accelerator: Accelerator, config: TrainerConfig, backend: Backend) -> RunDir:
    """Take the output_dir's lock, find the checkpoint to resume from and refuse what cannot continue it (another
    backend, a changed setting that shapes the saved state, a world size whose position cannot be carried over);
    or, for a fresh start with --overwrite, empty the earlier run's directory. A refusal leaves the directory as it
    was, lock included."""
    # The modes that train nothing (LR preview, LR finder, evaluate_only) work beside any run already there:
    # they neither refuse an output_dir with checkpoints nor delete anything in it.
    trains = not (config.preview_lr or config.find_lr or config.evaluate_only)
    # One run per output_dir: the main process takes its lock first (every rank learns whether it got it).
    if trains:
        on_main_process(accelerator, lambda: acquire_run_lock(config.output_dir),
                        f"output_dir {config.output_dir} is in use by another run (see rank 0).")
    run = RunDir(config.output_dir, resumed_world=backend.num_processes, holds_lock=trains)
    try:
        run.resume_path = resolve_resume(config.resume_from, config.output_dir, config.overwrite) if trains else None
        if run.resume_path is not None:
            check_resumable(run.resume_path, backend)
            run.resumed_world = saved_world_size(run.resume_path)
            if run.resumed_world != backend.num_processes:  # elastic: refuse now what cannot continue exactly
                batch_position_for_world_size(saved_batch_position(run.resume_path), run.resumed_world,
                                              backend.num_processes, config.gradient_accumulation_steps)
            if (run.resume_path / "config.yaml").is_file():  # what the checkpoint was written with
                saved = yaml.safe_load((run.resume_path / "config.yaml").read_text())
                run.changes = resume_changes(saved, config)
        if trains and run.resume_path is None and config.overwrite:
            check_overwritable(config.output_dir)
            if accelerator.is_main_process:
                clear_run(config.output_dir)
    except BaseException:  # refused: the directory is left as it was, lock included
        run.release(accelerator)
        raise
    accelerator.wait_for_everyone()
    return run


class Checkpoints:
    """The checkpoints a training run writes and reloads: the model, the optimizer, `state`, the state of its
    techniques that have some and the position of its training data where that restores its own (a stream: every
    rank's position), at most one per step. Whether every rank's weights are finite (in each checkpoint's marker) rides in
    the log line's one read, so a checkpoint written right after a log line (the last step's, most epoch ends) needs
    no host sync of its own."""

    def __init__(self, accelerator: Accelerator, config: TrainerConfig, backend: Backend, state: TrainState):
        self.accelerator, self.config, self.backend, self.state = accelerator, config, backend, state
        self.registered = [state, *[t for t in state.techniques if t.has_state],
                           *([state.train_data] if getattr(state.train_data, "restores_position", False) else [])]
        accelerator.register_for_checkpointing(*self.registered)
        self.last_step = -1  # the step of the newest checkpoint this run wrote or loaded
        self._finite_at = (-1, True)  # (step, every rank's weights finite), read with that step's log line
        state.read_with_log_line(lambda: local_weights_finite(accelerator, state.model), self._note_finite)

    def _note_finite(self, per_rank: list[list[float]]) -> None:
        self._finite_at = (self.state.step, min(map(min, per_rank)) > 0)

    def save(self) -> None:
        """Checkpoint the current step, unless it is saved already."""
        step = self.state.step
        if self.last_step == step:
            return
        finite = self._finite_at[1] if self._finite_at[0] == step else weights_finite(self.accelerator,
                                                                                      self.state.model)
        save_checkpoint(self.accelerator, self.config.output_dir, step, self.config.keep_checkpoints, self.backend,
                        finite=finite, files={"config.yaml": config_to_yaml(self.config)})
        self.last_step = step

    def load(self, path: Path) -> None:
        """Restore everything a checkpoint holds, on every rank (a resume; a rollback mid-run)."""
        load_checkpoint(self.accelerator, path, self.state.model, self.registered, self.state.optimizer)
        self.last_step = self.state.step  # that step is saved; steps taken again are saved afresh
        self._finite_at = (-1, True)  # weights read at a step with this number are gone

    def lr_schedulers(self) -> list[Any]:
        """The techniques' LR schedulers: a rollback or a changed LR on resume rescales them with the optimizer."""
        return [s for t in self.state.techniques for s in t.lr_schedulers()]

    def roll_back(self, to: Path | None, lr_factor: float) -> Path | None:
        """`Trainer.rollback`: reload checkpoint `to` (default: the newest healthy one) and scale every learning
        rate by `lr_factor`; the loop continues from the restored position (`state.rolled_back`)."""
        checkpoint = to if to is not None else newest_healthy_checkpoint(self.state.output_dir)
        if checkpoint is None:
            return None
        self.load(checkpoint)
        scale_learning_rates_(self.state.optimizer, self.lr_schedulers(), lr_factor)
        self.state.rolled_back = True
        return checkpoint


def resume(accelerator: Accelerator, run: RunDir, state: TrainState, checkpoints: Checkpoints, accumulation: int
           ) -> None:
    """Load `run.resume_path` (model, optimizer and the registered state); under another number of processes,
    continue the epoch after the same samples; apply the settings changed since the checkpoint."""
    accelerator.print(f"resuming from {run.resume_path}")
    checkpoints.load(run.resume_path)
    if run.resumed_world != accelerator.num_processes:  # elastic: the same samples seen, other batches
        state.batch_in_epoch = batch_position_for_world_size(
            state.batch_in_epoch, run.resumed_world, accelerator.num_processes, accumulation)
        accelerator.print(f"resume: {run.resumed_world} -> {accelerator.num_processes} processes; "
                          f"continuing the epoch after the same {state.batch_in_epoch} batches per process")
    apply_resume_changes(run.changes, state.optimizer, checkpoints.lr_schedulers(), accelerator.is_main_process)
    if accelerator.is_main_process:
        drop_metrics_after(state.output_dir, state.step)


def apply_resume_changes(changes: list[tuple[str, Any, Any]], optimizer: torch.optim.Optimizer,
                         lr_schedulers: list[Any], main_process: bool) -> None:
    """Settings changed since the checkpoint (only those `resume_changes` allows) take effect after its state is
    loaded: the restored optimizer and schedules would otherwise keep the old LR and weight decay."""
    for key, old, new in changes:
        if key == "optimizer.lr":
            scale_learning_rates_(optimizer, lr_schedulers, new / old)
        elif key == "optimizer.weight_decay":
            for group in optimizer.param_groups:
                if group.get("weight_decay", 0.0) > 0:  # the no-decay groups stay at 0
                    group["weight_decay"] = new
    if changes and main_process:
        print("resume: changed since the checkpoint: "
              + ", ".join(f"{key} {old} -> {new}" for key, old, new in changes))
