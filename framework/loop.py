"""The one training loop. Techniques plug into its hooks (framework/technique.py); accelerate does the rest."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from framework.accumulation import micro_batches
from framework.backend import (build_model, describe_backend, forget_unscaling, gradient_norm, make_accelerator,
                               set_determinism, unscale_gradients_once)
from framework.checkpoint import LOCK
from framework.config import TrainerConfig, config_to_yaml, configured_techniques, flatten
from framework.data.loaders import first_batches, shut_down_workers, to_channels_last
from framework.data.streaming import steps_per_epoch
from framework.evaluation import evaluate_model
from framework.modes import mode_instead_of_training
from framework.nn.norm import frozen_running_statistics
from framework.nn.sharded import is_partitioned
from framework.preemption import PreemptionWatch, exit_with_launcher, stop_preempted
from framework.run_dir import Checkpoints, open_run_dir, resume
from framework.state import TrainState
from framework.task import Task
from framework.technique import Technique, check_techniques, hook_table
from framework.techniques.lr_schedule import draw_schedule_at_start
from framework.tracking import (LogWindow, batch_layout, finish_run, log_train_step, log_validation, make_trackers,
                                plain_output, start_tracking)


class Trainer:
    """Trains `model` on `train_data` for `config.epochs` (or `config.max_steps`), running the techniques' hooks.

    Args:
        config: a `TrainerConfig` (usually the recipe's config, which inherits it); logged to the trackers in full.
        model / optimizer: plain torch objects; accelerate wraps them for the launched backend. Or factories
            (`model()`, `optimizer(model)`), called once the backend exists: under ZeRO-3 a transformers model is
            then built already partitioned across the ranks (`framework.backend.build_model`).
        task: forward, loss and evaluation outputs for this kind of model.
        train_data / eval_data / test_data: DataLoaders; eval runs every `config.eval_every` epochs, test at the end.
        techniques: plug-ins in hook order; default: built from `config.techniques`.
        accelerator: pass one to control it yourself; default: built from the launch config.
        pictures: drawn once when training starts, name -> function writing a PNG to the path it is given
            (`output_dir/NAME.png`); logged to the trackers (e.g. the augmentation grid).
        inference_files: file name -> JSON-able value, written to output_dir when training starts, so the run's
            weights can be used on their own (`model.json`: how to rebuild the model; `preprocessor.json`: class
            names and how evaluation reads an image). `python -m framework.predict` reads them.
        flops_per_token: the model's training FLOPs per token (`framework.models.causal_lm.flops_per_token`), for
            the logged `perf/tflops` per device and, on a GPU of known peak, `perf/mfu`; in summary.json's `model`.
            A function of the model where the model is a factory.
    """

    def __init__(
        self,
        config: TrainerConfig,
        model: torch.nn.Module | Callable[[], torch.nn.Module],
        optimizer: torch.optim.Optimizer | Callable[[torch.nn.Module], torch.optim.Optimizer],
        task: Task,
        train_data: DataLoader,
        eval_data: DataLoader | None = None,
        test_data: DataLoader | None = None,
        techniques: Sequence[Technique] | None = None,
        accelerator: Accelerator | None = None,
        pictures: dict[str, Callable[[Path], Any]] | None = None,
        inference_files: dict[str, Any] | None = None,
        flops_per_token: int | Callable[[torch.nn.Module], int | None] | None = None,
    ):
        exit_with_launcher()  # a rank whose launcher dies (SIGKILL) stops too, gracefully, instead of training on
        self.config = config
        self.task = task
        self.techniques = configured_techniques(config) if techniques is None else list(techniques)
        set_determinism(config.deterministic)
        deepspeed_values = {k: v for t in self.techniques for k, v in t.deepspeed_config().items()}
        self.accelerator = accelerator or make_accelerator(
            config.output_dir, config.gradient_accumulation_steps, make_trackers(config.tracker, config.output_dir),
            deepspeed_values, config.compile, find_unused_parameters=task.owns_step,
            non_blocking=getattr(train_data, "pin_memory", False),  # pinned batches: copy without waiting
        )
        # Every refusal comes here, before any data is touched or any step is taken.
        self.backend = describe_backend(self.accelerator)
        check_techniques(self.techniques, self.backend)
        task.check(self.backend, self.techniques, config.gradient_accumulation_steps)
        self.run = open_run_dir(self.accelerator, config, self.backend)  # its lock, the checkpoint to resume from
        self.resume_path = self.run.resume_path
        self.data = {"train": train_data, "val": eval_data, "test": test_data}
        self.batch = batch_layout(getattr(train_data, "batch_size", None), self.accelerator.num_processes,
                                  config.gradient_accumulation_steps)
        self.pictures = dict(pictures or {})
        self.inference_files = dict(inference_files or {})
        model = model if isinstance(model, torch.nn.Module) else build_model(self.accelerator, model)
        optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer(model)
        flops_per_token = flops_per_token(model) if callable(flops_per_token) else flops_per_token
        self.state = TrainState(self.accelerator, model, optimizer, Path(config.output_dir),
                                techniques=self.techniques, task=task, rollback_service=self.rollback,
                                flops_per_token=flops_per_token)
        if self.backend.deepspeed_stage == 3:  # summary.json: was the model ever whole on one rank?
            self.state.summary["model_built_partitioned"] = is_partitioned(model)
        self.checkpoints: Checkpoints | None = None  # made in fit, once the data is prepared
        self._hooks = hook_table(self.techniques)
        self._step_owner = next((t for t in self.techniques if t.owns_optimizer_step), None)
        self.model_summary: dict[str, Any] | None = None

    # --- the public entry points --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train, evaluate, test; write model.safetensors and summary.json. Returns the summary."""
        try:
            return self._fit()
        finally:
            for loader in self.data.values():
                if loader is not None:
                    shut_down_workers(loader)
            self.run.release(self.accelerator)

    def _fit(self) -> dict[str, Any]:
        accelerator, config, state = self.accelerator, self.config, self.state
        started = time.perf_counter()
        set_seed(config.seed)
        if config.overfit_batches:
            self.data["train"] = first_batches(self.data["train"], config.overfit_batches)
        self._call("before_prepare")
        if config.channels_last:
            state.model = state.model.to(memory_format=torch.channels_last)
        # One call for model, optimizer and training data: DeepSpeed reads its micro-batch size from the loader.
        state.model, state.optimizer, self.data["train"] = accelerator.prepare(
            state.model, state.optimizer, self.data["train"])
        for split in ("val", "test"):
            if self.data[split] is not None:
                self.data[split] = accelerator.prepare(self.data[split])
        state.train_data = self.data["train"]
        state.steps_per_epoch = steps_per_epoch(self.data["train"], config.max_steps, config.gradient_accumulation_steps)
        state.max_steps = config.max_steps or config.epochs * state.steps_per_epoch
        state.validates = self.data["val"] is not None and config.eval_every > 0
        mode = mode_instead_of_training(self)  # --preview_lr, --find_lr, --evaluate_only
        if mode is not None:
            return mode()
        if self.resume_path is None:
            draw_schedule_at_start(self)
        self._call("fit_start")
        self.checkpoints = Checkpoints(accelerator, config, self.backend, state)
        if self.resume_path is not None:
            resume(accelerator, self.run, state, self.checkpoints, config.gradient_accumulation_steps)
        files = {"config.yaml": config_to_yaml(config),
                 **{name: json.dumps(value, indent=2) + "\n" for name, value in self.inference_files.items()}}
        self.model_summary = start_tracking(accelerator, config, flatten(config), files, self.pictures, state,
                                            self.backend, self.batch, resumed=self.resume_path is not None)

        with PreemptionWatch(accelerator.num_processes > 1, enabled=config.handle_preemption) as preemption, \
                torch.autograd.set_detect_anomaly(config.detect_anomaly):
            self._train(preemption)
        if state.preempted:
            return stop_preempted(accelerator, state.step)

        results = dict(state.eval_metrics)
        if self.data["test"] is not None:
            results.update(self.evaluate(self.data["test"], "test"))
            for technique in self.techniques:  # e.g. the best checkpoint's weights, reported as test_best/*
                for prefix, swapped_in in technique.test_weights(state).items():
                    with swapped_in:
                        results.update(self.evaluate(self.data["test"], prefix, hooks=False))
        self._call("fit_end")
        seconds = time.perf_counter() - started
        return finish_run(accelerator, state, results, self.batch, self._epochs_done(), seconds,
                          [t.name or type(t).__name__ for t in self.techniques], self.model_summary,
                          config.overfit_batches, hidden=LOCK)

    def evaluate(self, loader: DataLoader, prefix: str = "val", hooks: bool = True) -> dict[str, float]:
        """Metrics of the model on `loader`, computed over all ranks' samples (each counted once). `hooks=False`
        evaluates the weights the model holds, without the eval_start / eval_end hooks (EMA's swap)."""
        if hooks:
            self._call("eval_start")
        metrics = evaluate_model(self.accelerator, self.state.model, self.task, loader, self.config.channels_last)
        if hooks:
            self._call("eval_end")
        return {f"{prefix}/{name}": value for name, value in metrics.items()}

    # --- the loop ---------------------------------------------------------------------------------------------
    def _train(self, preemption: PreemptionWatch) -> None:
        accelerator, config, state, task = self.accelerator, self.config, self.state, self.task
        hooks = self._hooks
        progress = tqdm(total=state.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not accelerator.is_local_main_process or plain_output())
        window = LogWindow(accelerator.device)
        state.model.train()
        while state.step < state.max_steps and not state.should_stop:
            self._call("epoch_start")
            loader = self.data["train"]
            batches = len(loader)  # micro-batches per epoch on this rank
            loader.set_epoch(state.epoch)
            # Resuming mid-epoch: continue after the batches already consumed (a stream restores its own position).
            if state.batch_in_epoch and not getattr(loader, "restores_position", False):
                loader = accelerator.skip_first_batches(loader, state.batch_in_epoch)
            window.wait_for_data()
            for micro in micro_batches(loader, state.batch_in_epoch, batches, config.gradient_accumulation_steps,
                                       task, accelerator):
                batch = micro.batch
                window.data_arrived()
                if config.channels_last:
                    batch = to_channels_last(batch)
                for hook in hooks["on_batch"]:
                    batch = hook(state, batch)
                if task.owns_step:  # e.g. a GAN: its updates go through `self.update`
                    loss, outputs = task.train_step(self, batch)
                    stepped = True
                    self._end_step()
                else:
                    with micro.sync_context(accelerator, state.model):
                        outputs = task.forward(state.model, batch)
                        loss = task.loss(outputs, batch)
                        for hook in hooks["on_loss"]:
                            loss = hook(state, loss, batch, outputs)
                        scale = micro.loss_scale(state.batch_in_epoch, batches, config.gradient_accumulation_steps,
                                                 accelerator.num_processes)
                        accelerator.backward(loss if isinstance(scale, float) and scale == 1 else loss * scale)
                        self._call("after_backward")
                        stepped = accelerator.sync_gradients and self._optimizer_step(batch, scale)
                        if stepped:
                            self._end_step()
                if state.rolled_back:  # a hook called `rollback` (nan_guard): continue from the restored position
                    state.rolled_back = False
                    window.reset()
                    progress.n = state.step
                    break
                state.batch_in_epoch += 1
                samples = task.batch_size(batch) * accelerator.num_processes
                tokens = task.batch_tokens(batch) * accelerator.num_processes
                state.samples_seen, state.tokens_seen = state.samples_seen + samples, state.tokens_seen + tokens
                window.add(micro.logged_loss(loss, accelerator.num_processes), samples, tokens,
                           task.train_metrics(outputs, batch))
                for hook in hooks["batch_end"]:
                    hook(state, {"loss": loss.detach(), **state.logs})
                if not stepped:
                    continue
                progress.update(1)
                if self._is_log_step(state.step):
                    log_train_step(accelerator, state, window, progress, self._epochs_done(), config.overfit_batches)
                    state.logs.clear()  # values logged between log lines: the latest one is written
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    self.checkpoints.save()
                if preemption.requested():
                    state.preempted = state.should_stop = True  # every rank, after this same step
                if state.step >= state.max_steps or state.should_stop:
                    break
                window.wait_for_data()
            if state.batch_in_epoch >= len(self.data["train"]):  # the epoch ran to its end
                epoch_end_started = time.perf_counter()
                state.epoch += 1
                state.batch_in_epoch = 0
                last = state.step >= state.max_steps
                if self.data["val"] is not None and (last or (config.eval_every and state.epoch % config.eval_every == 0)):
                    self._evaluate_and_log()
                self._call("epoch_end")
                self.checkpoints.save()
                window.started += time.perf_counter() - epoch_end_started  # throughput counts training time only
        progress.close()
        if self.data["val"] is not None and state.eval_step != state.step and not state.preempted:
            self._evaluate_and_log()  # stopped mid-epoch: still report validation metrics for the final weights
        self.checkpoints.save()

    def _optimizer_step(self, batch: Any, loss_scale: float | torch.Tensor = 1.0) -> bool:
        """Between backward and zero_grad when gradients are synchronised: the hooks around the optimizer step.
        `loss_scale`: the factor the batch's loss had in backward (a recomputation applies it too). Returns False
        when a technique skipped the step (`state.skip_step`, on every rank alike)."""
        state = self.state
        unscale_gradients_once(self.accelerator, state.optimizer)  # fp16: hooks see true gradients
        self._call("before_optimizer_step")
        if state.skip_step:
            state.skip_step = False
            forget_unscaling(self.accelerator, state.optimizer)
            state.optimizer.zero_grad(set_to_none=True)
            return False
        if "grad_norm" not in state.logs and self._is_log_step(state.step + 1):
            # Measured only on logging steps (a clipping technique reports it on every step anyway).
            state.log(grad_norm=gradient_norm(self.accelerator, list(state.model.parameters())))
        if self._step_owner is not None:
            self._step_owner.optimizer_step(state, lambda: self._recompute_gradients(batch, loss_scale))
        else:
            state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        return True

    def _end_step(self) -> None:
        self.state.step += 1
        self._call("after_optimizer_step")

    def update(self, loss: torch.Tensor, batch: Any, outputs: Any, parameters: Iterable[torch.nn.Parameter]
               ) -> torch.Tensor:
        """One optimizer update of `parameters` from `loss`, for a task that owns its step (a GAN's critic or
        generator update): the `on_loss` hooks, backward, `after_backward`, `before_optimizer_step` and the step.
        The other parameters' gradients are dropped first, so the optimizer leaves them and their state alone.
        `after_optimizer_step` runs once per training step, after the task's last update. Returns the loss."""
        state = self.state
        for hook in self._hooks["on_loss"]:
            loss = hook(state, loss, batch, outputs)
        self.accelerator.backward(loss)
        self._call("after_backward")
        updated = {id(p) for p in parameters}
        for p in state.model.parameters():
            if id(p) not in updated:
                p.grad = None
        self._optimizer_step(batch)
        return loss

    def _recompute_gradients(self, batch: Any, loss_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """For the step-owning technique (SAM): forward and backward again on the same batch, then the other
        techniques' gradient hooks (clipping bounds the gradient that will be applied)."""
        state, task = self.state, self.task
        state.optimizer.zero_grad(set_to_none=True)
        forget_unscaling(self.accelerator, state.optimizer)  # fp16: the new gradients arrive scaled
        with frozen_running_statistics(state.model):  # BatchNorm statistics move once per step, from the first pass
            outputs = task.forward(state.model, batch)
        loss = task.loss(outputs, batch)
        for hook in self._hooks["on_loss"]:
            loss = hook(state, loss, batch, outputs)
        self.accelerator.backward(loss if isinstance(loss_scale, float) and loss_scale == 1 else loss * loss_scale)
        unscale_gradients_once(self.accelerator, state.optimizer)
        for hook in self._hooks["before_optimizer_step"]:
            if hook.__self__ is not self._step_owner:
                hook(state)
        return loss.detach()

    def _is_log_step(self, step: int) -> bool:
        return step % self.config.log_every == 0 or step == self.state.max_steps

    def _call(self, hook: str) -> None:
        for method in self._hooks[hook]:
            method(self.state)

    # --- logging, evaluation, checkpoints, outputs --------------------------------------------------------------
    def rollback(self, to: Path | None = None, lr_factor: float = 1.0) -> Path | None:
        """Mid-run, reload checkpoint `to` (default: the newest healthy one: intact, with finite weights where there
        is one) through the same load path as a resume, and multiply every learning rate by `lr_factor` for the rest
        of the run; the loop then continues from the restored position. Every rank calls it alike. Returns the
        checkpoint loaded, or None when there is none (nothing changes). Hooks reach it as `state.rollback`."""
        return self.checkpoints.roll_back(to, lr_factor)

    def _epochs_done(self) -> float:
        """Epochs trained, with the current epoch's fraction: the same count in log lines, metrics and summary."""
        return self.state.epoch + self.state.batch_in_epoch / max(len(self.data["train"]), 1)

    def _evaluate_and_log(self) -> None:
        log_validation(self.accelerator, self.state, self.evaluate(self.data["val"], "val"), self._epochs_done())
