"""The training doctor: its pure checks against hand-made numbers and tensors, then each finding inside the real loop
on a deliberately broken tiny setup (printed exactly once, logged to metrics.jsonl, in summary.json), and silence on
healthy runs, the image recipe's included. (Its measured overhead is in framework/techniques/doctor/__init__.py.)
"""

from __future__ import annotations

import inspect
import json
import math
import types

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from framework.config import TrainerConfig, build_techniques
from framework.diagnosis import first_nonfinite_layer, out_of_memory_report
from framework.errors import ConfigError, FrameworkError, NonFiniteLossError
from framework.loop import Trainer
from framework.task import ClassificationTask, LanguageModelTask, Task
from framework.techniques.doctor import (
    Doctor,
    exploding_gradient_finding,
    expected_initial_loss,
    frozen_modules,
    initial_loss_finding,
    layer_gradient_norms,
    missing_gradient_finding,
    overfitting_finding,
    plateau_finding,
    vanishing_layers,
)
from helpers import ROOT, launch, load_recipe, tiny_classification_data


@pytest.fixture(autouse=True)
def seeded():
    """torch draws its initial seed at random here: a model built before `train` seeds must not differ per run."""
    torch.manual_seed(0)


# --- pure functions ------------------------------------------------------------------------------------------------
def test_expected_initial_loss_is_ln_of_the_classes():
    logits = torch.zeros(4, 10)
    assert expected_initial_loss(ClassificationTask(num_classes=10), logits) == pytest.approx(math.log(10))
    assert expected_initial_loss(LanguageModelTask(), torch.zeros(2, 7, 256)) == pytest.approx(math.log(256))
    assert expected_initial_loss(Task(), logits) is None  # a task the doctor knows nothing about: no check
    custom = types.SimpleNamespace(expected_initial_loss=lambda outputs: 0.25)
    assert expected_initial_loss(custom, logits) == 0.25
    # Uniform logits give exactly ln C whatever the (soft) targets: the reference is right.
    soft = torch.softmax(torch.randn(4, 10), dim=-1)
    assert torch.nn.functional.cross_entropy(logits, soft).item() == pytest.approx(math.log(10), rel=1e-6)


def test_initial_loss_thresholds():
    ln10 = math.log(10)  # 2.303: far = off by more than max(0.5 · 2.303, 1.0) = 1.151
    assert initial_loss_finding(2.5, ln10) is None
    assert initial_loss_finding(3.40, ln10) is None and initial_loss_finding(1.2, ln10) is None
    high = initial_loss_finding(3.5, ln10, logits_std=12.0)
    assert high.code == "initial_loss" and "3.5" in high.message and "ln(10) = 2.303" in high.message
    assert "logits std 12" in high.message and "scale its weights down" in high.fix
    low = initial_loss_finding(1.1, ln10)
    assert low.code == "initial_loss" and "pretrained" in low.fix
    ln2 = math.log(2)  # 0.693: the 1-nat floor applies
    assert initial_loss_finding(1.65, ln2) is None and initial_loss_finding(1.75, ln2) is not None
    assert initial_loss_finding(float("nan"), ln10) is None  # the non-finite check reports that
    assert initial_loss_finding(50.0, None) is None


def test_gradient_checks_on_plain_numbers():
    assert exploding_gradient_finding(99.0, 1.0) is None
    found = exploding_gradient_finding(150.0, 1.5, steps=(10, 20))
    assert found.code == "exploding_gradients" and "100×" in found.message
    assert "between steps 10 and 20" in found.message
    assert "--optimizer.lr" in found.fix and "gradient_clipping" in found.fix
    nonfinite = exploding_gradient_finding(float("inf"), None, nonfinite_parameters=["fc.weight"])
    assert "non-finite (inf)" in nonfinite.message and "fc.weight" in nonfinite.message
    assert exploding_gradient_finding(1e9, None) is None  # no baseline yet: only non-finite counts

    layers = layer_gradient_norms({"a.weight": 3.0, "a.bias": 4.0, "b.weight": 1.0, "c.weight": 2e-9,
                                   "d.weight": float("nan")})
    assert layers == pytest.approx({"a": 5.0, "b": 1.0, "c": 2e-9})  # per module: sqrt(3² + 4²); NaN left out
    assert vanishing_layers(layers, 1e-6) == {"c": 2e-9}  # median 1.0
    assert vanishing_layers({"a": 1.0, "b": 1e-3}, 1e-6) == {}
    assert vanishing_layers({"only": 0.0}) == {}


def test_missing_gradients_and_frozen_modules():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    model[2](model[1](torch.randn(3, 2)).detach()).sum().backward()  # layer 1 is cut off from the loss
    found = missing_gradient_finding(model.named_parameters())
    assert found.code == "no_gradient" and "1.weight, 1.bias" in found.message and "0.weight" not in found.message
    assert "6 values" in found.message and ".detach()" in found.fix
    assert frozen_modules(model) == ["0"]
    assert frozen_modules(nn.Linear(2, 2)) == []


def test_plateau_and_overfitting_on_plain_numbers():
    assert plateau_finding([2.0, 1.9, 1.5, 1.2]) is None
    flat = plateau_finding([1.0, 1.1, 1.0, 1.1], steps=(0, 3))
    assert flat.code == "loss_plateau" and "over steps 0-3" in flat.message and "learning rate" in flat.fix
    assert plateau_finding([1.2, 1.1, 1.0, 1.0], reference=1.0) is not None  # fell, but not below chance
    assert plateau_finding([1.0, float("nan")]) is None

    train = [1.0, 0.6, 0.3, 0.1, 0.05]
    # Risen by max(5%, 0.05 nats) above the best 0.9 means ≥ 0.95, for each of the last 3 evaluations.
    assert overfitting_finding(train, [1.0, 0.9, 0.94, 1.0, 1.1], patience=3) is None
    found = overfitting_finding(train, [1.0, 0.9, 1.0, 1.1, 1.3], patience=3)
    assert found.code == "overfitting" and "0.9" in found.message and "1.3" in found.message
    for advice in ("augment", "weight_decay", "early_stopping", "stochastic_depth"):
        assert advice in found.fix
    assert overfitting_finding([1.0, 1.0, 1.0, 1.2, 1.3], [1.0, 0.9, 1.0, 1.1, 1.3], patience=3) is None  # train rose
    assert overfitting_finding(train[:3], [1.0, 1.2, 1.4], patience=3) is None  # too few evaluations
    # What the default image recipe does over 20 epochs (label smoothing, EMA): val/loss drifts from 0.1337 to 0.15
    # while accuracy stays at 99.4%; the smoothed training loss (0.53) stays far above it. Healthy: no finding.
    recipe_val = [0.1391, 0.1337, 0.1381, 0.1440, 0.1404, 0.1421, 0.1456, 0.1453, 0.1479, 0.1502, 0.1516]
    recipe_train = [0.57, 0.5615, 0.556, 0.552, 0.548, 0.545, 0.542, 0.539, 0.536, 0.534, 0.5331]
    assert overfitting_finding(recipe_train, recipe_val, patience=3) is None
    assert overfitting_finding([t - 0.5 for t in recipe_train], recipe_val, patience=3) is None  # rise < 0.05 nats


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN for negative inputs


def test_first_nonfinite_layer_names_the_module_and_cleans_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), Log(), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    stats = model[1].running_mean.clone()
    layer = first_nonfinite_layer(model, lambda: model(x))
    assert (layer.name, layer.module_type, layer.inputs_finite, layer.weights_finite) == ("2", "Log", True, True)
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    assert torch.equal(model[1].running_mean, stats)  # BatchNorm statistics restored
    healthy = nn.Sequential(nn.Linear(4, 2))
    assert first_nonfinite_layer(healthy, lambda: healthy(x)) is None
    assert first_nonfinite_layer(healthy, lambda: healthy(x * float("nan"))).inputs_finite is False
    with torch.no_grad():
        healthy[0].weight[0, 0] = float("nan")
    assert first_nonfinite_layer(healthy, lambda: healthy(x)).weights_finite is False


def test_replay_names_overflow_from_huge_finite_weights_and_nonfinite_weights_anywhere():
    """The verdict is what the weights are, not which layer happens to overflow first: finite but huge weights
    (≈1e34, as a far too high learning rate leaves them) are an overflow, named with the magnitudes; NaN weights in
    any layer are reported as such even when an earlier layer with finite weights already overflowed."""
    from framework.diagnosis import NonFiniteLayer, nonfinite_parameters
    from framework.techniques.doctor import nonfinite_loss_finding

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.fill_(1e34)
    x = torch.ones(2, 4)
    layer = first_nonfinite_layer(model, lambda: model(x))
    assert (layer.name, layer.inputs_finite, layer.weights_finite) == ("2", True, True)
    assert layer.weight_max == pytest.approx(1e34) and layer.input_max == pytest.approx(4e34, rel=1e-3)
    assert nonfinite_parameters(model) == []
    message = nonfinite_loss_finding(layer, {}, (1, 2)).message
    assert "`2` (Linear)" in message and "its weights reach 1e+34" in message and "overflow float32" in message
    assert "already NaN/inf" not in message and "log/sqrt" not in message

    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")  # after the layer that overflows first
    assert nonfinite_parameters(model) == ["4.weight"]
    message = nonfinite_loss_finding(first_nonfinite_layer(model, lambda: model(x)), {}, (1, 2),
                                     nonfinite_weights=nonfinite_parameters(model)).message
    assert "weights are already NaN/inf" in message and "`4.weight`" in message
    assert NonFiniteLayer("a", "Linear", True, True).weight_max is None  # magnitudes are optional


def test_out_of_memory_report_names_peak_and_the_flags(monkeypatch):
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.2 GiB total)\nmore")
    report = out_of_memory_report(error, torch.device("cpu"))
    assert report.splitlines()[0] == ("out of memory on cpu: CUDA out of memory. Tried to allocate 2.00 GiB "
                                      "(GPU 0; 79.2 GiB total)")
    for flag in ("--data.batch_size", "--gradient_accumulation_steps", "launch_configs/bf16.yaml",
                 "--techniques.gradient_checkpointing.policy full", "launch_configs/deepspeed_zero2.yaml",
                 "deepspeed_zero3_offload.yaml"):
        assert flag in report
    for path in ("launch_configs/bf16.yaml", "launch_configs/deepspeed_zero2.yaml",
                 "launch_configs/deepspeed_zero3.yaml", "launch_configs/deepspeed_zero3_offload.yaml"):
        assert (ROOT / path).exists()
    # On CUDA: the peak the allocator saw (faked here: no GPU on CI).
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 30 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 40 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
        total_memory=80 * 2**30))
    report = out_of_memory_report(error, "cuda:0")
    assert "peak memory: 30.00 GiB allocated by tensors, 40.00 GiB reserved" in report and "80.00 GiB" in report
    assert "expandable_segments" in report  # reserved ≫ allocated: fragmentation


def test_arguments_are_checked_and_buildable_from_config():
    [doctor] = build_techniques({"doctor": {"check_every": 10, "plateau_window": 0}})
    assert isinstance(doctor, Doctor) and doctor.check_every == 10 and doctor.plateau_window == 0
    for bad in ({"check_every": 0}, {"plateau_window": 1}, {"vanish_ratio": 0.0}, {"overfit_patience": -1}):
        with pytest.raises(ConfigError, match="doctor"):
            Doctor(**bad)


def every_fix_text() -> str:
    ln3 = math.log(3)
    model = nn.Linear(2, 2)
    model(torch.randn(1, 2)).sum().detach()  # no backward: every parameter lacks a gradient
    texts = [initial_loss_finding(9.0, ln3), initial_loss_finding(0.01, ln3), missing_gradient_finding(
        model.named_parameters()), exploding_gradient_finding(float("nan"), None),
        plateau_finding([1.0, 1.0]), overfitting_finding([1, 0.5, 0.4, 0.3], [1, 1.2, 1.3, 1.4])]
    from framework.techniques.doctor import nonfinite_loss_finding, unoptimized_finding, vanishing_gradient_finding

    texts += [unoptimized_finding(model.named_parameters(), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1)),
              vanishing_gradient_finding({"a": 0.0}, {"a": 0.0, "b": 1.0, "c": 1.0}, 1e-6, (1, 2)),
              nonfinite_loss_finding(None, {}, (0, 5), check_every=50)]
    return "\n".join(f"{f.message} {f.fix}" for f in texts) + out_of_memory_report(RuntimeError("x"), "cpu")


def test_every_flag_the_doctor_suggests_exists():
    """Each `--key` in a message or fix is a real option of the image recipe (or of the technique it names)."""
    import dataclasses
    import re
    import typing

    from framework.technique import TECHNIQUES

    config_class = image_recipe().ImageClassificationConfig
    flags = set(re.findall(r"--([a-z_][a-z0-9_.]*[a-z0-9_])", every_fix_text()))
    assert {"optimizer.lr", "gradient_accumulation_steps", "techniques.gradient_checkpointing.policy",
            "techniques.doctor.check_every", "data.batch_size"} <= flags
    for flag in flags - {"config_file"}:  # accelerate launch's own flag
        parts = flag.split(".")
        if parts[0] == "techniques":
            assert parts[1] in TECHNIQUES, flag
            assert parts[2] in inspect.signature(TECHNIQUES[parts[1]]).parameters, flag
            continue
        cls = config_class
        for part in parts:
            assert dataclasses.is_dataclass(cls), flag
            fields = {f.name: f for f in dataclasses.fields(cls)}
            assert part in fields, flag
            cls = typing.get_type_hints(cls)[part]


# --- inside the loop -----------------------------------------------------------------------------------------------
def train(tmp_path, model, doctor, *, lr=0.1, optimizer=None, n=16, batch_size=4, epochs=3, classes=3, seed=0,
          val=None, data=None, **config):
    """A real Trainer run on tiny data with only the doctor (None: no technique); returns (trainer, summary or the
    error raised)."""
    torch.manual_seed(seed)
    data = data if data is not None else tiny_classification_data(n, features=4, classes=classes, seed=seed)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    config = TrainerConfig(**{"output_dir": str(tmp_path), "epochs": epochs, "tracker": "none", "log_every": 1,
                              **config})
    trainer = Trainer(config, model, optimizer, ClassificationTask(num_classes=classes),
                      DataLoader(data, batch_size=batch_size), None if val is None else DataLoader(val, batch_size=8),
                      techniques=[] if doctor is None else [doctor])
    return trainer, trainer.fit()


def findings(tmp_path) -> dict[str, dict]:
    summary = json.loads((tmp_path / "summary.json").read_text())
    return {f["code"]: f for f in summary["doctor"]}


def logged(tmp_path) -> dict[str, list[int]]:
    """doctor/<code> -> the steps at which metrics.jsonl recorded it."""
    steps: dict[str, list[int]] = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        for key in json.loads(line):
            if key.startswith("doctor/"):
                steps.setdefault(key.removeprefix("doctor/"), []).append(json.loads(line)["step"])
    return steps


def assert_printed_once(capsys, code: str) -> str:
    out = capsys.readouterr().out
    assert out.count(f"[{code}]") == 1, out
    return out


def test_wrong_initial_scale_is_reported_once(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight *= 100  # confident random predictions: loss far above ln 3
    train(tmp_path, model, Doctor(), lr=0.01)
    found = findings(tmp_path)
    assert set(found) == {"initial_loss"}
    assert found["initial_loss"]["step"] == 0 and "ln(3) = 1.099" in found["initial_loss"]["message"]
    out = assert_printed_once(capsys, "initial_loss")
    assert "fix: the output layer starts too large" in out and "doctor: 1 finding(s): initial_loss" in out
    assert logged(tmp_path) == {"initial_loss": [0]}


class DetachedBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.branch = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(x) + self.branch(x).detach()  # the branch never receives a gradient


def test_detached_branch_never_receives_a_gradient(tmp_path, capsys):
    train(tmp_path, DetachedBranch(), Doctor())
    found = findings(tmp_path)
    assert set(found) == {"no_gradient"}
    message = found["no_gradient"]["message"]
    assert "branch.weight, branch.bias" in message and "head" not in message
    assert_printed_once(capsys, "no_gradient")
    assert logged(tmp_path) == {"no_gradient": [0]}


def test_parameters_missing_from_the_optimizer(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)  # built from the last layer only
    train(tmp_path, model, Doctor(), optimizer=optimizer)
    found = findings(tmp_path)
    assert set(found) == {"not_optimized"} and "0.weight, 0.bias" in found["not_optimized"]["message"]
    assert_printed_once(capsys, "not_optimized")


def mlp(hidden=32, depth=3, classes=3):
    layers, width = [], 4
    for _ in range(depth - 1):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, classes))


def test_learning_rate_far_too_high_explodes(tmp_path, capsys):
    torch.manual_seed(0)
    train(tmp_path, mlp(), Doctor(check_every=1), lr=30.0, epochs=10)
    found = findings(tmp_path)
    assert set(found) == {"exploding_gradients"}
    assert "× the median" in found["exploding_gradients"]["message"]
    assert_printed_once(capsys, "exploding_gradients")  # it stays high for 40 steps: printed once


@pytest.mark.parametrize("check_every", [1, 50])
def test_learning_rate_high_enough_for_inf_stops_training(tmp_path, capsys, check_every):
    torch.manual_seed(0)
    doctor = Doctor(check_every=check_every)
    with pytest.raises(NonFiniteLossError) as raised:
        train(tmp_path, mlp(), doctor, lr=1e12, epochs=15)
    # The gradients overflowed at step 1, the loss at step 2: both are named, the gradients first, even when the
    # flags are read only at step 50.
    assert [f["code"] for f in doctor.findings] == ["exploding_gradients", "nonfinite_loss"]
    assert "became non-finite" in doctor.findings[0]["message"]
    assert ("at step 1" if check_every == 1 else "between steps 1 and 49") in doctor.findings[0]["message"]
    assert doctor.findings[1]["step"] == (2 if check_every == 1 else 50)
    message = doctor.findings[1]["message"]
    if check_every == 1:
        # At step 2 the weights are finite but ≈1e34 (lr 1e12 × gradients ≈1e22, whose float32 norm alone overflowed
        # at step 1; nothing is NaN yet): the second Linear's products overflow. Far from float32's edges (3.4e38),
        # so no thread count or CPU decides it; only an update with non-finite gradients would make weights NaN.
        assert "`2` (Linear)" in message and "its weights reach" in message and "overflow float32" in message
        assert "already NaN/inf" not in message and "log/sqrt" not in message
    else:
        assert "weights are already NaN/inf" in message  # 48 steps after the NaN loss it has reached the weights
    assert ("check_every 1" in doctor.findings[1]["message"]) == (check_every > 1)
    out = assert_printed_once(capsys, "exploding_gradients")
    assert out.count("[nonfinite_loss]") == 1
    assert "training stopped" in str(raised.value) and isinstance(raised.value, FrameworkError)


def test_learning_rate_zero_plateaus(tmp_path, capsys):
    torch.manual_seed(2)  # initial losses 1.12-1.15 per batch, above ln 3 = 1.099: the reference is chance level
    train(tmp_path, mlp(), Doctor(plateau_window=8), lr=0.0, epochs=6)  # 4 steps per epoch: 3 windows
    found = findings(tmp_path)
    assert set(found) == {"loss_plateau"} and found["loss_plateau"]["step"] == 8
    message = found["loss_plateau"]["message"]
    assert "over steps 0-7" in message and "chance level, ln(3)" in message
    assert_printed_once(capsys, "loss_plateau")  # the 2nd and 3rd windows plateau too: printed once
    assert logged(tmp_path) == {"loss_plateau": [8]}


def test_resumed_past_a_plateau_window_the_windows_start_at_the_restored_step(tmp_path, capsys):
    """fit_start runs before the checkpoint restores state.step: the doctor derives its step counters at its first
    training hook. (It once took the window's start, 0, in fit_start: one step after resuming past a window the
    window held one loss and `statistics.fmean([])` raised.) The resumed window compares with chance level only."""
    def stuck_at_chance():  # a zero head predicts uniformly: the loss is ln 3 and, at lr 0, stays there
        model = mlp()
        torch.nn.init.zeros_(model[-1].weight), torch.nn.init.zeros_(model[-1].bias)
        return model

    train(tmp_path, stuck_at_chance(), Doctor(plateau_window=8), lr=0.0, epochs=3)  # 12 steps: a window at step 8
    assert findings(tmp_path)["loss_plateau"]["step"] == 8
    trainer, summary = train(tmp_path, stuck_at_chance(), Doctor(plateau_window=8), lr=0.0, epochs=6,
                             resume_from="latest")
    assert trainer.state.step == summary["run"]["steps"] == 24
    found = findings(tmp_path)  # the resumed run's own findings: its first window is steps 12-19
    assert set(found) == {"loss_plateau"} and found["loss_plateau"]["step"] == 20
    assert "over steps 12-19" in found["loss_plateau"]["message"]
    assert "chance level, ln(3)" in found["loss_plateau"]["message"]


def test_plateau_after_resume_has_no_reference_but_chance():
    """A resumed run's first window is late in training, where a converging loss may rightly fall < 1%: without the
    run's first losses (not checkpointed) only chance level is a reference; with no chance level, no check."""
    doctor = Doctor(plateau_window=4, check_every=1)  # reads of its own: after_optimizer_step checks the window
    state = types.SimpleNamespace(step=300, accelerator=types.SimpleNamespace(is_main_process=True,
                                                                             log=lambda *a, **k: None))
    doctor._begin(state)
    doctor._window = [torch.tensor(v) for v in (0.50, 0.50, 0.499, 0.499)]  # converged: flat, far below chance
    state.step = 304
    doctor.after_optimizer_step(state)
    assert doctor.findings == []  # no chance level known: nothing to compare with
    doctor._chance = math.log(10)
    doctor._window = [torch.tensor(v) for v in (0.50, 0.50, 0.499, 0.499)]
    state.step = 308
    doctor.after_optimizer_step(state)
    assert doctor.findings == []  # far below chance: no plateau
    doctor._window = [torch.tensor(v) for v in (2.3, 2.3, 2.3, 2.3)]
    state.step = 312
    doctor.after_optimizer_step(state)
    assert [f["code"] for f in doctor.findings] == ["loss_plateau"]  # stuck at chance: still caught


class NaNLayer(nn.Module):
    def forward(self, x):
        return torch.log(x - 10.0)  # log of a negative number: NaN


class WithNaNLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.bad = NaNLayer()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.bad(self.embed(x)))


def test_nan_producing_layer_is_named_and_stops_training(tmp_path, capsys):
    doctor = Doctor(check_every=1)  # a read of its own per step: before the NaN's update reaches the weights
    with pytest.raises(NonFiniteLossError, match=r"`bad` \(NaNLayer\)") as raised:
        train(tmp_path, WithNaNLayer(), doctor)
    assert "turns finite inputs into NaN/inf" in str(raised.value) and "clamp before log" in str(raised.value)
    assert [(f["code"], f["step"]) for f in doctor.findings] == [("nonfinite_loss", 0)]  # seen on the first step
    assert_printed_once(capsys, "nonfinite_loss")


def test_nonfinite_loss_can_be_reported_without_stopping(tmp_path, capsys):
    train(tmp_path, WithNaNLayer(), Doctor(check_every=2, stop_on_nonfinite=False), epochs=2)
    found = findings(tmp_path)
    assert "nonfinite_loss" in found
    assert_printed_once(capsys, "nonfinite_loss")


def test_nan_is_caught_at_the_next_log_line_by_default(tmp_path, capsys):
    """The default doctor reads its flag with the log line (every 3 steps here): the NaN of step 0 stops training
    at the line of step 3, named with the steps it covers; its updates have made the weights NaN by then, which the
    replay says, with the way to stop on the very batch."""
    doctor = Doctor()
    with pytest.raises(NonFiniteLossError, match=r"`embed` \(Linear\), whose weights are already NaN/inf") as raised:
        train(tmp_path, WithNaNLayer(), doctor, log_every=3)
    assert [(f["code"], f["step"]) for f in doctor.findings] == [("exploding_gradients", 3), ("nonfinite_loss", 3)]
    assert "between steps 0 and 2" in doctor.findings[0]["message"]  # the gradients' max over the same steps
    assert "the loss became NaN/inf between steps 0 and 2" in str(raised.value)
    assert "--techniques.doctor.check_every 1" in str(raised.value)
    assert_printed_once(capsys, "nonfinite_loss")
    assert logged(tmp_path) == {"exploding_gradients": [3], "nonfinite_loss": [3]}


def count_host_syncs(run) -> int:
    """Calls of the Tensor methods that copy values to the host (benchmarks/host_syncs.py's list) while `run()`."""
    names = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    calls = [0]

    def counting(original):
        def call(tensor, *args, **kwargs):
            calls[0] += 1
            return original(tensor, *args, **kwargs)
        return call

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        run()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return calls[0]


def test_log_line_readers_ride_in_its_one_read():
    """TrainState.read_with_log_line: each provide()'s values join the log line's gather and its one host read; each
    consume gets them as floats, one row per rank (two ranks faked: rank 1's values are rank 0's + 10)."""
    from framework.state import TrainState
    from framework.tracking import LogWindow

    state = TrainState(accelerator=None, model=None, optimizer=None, output_dir=None)
    got: dict[str, object] = {}
    pair = (lambda: torch.tensor([1.0, 2.0]), lambda rows: got.setdefault("pair", rows))
    state.read_with_log_line(*pair)
    state.read_with_log_line(*pair)  # registered once
    state.read_with_log_line(lambda: None, lambda rows: got.setdefault("nothing", rows))
    state.read_with_log_line(lambda: torch.tensor([True]), lambda rows: got.setdefault("flag", rows))
    assert len(state.log_line_readers) == 3
    window = LogWindow(torch.device("cpu"))
    window.add(torch.tensor(2.0), samples=4, tokens=0, metrics={})
    two_ranks = types.SimpleNamespace(gather=lambda row: torch.cat([row, row + 10]))
    syncs = count_host_syncs(lambda: got.setdefault("line", window.flush(two_ranks, {"x": torch.tensor(5.0)},
                                                                          state.log_line_readers)))
    assert syncs == 1
    assert got["pair"] == [[1.0, 2.0], [11.0, 12.0]] and got["flag"] == [[1.0], [11.0]] and "nothing" not in got
    assert got["line"]["train/loss"] == 7.0 and got["line"]["x"] == 5.0  # the mean over ranks of 2 and 12
    assert got["line"]["perf/step_seconds/rank_1"] == pytest.approx(got["line"]["perf/step_seconds/rank_0"] + 10)


def test_default_doctor_makes_no_host_sync_of_its_own(tmp_path):
    """200 steps logged every 50 (the default): the default doctor's values ride in the log line's one read, so the
    run makes exactly as many host syncs as without the doctor; with reads of its own (check_every 50) it makes
    more (the counter sees them: 0.08 per step before the doctor's reads were folded into the log line's)."""
    data = tiny_classification_data(800, features=4, classes=3)

    def syncs(doctor, name):
        def run():
            train(tmp_path / name, mlp(), doctor, data=data, epochs=1, log_every=50)
        return count_host_syncs(run)

    without = syncs(None, "none")
    assert syncs(Doctor(), "default") == without
    assert syncs(Doctor(check_every=50), "own_reads") >= without + 4


def test_findings_at_the_log_lines_cover_the_steps_since_the_last(tmp_path, capsys):
    """check_every None: each check runs at a log line (every 3 steps), on the values since the previous one."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight *= 100
    train(tmp_path / "initial", model, Doctor(), lr=0.01, log_every=3)
    assert [(f["code"], f["step"]) for f in findings(tmp_path / "initial").values()] == [("initial_loss", 0)]
    assert logged(tmp_path / "initial") == {"initial_loss": [0]}  # read at step 3, logged at its own step 0

    torch.manual_seed(2)
    train(tmp_path / "plateau", mlp(), Doctor(plateau_window=8), lr=0.0, epochs=6, log_every=3)  # 24 steps
    found = findings(tmp_path / "plateau")
    assert set(found) == {"loss_plateau"} and found["loss_plateau"]["step"] == 9  # the first line ≥ 8 steps in
    assert "over steps 0-8" in found["loss_plateau"]["message"]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), Tiny(), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    train(tmp_path / "vanishing", model, Doctor(), log_every=3)  # 12 steps: the latest norms at lines 3, 6, 9, 12
    found = findings(tmp_path / "vanishing")
    assert set(found) == {"vanishing_gradients"} and found["vanishing_gradients"]["step"] == 6
    assert "at steps 2 and 5" in found["vanishing_gradients"]["message"]

    torch.manual_seed(0)
    train(tmp_path / "exploding", mlp(), Doctor(), lr=30.0, epochs=10, log_every=5)  # 40 steps
    found = findings(tmp_path / "exploding")
    assert set(found) == {"exploding_gradients"}
    step = found["exploding_gradients"]["step"]
    assert step % 5 == 0 and f"between steps {step - 5} and {step - 1}" in found["exploding_gradients"]["message"]
    capsys.readouterr()


def test_memorised_tiny_set_overfits(tmp_path, capsys):
    # Random labels: nothing generalises; a wide MLP memorises 16 samples and grows confident on held-out ones.
    data = tiny_classification_data(32, features=4, classes=3, seed=1)
    torch.manual_seed(0)
    model = mlp(hidden=256, depth=3)
    train(tmp_path, model, Doctor(), optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), data=data[:16],
          val=data[16:], batch_size=8, epochs=10)
    found = findings(tmp_path)
    assert "overfitting" in found, found
    assert set(found) <= {"overfitting"}
    assert_printed_once(capsys, "overfitting")


class Tiny(nn.Module):
    def forward(self, x):
        return x * 1e-9  # the layers before it receive ~1e-9 of the signal


def test_vanishing_gradients(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), Tiny(), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    train(tmp_path, model, Doctor(check_every=2))
    found = findings(tmp_path)
    assert set(found) == {"vanishing_gradients"}
    assert "0 " in found["vanishing_gradients"]["message"] and "of 3 layers" in found["vanishing_gradients"]["message"]
    assert found["vanishing_gradients"]["step"] == 4  # checks at steps 2 and 4 (never at 0)
    assert_printed_once(capsys, "vanishing_gradients")


def test_healthy_tiny_run_is_silent(tmp_path, capsys):
    torch.manual_seed(0)
    data = tiny_classification_data(64, features=4, classes=3, seed=0)
    for sample in data:  # a learnable rule, so the loss really falls
        sample["label"] = torch.tensor(int(sample["pixel_values"][0] > 0) + int(sample["pixel_values"][1] > 0))
    trainer, _ = train(tmp_path, mlp(), Doctor(check_every=1, plateau_window=8, overfit_patience=2), data=data[:48],
                       val=data[48:], lr=0.2, batch_size=8, epochs=8, gradient_accumulation_steps=2)
    assert trainer.state.step == 24 and findings(tmp_path) == {}
    assert "doctor: no findings" in capsys.readouterr().out


def test_fp16_overflows_the_scaler_skips_are_not_findings(tmp_path):
    """Under fp16 a GradScaler's overflowing steps (inf gradients, step skipped, scale lowered) are normal."""
    from helpers import LossTimes, make_trainer, scaled_accelerator

    doctor = Doctor(check_every=1)
    trainer = make_trainer(tmp_path, [doctor, LossTimes(1000.0)], batch_size=2, n=8, epochs=2,
                           accelerator=scaled_accelerator(3e38))
    trainer.fit()
    assert trainer.accelerator.scaler.get_scale() < 3e38 / 2**3  # steps did overflow (scale × 1000 × gradient = inf)
    assert doctor.findings == []


def test_sam_second_pass_is_not_counted_twice(tmp_path):
    from helpers import make_trainer

    from framework.techniques import SAM

    doctor = Doctor(check_every=1, plateau_window=1000)  # never checked: the window keeps every loss it saw
    trainer = make_trainer(tmp_path, [doctor, SAM(rho=0.05)], batch_size=2, n=8, epochs=2)
    trainer.fit()
    assert trainer.state.step == 8 and len(doctor._window) == 8  # SAM runs the loss hooks twice per step
    assert doctor.findings == []


def test_trainer_adds_the_doctor_first_unless_told_not_to(tmp_path):
    data = tiny_classification_data(8)

    def techniques(**config):
        model = nn.Linear(4, 3)
        config = TrainerConfig(output_dir=str(tmp_path), tracker="none", **config)
        trainer = Trainer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), ClassificationTask(3),
                          DataLoader(data, batch_size=4))
        return [t.name for t in trainer.techniques]

    assert techniques(techniques={"ema": {}}) == ["doctor", "ema"]
    assert techniques(doctor=False, techniques={"ema": {}}) == ["ema"]
    assert techniques(techniques={"ema": {}, "doctor": {"check_every": 5}}) == ["ema", "doctor"]  # listed: as listed


def test_doctor_runs_on_every_launch_config():
    from framework.compat import LAUNCH_BACKENDS, compatibility

    assert all(compatibility("doctor", backend) is None for backend in LAUNCH_BACKENDS.values())


def image_recipe():
    return load_recipe("image_classification")


def test_healthy_image_recipe_is_silent(tmp_path, capsys):
    """The image recipe with its YAML (label smoothing, warmup + cosine, clipping, EMA) for 2 epochs, the checks made
    frequent so that each runs several times (gradients every 5 steps, 2 plateau windows, overfitting from the 2nd
    evaluation): no finding."""
    trainer = image_recipe().main([
        "--config", str(ROOT / "recipes" / "configs" / "image_classification.yaml"), "--epochs", "2",
        "--tracker", "none", "--output_dir", str(tmp_path), "--log_every", "20",
        "--techniques.doctor.check_every", "5", "--techniques.doctor.plateau_window", "20",
        "--techniques.doctor.overfit_patience", "1",
    ])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "doctor" in summary["run"]["techniques"] and summary["doctor"] == []
    assert trainer.state.step == 2 * trainer.state.steps_per_epoch >= 40
    assert "doctor: no findings" in capsys.readouterr().out


# The default 20-epoch image run is silent: checked on the same launch as its accuracy, in
# tests/test_recipe.py::test_default_config_reaches_its_measured_test_accuracy.


@pytest.mark.slow
def test_two_ranks_stop_together_on_a_nonfinite_loss(tmp_path):
    """Two gloo ranks: the non-finite flag is summed over ranks at the same step on both, so both stop there (no rank
    is left waiting in a collective); the finding is printed once, by the main process."""
    result = launch(ROOT / "recipes" / "image_classification.py", "--epochs", "1", "--tracker", "none",
                    "--output_dir", str(tmp_path), "--optimizer.name", "sgd", "--optimizer.lr", "1e30",
                    "--techniques.doctor.check_every", "5", launch_config="multi_cpu.yaml", timeout=300)
    assert result.returncode != 0
    assert result.stdout.count("[nonfinite_loss] step 5:") == 1, result.stdout[-3000:]
    assert result.stdout.count("[exploding_gradients]") == 1
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_two_ranks_stop_together_when_one_ranks_loss_is_nonfinite_at_a_log_line(tmp_path):
    """The default doctor, two gloo ranks, a line every 5 steps: rank 1's loss alone is NaN, at step 4. The log
    line's gather carries both ranks' flags, so both see the count and stop at the line of step 5 (each writes
    stopped_rank<N>); the finding is printed once, by the main process."""
    result = launch(ROOT / "tests" / "scripts" / "nonfinite_on_one_rank.py", str(tmp_path),
                    launch_config="multi_cpu.yaml", timeout=300)
    assert result.returncode != 0
    assert [(tmp_path / f"stopped_rank{rank}").read_text() for rank in (0, 1)] == ["5", "5"], result.stderr[-3000:]
    assert result.stdout.count("[nonfinite_loss] step 5:") == 1, result.stdout[-3000:]
    assert "the loss became NaN/inf between steps 0 and 4" in result.stdout
    assert not (tmp_path / "summary.json").exists()
