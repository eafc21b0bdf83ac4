"""Monitoring techniques: activation statistics and gradient flow against hand computations on a tiny model (and no
hook left behind), the DeepSpeed refusal, both inside the loop; the profiler's trace and top-ops table."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from framework.backend import Backend
from framework.config import TrainerConfig, build_techniques
from framework.errors import ConfigError, IncompatibleError
from framework.loop import Trainer
from framework.task import ClassificationTask
from framework.technique import check_techniques
from framework.techniques import ActivationStats, GradientFlow, Profiler, activation_stats, gradient_flow
from helpers import tiny_classification_data, tiny_state


def fixed_model() -> nn.Sequential:
    """Linear(3, 4) → ReLU → Linear(4, 2) → Tanh with fixed weights: some ReLU outputs are exactly 0, some tanh
    outputs saturate."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Tanh())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [-2.0, 0.0, 1.0], [0.5, 0.5, 0.5], [3.0, 1.0, -1.0]]))
        model[0].bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        model[2].weight.copy_(torch.tensor([[2.0, -1.0, 1.5, 0.5], [-0.5, 1.0, 0.25, 2.0]]))
        model[2].bias.copy_(torch.tensor([0.0, -0.1]))
    return model


INPUTS = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0], [-1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])


def all_hooks(model: nn.Module) -> list[str]:
    """Every forward / backward hook left on any module of `model`."""
    found = []
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(module, kind):
                found.append(f"{name or 'model'}.{kind}")
    return found


# --- activation_stats -------------------------------------------------------------------------------------------------
def test_activation_stats_match_a_hand_computation():
    x = torch.tensor([[0.0, 0.5, -0.995, 2.0], [0.0, 1.0, 0.3, -0.2]])
    stats = activation_stats(x, saturation=0.99)
    mean = x.sum() / 8  # (0.5 - 0.995 + 2 + 1 + 0.3 - 0.2) / 8
    assert stats["mean"].item() == pytest.approx(2.605 / 8)
    assert stats["std"].item() == pytest.approx(math.sqrt(((x - mean) ** 2).sum().item() / 8))  # population std
    assert stats["zeros"].item() == pytest.approx(2 / 8)
    assert stats["saturated"].item() == pytest.approx(3 / 8)  # -0.995, 2.0, 1.0 have |x| ≥ 0.99
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in stats.values())
    assert "saturated" not in activation_stats(x)
    # A sigmoid's range (0, 1) is mapped to [-1, 1]: saturated where x ≤ 0.005 or x ≥ 0.995.
    sigmoid_outputs = torch.tensor([0.001, 0.5, 0.996, 0.3, 0.01])
    assert activation_stats(sigmoid_outputs, 0.99, bounds=(0.0, 1.0))["saturated"].item() == pytest.approx(2 / 5)
    # bf16 outputs are measured in fp32, without touching autograd.
    y = x.to(torch.bfloat16).requires_grad_(True)
    stats = activation_stats(y)
    assert stats["mean"].dtype == torch.float32 and not stats["mean"].requires_grad


def test_activation_stats_technique_measures_one_forward_per_measured_step(tmp_path):
    state = tiny_state(tmp_path, fixed_model())
    model = state.model
    technique = ActivationStats(every=2)
    technique.fit_start(state)
    state.step = 0  # the next optimizer step is step 1: not measured
    technique.on_batch(state, None)
    assert all_hooks(model) == [] and state.logs == {}

    state.step = 1  # step 2: measured
    technique.on_batch(state, None)
    assert len(all_hooks(model)) == 4  # Linear, ReLU, Linear, Tanh
    loss = model(INPUTS).sum()
    technique.on_loss(state, loss, None, None)
    assert all_hooks(model) == []  # removed right after the measured forward, before backward

    # By hand: the same tensors through the same weights.
    h0 = INPUTS @ model[0].weight.T + model[0].bias
    h1 = torch.relu(h0)
    h2 = h1 @ model[2].weight.T + model[2].bias
    h3 = torch.tanh(h2)
    expected = {}
    for name, h in {"0": h0, "1": h1, "2": h2, "3": h3}.items():
        expected[f"activations/{name}/mean"] = h.mean()
        expected[f"activations/{name}/std"] = h.std(correction=0)
        expected[f"activations/{name}/zeros"] = (h == 0).float().mean()
    expected["activations/3/saturated"] = (h3.abs() >= 0.99).float().mean()
    assert set(state.logs) == set(expected)  # saturation only for the bounded Tanh
    for key, value in expected.items():
        torch.testing.assert_close(state.logs[key], value.detach(), msg=key)
    assert 0 < state.logs["activations/1/zeros"] < 1  # the fixed weights do kill some ReLU outputs
    assert 0 < state.logs["activations/3/saturated"] < 1

    # The second micro-batch of the same step (gradient accumulation) is not measured again.
    state.logs.clear()
    technique.on_batch(state, None)
    model(INPUTS * 10)
    assert all_hooks(model) == [] and state.logs == {}
    technique.fit_end(state)
    assert all_hooks(model) == []


def test_activation_stats_module_patterns_and_fit_end_removes_hooks(tmp_path):
    state = tiny_state(tmp_path, fixed_model())
    technique = ActivationStats(every=1, modules=["ReLU", "2"], saturation=None)
    technique.fit_start(state)
    technique.on_batch(state, None)
    assert len(all_hooks(state.model)) == 2
    state.model(INPUTS)
    assert {key.split("/")[1] for key in state.logs} == {"1", "2"}
    technique.fit_end(state)  # the forward ended without on_loss (e.g. an error): fit_end still removes the hooks
    assert all_hooks(state.model) == []
    with pytest.raises(ConfigError, match="no module of Sequential matches.*Linear, ReLU"):
        ActivationStats(modules=["Conv2d"]).fit_start(state)
    with pytest.raises(ConfigError, match="activation_stats.every"):
        ActivationStats(every=0)
    with pytest.raises(ConfigError, match="activation_stats.saturation"):
        build_techniques({"activation_stats": {"saturation": 1.5}})


# --- gradient_flow ----------------------------------------------------------------------------------------------------
def backward_once(model: nn.Module) -> None:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(INPUTS), torch.tensor([0, 1, 1, 0])).backward()


def test_gradient_flow_matches_hand_values_weights_only_by_default():
    model = fixed_model()
    backward_once(model)
    stats = gradient_flow(model.named_parameters())
    assert list(stats) == ["0.weight", "2.weight"]  # biases left out, model order kept
    for name, (mean, top) in stats.items():
        grad = model.get_parameter(name).grad
        assert grad.abs().max() > 0
        torch.testing.assert_close(mean, grad.abs().mean())
        torch.testing.assert_close(top, grad.abs().max())
    with_biases = gradient_flow(model.named_parameters(), include_biases=True)
    assert list(with_biases) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    torch.testing.assert_close(with_biases["2.bias"][1], model[2].bias.grad.abs().max())
    model[0].weight.grad = None  # frozen / unused parameters have no gradient: skipped
    assert list(gradient_flow(model.named_parameters())) == ["2.weight"]


def test_gradient_flow_gathers_a_sharded_dtensor_gradient():
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = torch.tensor([[1.0, -4.0], [2.0, 0.5], [-3.0, 0.0]])
        parameter = nn.Parameter(distribute_tensor(torch.zeros(3, 2), mesh, [Shard(0)]))
        parameter.grad = distribute_tensor(full, mesh, [Shard(0)])
        [(mean, top)] = gradient_flow([("w", parameter)]).values()
        assert not isinstance(mean, type(parameter.grad))
        assert mean.item() == pytest.approx(10.5 / 6) and top.item() == 4.0
    finally:
        dist.destroy_process_group()


def test_gradient_flow_technique_logs_and_draws_on_measured_steps(tmp_path):
    state = tiny_state(tmp_path, fixed_model())
    technique = GradientFlow(every=3)
    technique.fit_start(state)
    backward_once(state.model)
    state.step = 1  # step 2: not measured
    technique.before_optimizer_step(state)
    assert state.logs == {} and not (tmp_path / "gradient_flow").exists()
    state.step = 2  # step 3: measured
    technique.before_optimizer_step(state)
    for name in ("0.weight", "2.weight"):
        grad = state.model.get_parameter(name).grad
        torch.testing.assert_close(state.logs[f"grad_flow/{name}/mean"], grad.abs().mean())
        torch.testing.assert_close(state.logs[f"grad_flow/{name}/max"], grad.abs().max())
    assert len(state.logs) == 4
    png = tmp_path / "gradient_flow" / "step_00000003.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all_hooks(state.model) == []  # reads .grad: no hook at all


def test_gradient_flow_refuses_deepspeed_and_the_others_run_there():
    for stage in (1, 2, 3):
        with pytest.raises(IncompatibleError, match=r"gradient_flow .*DeepSpeed.*DDP launch config"):
            check_techniques([GradientFlow()], Backend("DEEPSPEED", 2, deepspeed_stage=stage))
        check_techniques([ActivationStats(), Profiler()], Backend("DEEPSPEED", 2, deepspeed_stage=stage))
    check_techniques([GradientFlow(), ActivationStats(), Profiler()], Backend("MULTI_GPU", 8, "fp16", "cuda"))
    with pytest.raises(ConfigError, match="gradient_flow.every"):
        GradientFlow(every=-1)


# --- inside the loop --------------------------------------------------------------------------------------------------
def run(tmp_path, techniques, epochs: int = 3, **config) -> tuple[Trainer, list[dict]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = DataLoader(tiny_classification_data(n=8), batch_size=4)  # 2 steps per epoch
    config = TrainerConfig(output_dir=str(tmp_path), epochs=epochs, tracker="none", log_every=1, **config)
    trainer = Trainer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), ClassificationTask(num_classes=3),
                      data, techniques=techniques)
    trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return trainer, lines


def test_activation_stats_and_gradient_flow_in_the_loop(tmp_path):
    trainer, lines = run(tmp_path, [ActivationStats(every=2), GradientFlow(every=2)])
    train = {line["step"]: line for line in lines if "train/loss" in line}
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    keys = {f"activations/{layer}/{stat}" for layer in "012" for stat in ("mean", "std", "zeros")}
    keys |= {f"grad_flow/{name}/{stat}" for name in ("0.weight", "2.weight") for stat in ("mean", "max")}
    for step, line in train.items():
        logged = {key for key in line if key.startswith(("activations/", "grad_flow/"))}
        assert logged == (keys if step % 2 == 0 else set()), step
        if step % 2 == 0:
            assert all(math.isfinite(line[key]) for key in keys)
            assert line["grad_flow/2.weight/max"] >= line["grad_flow/2.weight/mean"] > 0
            assert 0 <= line["activations/1/zeros"] <= 1 and line["activations/1/mean"] >= 0  # ReLU output
    pictures = [(line["step"], line["picture/gradient_flow"]) for line in lines if "picture/gradient_flow" in line]
    assert pictures == [(2, "step_00000002.png"), (4, "step_00000004.png"), (6, "step_00000006.png")]
    assert sorted(p.name for p in (tmp_path / "gradient_flow").iterdir()) == [name for _, name in pictures]
    assert all_hooks(trainer.state.model) == []


def test_profiler_in_the_loop_writes_a_chrome_trace_and_the_top_ops(tmp_path, capsys):
    trainer, _ = run(tmp_path, [Profiler(wait=1, warmup=1, active=2, row_limit=5)])
    # Steps 1 wait, 2 warmup, 3-4 recorded: the trace is ready when step 4 ends.
    assert sorted(p.name for p in (tmp_path / "profiler").iterdir()) == ["top_ops.txt", "trace_rank0_step4.json"]
    trace = json.loads((tmp_path / "profiler" / "trace_rank0_step4.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert names & {"aten::addmm", "aten::linear", "aten::mm"}  # the model's Linear layers
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names and "ProfilerStep#1" not in names  # the active steps only
    table = (tmp_path / "profiler" / "top_ops.txt").read_text()
    assert "window ending at step 4" in table and "Self CPU" in table and "aten::" in table
    printed = capsys.readouterr().out
    assert "profiler: top operators of the window ending at step 4" in printed and "Self CPU" in printed
    assert not torch.autograd._profiler_enabled()  # stopped at fit_end
    assert json.loads((tmp_path / "summary.json").read_text())["profiler"]["traces"] == [
        str(tmp_path / "profiler" / "trace_rank0_step4.json")]


def test_profiler_cut_short_exports_what_it_recorded_or_says_why_nothing(tmp_path, capsys):
    state = tiny_state(tmp_path, fixed_model())
    profiler = Profiler(wait=0, warmup=1, active=5)
    profiler.fit_start(state)
    for step in (1, 2, 3):  # warmup, then two of five active steps before training ends
        backward_once(state.model)
        state.step = step
        profiler.after_optimizer_step(state)
    profiler.fit_end(state)
    assert not torch.autograd._profiler_enabled()
    trace = json.loads((tmp_path / "profiler" / "trace_rank0_step3.json").read_text())
    assert {"aten::addmm", "aten::linear", "aten::mm"} & {event.get("name") for event in trace["traceEvents"]}
    assert "aten::" in (tmp_path / "profiler" / "top_ops.txt").read_text()

    early = Profiler(wait=5, warmup=2)
    early.fit_start(state)
    state.step = 4
    early.after_optimizer_step(state)
    early.fit_end(state)
    assert early.traces == []
    assert "nothing recorded" in capsys.readouterr().out
    assert "wait + warmup = 7" in (tmp_path / "profiler" / "top_ops.txt").read_text()
    with pytest.raises(ConfigError, match="profiler.active"):
        Profiler(active=0)
