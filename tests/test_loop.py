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
from framework.technique import HOOKS, Technique, hook_table
from framework.techniques import EMA, CosineLR
from helpers import make_trainer, reset_accelerate, tiny_classification_data


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


@pytest.mark.parametrize("n, batch_size", [(20, 4), (22, 4)])
def test_partial_accumulation_window_applies_its_own_mean(tmp_path, n, batch_size):
    """5 (or 6) micro-batches at k=4: the epoch's last step averages the 1 (or 2) micro-batches it holds, like one
    large batch of the same samples would (not their sum divided by 4). n=22 also makes the last micro-batch small."""
    small = make_trainer(tmp_path / "small", batch_size=batch_size, n=n, accumulation=4, epochs=2)
    small.fit()
    small_weights = [p.detach().clone() for p in small.state.model.parameters()]
    reset_accelerate()
    large = make_trainer(tmp_path / "large", batch_size=4 * batch_size, n=n, accumulation=1, epochs=2)
    large.fit()
    assert small.state.step == large.state.step == 4  # ceil(5 / 4) steps per epoch
    if n % batch_size == 0:  # equal micro-batches: the mean of micro-batch means is the large batch's mean
        for a, b in zip(small_weights, large.state.model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:  # a smaller last micro-batch: compare with the mean over the micro-batches, computed by hand
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        data = tiny_classification_data(n)
        batches = [data[i:i + batch_size] for i in range(0, n, batch_size)]
        for _ in range(2):
            for start in range(0, len(batches), 4):
                window = batches[start:start + 4]
                losses = [torch.nn.functional.cross_entropy(
                    model(torch.stack([s["pixel_values"] for s in b])), torch.stack([s["label"] for s in b]))
                    for b in window]
                (sum(losses) / len(window)).backward()
                optimizer.step()
                optimizer.zero_grad()
        for a, b in zip(small_weights, model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_partial_accumulation_window_under_two_process_ddp(tmp_path):
    """2 ranks × 5 micro-batches of 4 at k=4 equal one process with batches of 32 over the same 40 samples."""
    from helpers import ROOT, launch

    result = launch(ROOT / "tests" / "scripts" / "accumulate_uneven.py", str(tmp_path / "ddp"), "40", "4", "4",
                    launch_config="multi_cpu.yaml")
    assert result.returncode == 0 and "steps 4" in result.stdout
    large = make_trainer(tmp_path / "large", batch_size=32, n=40, accumulation=1, epochs=2, doctor=False)
    large.fit()
    assert large.state.step == 4
    weights = load_file(tmp_path / "ddp" / "weights.safetensors")
    torch.testing.assert_close(weights["weight"], large.state.model.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights["bias"], large.state.model.bias.detach(), rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("pin_memory", [False, True])
def test_pinned_training_loader_gets_non_blocking_copies(tmp_path, pin_memory):
    """Pinned host memory only pays with asynchronous host-to-device copies: accelerate's `non_blocking`."""
    data = tiny_classification_data(8)
    config = TrainerConfig(output_dir=str(tmp_path), tracker="none")
    model = torch.nn.Linear(4, 3)
    trainer = Trainer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), ClassificationTask(num_classes=3),
                      DataLoader(data, batch_size=2, pin_memory=pin_memory), techniques=[])
    assert trainer.accelerator.dataloader_config.non_blocking is pin_memory


def test_best_weights_are_evaluated_on_the_test_split_too(tmp_path):
    """best_model (evaluate_best, the default): test_best/* are the metrics of model_best.safetensors on the test
    split, test/* those of the final weights, which the model holds again afterwards."""
    from framework.techniques import BestModel

    # "max" of val/loss picks the worst epoch (the first), so the best weights are not the final ones.
    trainer = make_trainer(tmp_path, [BestModel(metric="val/loss", mode="max")], batch_size=4, n=16, epochs=3, lr=0.5,
                           doctor=False)
    summary = trainer.fit()
    assert summary["best_model"]["step"] < trainer.state.step == 12
    assert summary["best_model"]["test_metrics"] == "test_best/*"
    final = {k: v.clone() for k, v in trainer.state.model.state_dict().items()}
    best = load_file(tmp_path / "model_best.safetensors")
    assert not torch.equal(best["weight"], final["weight"])
    for k, v in load_file(tmp_path / "model.safetensors").items():
        assert torch.equal(v, final[k])  # the final weights were restored after the best ones were evaluated

    test = tiny_classification_data(16)[4:]  # make_trainer's test split

    def metrics(weights):
        model = torch.nn.Linear(4, 3)
        model.load_state_dict(weights)
        logits = model(torch.stack([d["pixel_values"] for d in test]))
        labels = torch.stack([d["label"] for d in test])
        return (torch.nn.functional.cross_entropy(logits, labels).item(),
                (logits.argmax(1) == labels).float().mean().item())

    for prefix, weights in (("test", final), ("test_best", best)):
        loss, accuracy = metrics(weights)
        assert summary["metrics"][f"{prefix}/loss"] == pytest.approx(loss, rel=1e-5)
        assert summary["metrics"][f"{prefix}/accuracy"] == pytest.approx(accuracy)
    assert summary["metrics"]["test_best/loss"] != pytest.approx(summary["metrics"]["test/loss"])


def _tiny_conv_trainer(tmp_path, **config):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 3))
    generator = torch.Generator().manual_seed(1)
    data = [{"pixel_values": torch.randn(3, 12, 12, generator=generator), "label": torch.tensor(i % 3)}
            for i in range(24)]
    config = TrainerConfig(output_dir=str(tmp_path), epochs=2, tracker="none", doctor=False, **config)
    return Trainer(config, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                   ClassificationTask(num_classes=3), DataLoader(data, batch_size=4, shuffle=True),
                   DataLoader(data[:8], batch_size=4), techniques=[])


class FormatProbe(Technique):
    """Records the memory format the model's conv weight and the batch have inside training."""

    def __init__(self):
        self.seen = None

    def on_batch(self, state, batch):
        weight = state.accelerator.unwrap_model(state.model)[0].weight
        self.seen = (weight.is_contiguous(memory_format=torch.channels_last),
                     batch["pixel_values"].is_contiguous(memory_format=torch.channels_last),
                     torch.are_deterministic_algorithms_enabled())
        return batch


@pytest.mark.parametrize("flag", ["channels_last", "deterministic"])
def test_channels_last_and_deterministic_switches(tmp_path, flag):
    """--channels_last puts conv weights and image batches in channels-last format and trains to the same weights
    within fp32 tolerance; --deterministic turns on deterministic kernels (and cuDNN's deterministic mode)."""
    plain = _tiny_conv_trainer(tmp_path / "plain")
    plain.fit()
    reset_accelerate()
    switched = _tiny_conv_trainer(tmp_path / flag, **{flag: True})
    probe = FormatProbe()
    switched.techniques.append(probe)
    switched._hooks = hook_table(switched.techniques)
    try:
        switched.fit()
        expected = (True, True, False) if flag == "channels_last" else (False, False, True)
        assert probe.seen == expected
        assert torch.backends.cudnn.deterministic is (flag == "deterministic")
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    for a, b in zip(plain.state.model.state_dict().values(), switched.state.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_deterministic_recipe_run_twice_gives_bitwise_equal_weights(tmp_path):
    """The regularized digits recipe (random augmentation in 2 DataLoader workers, stochastic depth, Mixup/CutMix)
    with --deterministic true, launched twice: the same weights, bit for bit."""
    from helpers import ROOT, launch

    weights = []
    for run in ("a", "b"):
        result = launch(ROOT / "recipes" / "image_classification.py", "--config",
                        str(ROOT / "recipes" / "configs" / "digits_regularized.yaml"), "--deterministic", "true",
                        "--max_steps", "25", "--data.num_workers", "2", "--tracker", "none",
                        "--output_dir", str(tmp_path / run))
        assert result.returncode == 0
        weights.append(load_file(tmp_path / run / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def _listing(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", ["preview_lr", "find_lr"])
def test_modes_that_train_nothing_leave_an_earlier_run_untouched(tmp_path, mode):
    """After a finished run, --preview_lr / --find_lr neither refuse (no --overwrite needed) nor delete: every file
    of the run is still there, byte for byte; their picture is written beside it."""
    make_trainer(tmp_path, [CosineLR(warmup_steps=2)], batch_size=4, n=16, epochs=2).fit()
    before = _listing(tmp_path)
    assert any(name.startswith("checkpoints/") for name in before)
    for overwrite in (False, True):  # even when told to overwrite
        reset_accelerate()
        make_trainer(tmp_path, [CosineLR(warmup_steps=2)], batch_size=4, n=16, epochs=2, overwrite=overwrite,
                     **{mode: True}).fit()
        after = _listing(tmp_path)
        picture = "lr_schedule.png" if mode == "preview_lr" else "lr_finder.png"
        assert picture in after
        assert {k: v for k, v in after.items() if k in before and k != picture} == \
            {k: v for k, v in before.items() if k != picture}


def test_overwrite_empties_the_earlier_run_and_refuses_a_directory_that_is_no_run(tmp_path):
    from framework.techniques import BestModel

    make_trainer(tmp_path, [BestModel(metric="val/loss", mode="min"), EMA(decay=0.9)], batch_size=4, n=16,
                 epochs=2).fit()
    assert {"model_best.safetensors", "model_ema.safetensors", "summary.json", "best"} <= {
        p.name for p in tmp_path.iterdir()}
    (tmp_path / "notes.txt").write_text("from the earlier run")
    reset_accelerate()
    trainer = make_trainer(tmp_path, batch_size=4, n=16, epochs=1, overwrite=True, max_steps=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing of the old run is left: only this run's lock
    trainer.fit()
    assert {"model_best.safetensors", "model_ema.safetensors", "best", "notes.txt"}.isdisjoint(
        p.name for p in tmp_path.iterdir())
    assert json.loads((tmp_path / "summary.json").read_text())["run"]["steps"] == 2

    foreign = tmp_path / "not_a_run"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    reset_accelerate()
    with pytest.raises(ConfigError, match="holds files but no earlier run"):
        make_trainer(foreign, batch_size=4, n=16, epochs=1, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_measuring_the_gradient_norm_leaves_the_gradients_alone(tmp_path):
    """Gradients of ~1e22, whose fp32 norm overflows to inf: the log step's grad_norm measurement must not scale
    them (a clip at max_norm=inf would multiply them by inf/inf = NaN)."""
    from framework.backend import gradient_norm

    trainer = make_trainer(tmp_path, batch_size=4, n=8, epochs=1)
    parameters = list(trainer.state.model.parameters())
    for p in parameters:
        p.grad = torch.full_like(p, 1e22)
    before = [p.grad.clone() for p in parameters]
    norm = gradient_norm(trainer.accelerator, parameters)
    assert torch.isinf(norm)  # the true norm, 1e22 · √15, does not fit in fp32
    for p, g in zip(parameters, before):
        assert torch.equal(p.grad, g)


def test_summary_counts_epochs_the_same_after_resuming_a_final_mid_epoch_checkpoint(tmp_path):
    first = make_trainer(tmp_path, batch_size=4, n=16, epochs=3, max_steps=6, doctor=False).fit()
    reset_accelerate()
    again = make_trainer(tmp_path, batch_size=4, n=16, epochs=3, max_steps=6, doctor=False, resume_from="latest").fit()
    assert first["run"]["epochs"] == again["run"]["epochs"] == 1.5  # 6 steps of 4 per epoch
    assert first["run"]["steps"] == again["run"]["steps"] == 6
