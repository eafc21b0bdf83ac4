"""Gradient centralization, Lookahead, early stopping and best-model saving: pure functions against hand
computations, hooks on small states, resume, and one real 2-process run that combines them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from framework.backend import Backend
from framework.errors import ConfigError, IncompatibleError
from framework.technique import check_techniques
from framework.techniques import (
    BestModel,
    EarlyStopping,
    GradientCentralization,
    Lookahead,
    centralize_gradients_,
    lookahead_sync_,
)
from helpers import ROOT, launch, make_trainer, plain_accuracy, reset_accelerate, tiny_state


def test_centralize_gradients_subtracts_each_output_channels_mean():
    linear = torch.nn.Parameter(torch.zeros(2, 3))
    linear.grad = torch.tensor([[1.0, 2.0, 3.0], [4.0, 6.0, 8.0]])
    conv = torch.nn.Parameter(torch.zeros(2, 1, 2, 2))
    conv.grad = torch.arange(8.0).reshape(2, 1, 2, 2)
    bias = torch.nn.Parameter(torch.zeros(2))
    bias.grad = torch.tensor([5.0, 7.0])
    centralize_gradients_([linear, conv, bias])
    assert torch.equal(linear.grad, torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0]]))
    assert torch.equal(conv.grad, torch.tensor([-1.5, -0.5, 0.5, 1.5] * 2).reshape(2, 1, 2, 2))
    assert torch.equal(bias.grad, torch.tensor([5.0, 7.0]))  # 1-D parameters are left alone


def test_gradient_centralization_refuses_deepspeed():
    check_techniques([GradientCentralization()], Backend("MULTI_GPU", 8, "fp16", "cuda"))
    with pytest.raises(IncompatibleError, match="DeepSpeed"):
        check_techniques([GradientCentralization()], Backend("DEEPSPEED", 2, deepspeed_stage=2))


def test_lookahead_sync_matches_the_formula():
    slow, fast = [torch.tensor([0.0, 2.0])], [torch.tensor([10.0, 4.0])]
    lookahead_sync_(slow, fast, 0.5)
    assert torch.equal(slow[0], torch.tensor([5.0, 3.0])) and torch.equal(fast[0], torch.tensor([5.0, 3.0]))


def test_lookahead_syncs_every_k_steps(tmp_path):
    state = tiny_state(tmp_path)
    lookahead = Lookahead(k=2, alpha=0.25)
    lookahead.fit_start(state)
    start = [p.detach().clone() for p in state.model.parameters()]
    for step in (1, 2):
        with torch.no_grad():
            for p in state.model.parameters():
                p.add_(4.0)
        state.step = step
        lookahead.after_optimizer_step(state)
    for p, slow, p0 in zip(state.model.parameters(), lookahead.slow, start):
        torch.testing.assert_close(slow, p0 + 0.25 * 8.0)  # after step 2: slow moved a quarter of the way
        assert torch.equal(p, slow)
    with pytest.raises(IncompatibleError, match="DeepSpeed"):
        check_techniques([Lookahead()], Backend("DEEPSPEED", 2, deepspeed_stage=1))


def test_lookahead_slow_weights_survive_resume(tmp_path):
    def run(output_dir, **config):
        lookahead = Lookahead(k=3, alpha=0.5)
        trainer = make_trainer(output_dir, [lookahead], batch_size=4, n=16, epochs=2, shuffle=True,
                               keep_checkpoints=5, **config)
        trainer.fit()
        return trainer, lookahead

    full, full_lookahead = run(tmp_path / "full")
    reset_accelerate()
    resumed, resumed_lookahead = run(tmp_path / "resumed",
                                     resume_from=str(tmp_path / "full" / "checkpoints" / "step_00000004"))
    for a, b in zip(resumed_lookahead.slow, full_lookahead.slow):
        assert torch.equal(a, b)
    for a, b in zip(resumed.state.model.parameters(), full.state.model.parameters()):
        assert torch.equal(a, b)


def metric_state(tmp_path, values):
    """A tiny state whose epoch ends see `values` as fresh validation results, one per epoch."""
    state = tiny_state(tmp_path)
    state.validates = True
    for epoch, value in enumerate(values, 1):
        state.epoch, state.step = epoch, epoch * 10
        state.eval_metrics, state.eval_step = {"val/loss": value, "val/accuracy": 1 - value}, state.step
        yield state


def test_early_stopping_stops_at_the_expected_epoch(tmp_path):
    stopper = EarlyStopping(metric="val/loss", patience=2, min_delta=0.01)
    stopped = None
    for state in metric_state(tmp_path, [1.0, 0.8, 0.795, 0.7, 0.71, 0.70, 0.5]):
        stopper.fit_start(state)
        stopper.epoch_end(state)
        if state.should_stop:
            stopped = state.epoch
            break
    # 0.795 is not 0.01 better than 0.8 (1 without improvement), 0.7 is; 0.71 and 0.70 are not: stop after epoch 6
    assert stopped == 6 and stopper.best == 0.7


def test_best_model_keeps_top_k_and_records_the_winner(tmp_path):
    best = BestModel(metric="val/accuracy", mode="max", top_k=2)
    for state in metric_state(tmp_path, [0.5, 0.2, 0.4, 0.3]):  # accuracy 0.5, 0.8, 0.6, 0.7
        best.epoch_end(state)
    assert [(entry["step"], round(entry["value"], 6)) for entry in best.ranking] == [(20, 0.8), (40, 0.7)]
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["step_00000020.safetensors",
                                                                      "step_00000040.safetensors"]
    assert state.summary["best_model"]["step"] == 20
    assert (tmp_path / "model_best.safetensors").read_bytes() == (tmp_path / "best" / "step_00000020.safetensors").read_bytes()


def test_early_stopping_and_best_model_need_validation(tmp_path):
    for technique in (EarlyStopping(), BestModel()):
        reset_accelerate()
        with pytest.raises(ConfigError, match="no validation data"):
            make_trainer(tmp_path, [technique], eval_every=0).fit()


@pytest.mark.slow
def test_two_ranks_stop_together_and_export_the_best_ema_weights(tmp_path):
    """2 processes with lookahead, centralization, early stopping and best-model saving (on EMA weights)."""
    result = launch(ROOT / "tests" / "scripts" / "recipe_then_dump_params.py", "--config",
                    str(ROOT / "recipes" / "configs" / "image_classification.yaml"), "--output_dir", str(tmp_path),
                    "--epochs", "10", "--tracker", "none", "--techniques",
                    "{gradient_centralization: {}, lookahead: {k: 3}, ema: {decay: 0.9}, early_stopping: "
                    "{metric: val/loss, mode: max, patience: 1}, best_model: {metric: val/loss, mode: max}, "
                    "dump_params: {}}", launch_config="multi_cpu.yaml")
    assert result.returncode == 0, result.stderr[-3000:]  # a rank that went on alone would hang the other
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["num_processes"] == 2
    validations = [(line["step"], line["val/loss"]) for line in map(json.loads, (tmp_path / "metrics.jsonl").open())
                   if "val/loss" in line]
    # The same rule by hand on the logged sequence: stop at the first epoch that does not beat the best so far.
    best_step, best_value, expected_epochs = None, -float("inf"), None
    for epoch, (step, value) in enumerate(validations, 1):
        if value > best_value:
            best_step, best_value = step, value
        else:
            expected_epochs = epoch
            break
    assert expected_epochs is not None and summary["run"]["epochs"] == expected_epochs < 10
    assert summary["best_model"]["step"] == best_step
    assert summary["best_model"]["value"] == pytest.approx(best_value)
    rank0, rank1 = (load_file(tmp_path / f"params_rank{rank}.safetensors") for rank in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    best = load_file(tmp_path / "model_best.safetensors")  # EMA weights of the best epoch, not the final live ones
    assert not torch.equal(best["head.2.weight"], load_file(tmp_path / "model.safetensors")["head.2.weight"])
    plain_accuracy(tmp_path / "model_best.safetensors")  # loads strictly into a plain single-process model


def test_layerwise_lr_groups_carry_the_expected_lrs_and_weight_decays(tmp_path):
    from framework.models.resnet import ResNet, ResNetConfig
    from framework.state import TrainState
    from framework.techniques import LayerwiseLR

    from framework.optim import OptimizerConfig

    model = ResNet(ResNetConfig())  # stem, blocks.0-2, head: depths 0-4
    for optimizer in (OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.05).build(model),
                      OptimizerConfig(name="sgd", lr=0.01, weight_decay=0.05, momentum=0.9).build(model)):
        state = TrainState(None, model, optimizer, tmp_path)
        LayerwiseLR(lr_multipliers={"head.*": 10.0}, layer_decay=0.5).before_prepare(state)
        assert type(state.optimizer) is type(optimizer)
        lr_of = {n: g["lr"] for g in state.optimizer.param_groups for n in g["names"]}
        decay_of = {n: g["weight_decay"] for g in state.optimizer.param_groups for n in g["names"]}
        assert lr_of["stem.0.weight"] == pytest.approx(0.01 * 0.5**4)
        assert lr_of["blocks.0.branch.0.weight"] == pytest.approx(0.01 * 0.5**3)
        assert lr_of["blocks.2.shortcut.0.weight"] == pytest.approx(0.01 * 0.5)
        assert lr_of["head.2.weight"] == pytest.approx(0.01 * 10.0) and lr_of["head.2.bias"] == pytest.approx(0.1)
        assert decay_of["blocks.1.branch.0.weight"] == 0.05 and decay_of["head.2.weight"] == 0.05
        assert decay_of["stem.1.weight"] == 0.0 and decay_of["head.2.bias"] == 0.0  # norms and biases
        assert sum(len(g["params"]) for g in state.optimizer.param_groups) == len(list(model.parameters()))
        for key in ("momentum", "betas"):
            if key in optimizer.defaults:
                assert all(g[key] == optimizer.defaults[key] for g in state.optimizer.param_groups)


def test_schedules_scale_every_group_consistently(tmp_path):
    from framework.techniques import CosineLR, LayerwiseLR

    model_lrs = []
    trainer = make_trainer(tmp_path, [LayerwiseLR(lr_multipliers={"bias": 0.1}), CosineLR(warmup_steps=2)],
                           batch_size=2, n=8, epochs=2)
    trainer.fit()
    groups = trainer.state.optimizer.param_groups
    assert len(groups) == 2
    for group in groups:  # every group followed the same schedule from its own initial LR
        model_lrs.append(group["lr"] / group["initial_lr"])
    assert model_lrs[0] == pytest.approx(model_lrs[1])
    assert {round(g["initial_lr"], 6) for g in groups} == {0.1, 0.01}


def test_optimizer_config_leaves_norms_and_biases_undecayed_by_default():
    from framework.models.resnet import ResNet, ResNetConfig
    from framework.optim import OptimizerConfig

    model = ResNet(ResNetConfig())  # convolutions, BatchNorms, a linear head with a bias
    for name in ("adamw", "sgd"):
        optimizer = OptimizerConfig(name=name, weight_decay=0.05).build(model)
        decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        assert len(decay_of) == len(list(model.parameters()))  # every parameter, once
        for parameter_name, parameter in model.named_parameters():
            assert decay_of[id(parameter)] == (0.0 if parameter.ndim <= 1 else 0.05), parameter_name
        everything = OptimizerConfig(name=name, weight_decay=0.05, no_decay_norm_and_bias=False).build(model)
        assert [g["weight_decay"] for g in everything.param_groups] == [0.05]
        assert len(everything.param_groups[0]["params"]) == len(list(model.parameters()))
    plain = OptimizerConfig(weight_decay=0.05).build(model.parameters())  # bare parameters: split by ndim alike
    assert {id(p): g["weight_decay"] for g in plain.param_groups for p in g["params"]} == decay_of


def test_optimizer_config_can_leave_embeddings_undecayed():
    from framework.optim import OptimizerConfig

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    decay_of = lambda optimizer: {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    embedding, linear = model[0].weight, model[1].weight
    default = decay_of(OptimizerConfig(weight_decay=0.1).build(model))
    assert default[id(embedding)] == 0.1 and default[id(linear)] == 0.1 and default[id(model[1].bias)] == 0.0
    no_embeddings = decay_of(OptimizerConfig(weight_decay=0.1, no_decay_embeddings=True).build(model))
    assert no_embeddings[id(embedding)] == 0.0 and no_embeddings[id(linear)] == 0.1
    with pytest.raises(ConfigError, match="no_decay_embeddings needs the model"):
        OptimizerConfig(no_decay_embeddings=True).build(model.parameters())


def test_adamw_step_on_an_undecayed_bias_is_plain_adam():
    from framework.optim import OptimizerConfig

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    optimizer = OptimizerConfig(lr=0.1, weight_decay=0.5).build(model)
    reference_bias, reference_weight = torch.nn.Parameter(bias.clone()), torch.nn.Parameter(weight.clone())
    adam = torch.optim.Adam([reference_bias], lr=0.1)
    adamw = torch.optim.AdamW([reference_weight], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        grads = torch.randn(2, 3), torch.randn(2)
        model.weight.grad, model.bias.grad = grads[0].clone(), grads[1].clone()
        reference_weight.grad, reference_bias.grad = grads[0].clone(), grads[1].clone()
        for o in (optimizer, adam, adamw):
            o.step()
    assert torch.equal(model.bias, reference_bias) and torch.equal(model.weight, reference_weight)


def test_layerwise_lr_keeps_the_optimizer_configs_weight_decays(tmp_path):
    from framework.models.resnet import ResNet, ResNetConfig
    from framework.optim import OptimizerConfig
    from framework.state import TrainState
    from framework.techniques import LayerwiseLR

    model = ResNet(ResNetConfig())
    for no_decay, norm_decay in ((True, 0.0), (False, 0.05)):
        optimizer = OptimizerConfig(lr=0.01, weight_decay=0.05, no_decay_norm_and_bias=no_decay).build(model)
        state = TrainState(None, model, optimizer, tmp_path)
        LayerwiseLR(layer_decay=0.5).before_prepare(state)
        decay_of = {n: g["weight_decay"] for g in optimizer.param_groups for n in g["names"]}
        assert decay_of["stem.1.weight"] == norm_decay and decay_of["head.2.bias"] == norm_decay
        assert decay_of["stem.0.weight"] == 0.05 and decay_of["head.2.weight"] == 0.05
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    mixed = torch.optim.SGD([{"params": model.stem.parameters(), "lr": 0.1}, {"params": model.head.parameters()}],
                            lr=0.01)
    with pytest.raises(ConfigError, match="layerwise_lr sets the groups' LRs itself"):
        LayerwiseLR(layer_decay=0.5).before_prepare(TrainState(None, model, mixed, tmp_path))
