"""The loop in one process: hook order, gradient accumulation, resume, launch refusals."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from framework.backend import check_launch
from framework.config import TrainerConfig
from framework.errors import ConfigError, LaunchError
from framework.loop import Trainer
from framework.task import ClassificationTask
from framework.technique import HOOKS, Technique
from framework.techniques import EMA, CosineLR
from helpers import reset_accelerate, tiny_classification_data


class Recorder(Technique):
    """Records every hook call; owns the optimizer step so that hook is exercised too."""

    owns_optimizer_step = True

    def __init__(self):
        self.calls: list[str] = []

    def __getattribute__(self, name):
        attribute = object.__getattribute__(self, name)
        if name in HOOKS and name not in ("on_batch", "on_loss", "batch_end", "optimizer_step"):
            def record(state):
                object.__getattribute__(self, "calls").append(name)
            return record
        return attribute

    def on_batch(self, state, batch):
        self.calls.append("on_batch")
        return batch

    def on_loss(self, state, loss, batch, outputs):
        self.calls.append("on_loss")
        return loss

    def batch_end(self, state, logs):
        self.calls.append("batch_end")

    def optimizer_step(self, state, recompute_gradients):
        self.calls.append("optimizer_step")
        state.optimizer.step()

    # every hook counts as overridden
    def overrides(self, hook):
        return True


def make_trainer(tmp_path, techniques=(), batch_size=2, n=8, accumulation=1, epochs=2, shuffle=False, lr=0.1,
                 accelerator=None, **config):
    torch.manual_seed(0)
    data = tiny_classification_data(n)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    config = TrainerConfig(output_dir=str(tmp_path), epochs=epochs, tracker="none", log_every=1,
                           gradient_accumulation_steps=accumulation, **config)
    loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle)
    return Trainer(config, model, optimizer, ClassificationTask(num_classes=3), loader,
                   DataLoader(data[:4], batch_size=2), DataLoader(data[4:], batch_size=2), techniques=list(techniques),
                   accelerator=accelerator)


def expected_calls(batches: int, accumulation: int, epochs: int) -> list[str]:
    calls = ["before_prepare", "fit_start"]
    for _ in range(epochs):
        calls.append("epoch_start")
        for index in range(batches):
            calls += ["on_batch", "on_loss", "after_backward"]
            if (index + 1) % accumulation == 0 or index + 1 == batches:
                calls += ["before_optimizer_step", "optimizer_step", "after_optimizer_step"]
            calls.append("batch_end")
        calls += ["eval_start", "eval_end", "epoch_end"]  # validation, then the epoch's end
    return calls + ["eval_start", "eval_end", "fit_end"]  # the test set, then the end


@pytest.mark.parametrize("accumulation", [1, 4])
def test_hooks_run_in_documented_order(tmp_path, accumulation):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, [recorder], batch_size=2, n=8, accumulation=accumulation)
    summary = trainer.fit()
    assert recorder.calls == expected_calls(batches=4, accumulation=accumulation, epochs=2)
    assert summary["run"]["steps"] == 2 * 4 // accumulation


def test_accumulation_equals_large_batch(tmp_path):
    """k micro-batches of b give the weights of one batch of k·b (the loss is averaged the same way)."""
    small = make_trainer(tmp_path / "small", batch_size=4, n=32, accumulation=4, epochs=2)
    small.fit()
    small_weights = [p.detach().clone() for p in small.state.model.parameters()]
    reset_accelerate()
    large = make_trainer(tmp_path / "large", batch_size=16, n=32, accumulation=1, epochs=2)
    large.fit()
    assert small.state.step == large.state.step == 4
    for a, b in zip(small_weights, large.state.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    initial = torch.nn.Linear(4, 3).weight  # what make_trainer started from: training really moved the weights
    assert (small_weights[0] - initial).abs().max() > 1e-2


class Probe(Technique):
    """Remembers what the run looked like at its first epoch_start (i.e. right after a resume)."""

    def __init__(self, ema: EMA):
        self.ema = ema
        self.first = None

    def epoch_start(self, state):
        if self.first is None:
            self.first = {"step": state.step, "epoch": state.epoch, "samples_seen": state.samples_seen,
                          "ema_updates": self.ema.num_updates, "lr": state.optimizer.param_groups[0]["lr"],
                          "ema_params": [t.clone() for t in self.ema.ema_params]}


def test_resume_from_first_epoch_restores_ema_counters_and_weights(tmp_path):
    def run(output_dir, **config):
        ema = EMA(decay=0.8)
        probe = Probe(ema)
        trainer = make_trainer(output_dir, [CosineLR(warmup_steps=2), ema, probe], batch_size=4, n=16,
                               epochs=2, shuffle=True, keep_checkpoints=5, **config)
        trainer.fit()
        return trainer, ema, probe

    full, full_ema, _ = run(tmp_path / "full")
    checkpoints = sorted((tmp_path / "full" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step_00000004", "step_00000008"]
    reset_accelerate()
    # Registered objects, in order: the TrainState counters, cosine_lr, ema (the probe has no state).
    first_epoch_ema = torch.load(checkpoints[0] / "custom_checkpoint_2.pkl", weights_only=True)
    resumed, resumed_ema, probe = run(tmp_path / "resumed", resume_from=str(checkpoints[0]))

    # Right after loading: counters, schedule and EMA are those of the end of epoch 1.
    assert probe.first["step"] == 4 and probe.first["epoch"] == 1 and probe.first["samples_seen"] == 16
    assert probe.first["ema_updates"] == 4
    for restored, saved in zip(probe.first["ema_params"], first_epoch_ema["params"]):
        assert torch.equal(restored, saved)
    # And it finishes where the uninterrupted run finished.
    assert resumed.state.step == full.state.step == 8 and resumed.state.epoch == 2
    assert resumed_ema.num_updates == full_ema.num_updates == 8
    for a, b in zip(resumed.state.model.parameters(), full.state.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(resumed_ema.ema_params, full_ema.ema_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_latest_resumes_newest_complete_checkpoint_and_outputs_exist(tmp_path):
    trainer = make_trainer(tmp_path, [EMA(decay=0.9)], batch_size=4, n=16, epochs=1)
    trainer.fit()
    incomplete = tmp_path / "checkpoints" / "step_00000099"  # a save that crashed: no COMPLETE marker
    incomplete.mkdir()
    reset_accelerate()
    with pytest.warns(UserWarning, match="no COMPLETE marker"):
        again = make_trainer(tmp_path, [EMA(decay=0.9)], batch_size=4, n=16, epochs=2, resume_from="latest")
    assert again.resume_path.name == "step_00000004"
    again.fit()
    assert again.state.step == 8
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["num_processes"] == 1 and summary["run"]["steps"] == 8
    assert "test/accuracy" in summary["metrics"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "train/loss" in line]
    assert {"step", "train/loss", "lr", "grad_norm"} <= set(train_lines[0])
    weights = load_file(tmp_path / "model.safetensors")
    torch.testing.assert_close(weights["weight"], again.state.model.weight.detach())
    assert set(load_file(tmp_path / "model_ema.safetensors")) == {"weight", "bias"}


def test_world_size_mismatch_is_refused(monkeypatch):
    accelerator = Accelerator(cpu=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="launcher started 2 processes"):
        check_launch(accelerator)


def test_fp16_on_cpu_is_refused():
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    with pytest.raises(LaunchError, match="fp16 mixed precision needs a GPU"):
        check_launch(accelerator)


def test_fresh_start_over_an_earlier_run_is_refused_unless_overwrite(tmp_path):
    make_trainer(tmp_path, batch_size=4, n=16, epochs=2).fit()
    assert (tmp_path / "checkpoints" / "step_00000008").is_dir()
    reset_accelerate()
    with pytest.raises(ConfigError, match="--resume_from latest"):
        make_trainer(tmp_path, batch_size=4, n=16, epochs=1)
    reset_accelerate()
    make_trainer(tmp_path, batch_size=4, n=16, epochs=1, overwrite=True).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # the earlier run's lines are gone


def test_compile_switch_compiles_and_trains_like_eager(tmp_path):
    eager = make_trainer(tmp_path / "eager", batch_size=4, n=16, epochs=1)
    eager.fit()
    reset_accelerate()
    compiled = make_trainer(tmp_path / "compiled", batch_size=4, n=16, epochs=1, compile=True)
    compiled.fit()
    assert hasattr(compiled.state.model, "_orig_mod")  # torch.compile's wrapper
    assert not hasattr(eager.state.model, "_orig_mod")
    for a, b in zip(eager.state.model.parameters(), compiled.state.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
