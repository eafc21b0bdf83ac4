"""Gradient checkpointing: with it on, the GPT and the ResNet give the same outputs and gradients as without it (for
every policy, with dropout and drop path on), while far fewer bytes are saved for backward; wrapping keeps state_dict
keys; targets by type, class name and name pattern; the technique in the loop; real DDP / ZeRO-2 / ZeRO-3 launches.

Equality is exact (torch.equal): the recomputation runs the same deterministic CPU kernels on the same inputs with
the same RNG state, and the selective policy hands back the very tensors the forward pass computed.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import framework.nn.checkpointing as gc_module
from framework.config import TrainerConfig, build_techniques
from framework.errors import ConfigError
from framework.loop import Trainer
from framework.models.gpt import GPT, Block, GPTConfig
from framework.models.resnet import BasicBlock, ResNet, ResNetConfig
from framework.nn.checkpointing import checkpoint_modules, is_checkpointed, remove_checkpointing
from framework.nn.drop_path import DropPath
from framework.state import TrainState
from framework.task import ClassificationTask
from framework.techniques import GradientCheckpointing, StochasticDepth
from framework.techniques.grad_checkpointing import default_targets
from helpers import ROOT, launch

POLICIES = ["full", "every_k", "selective"]
SCRIPT = ROOT / "tests" / "scripts" / "train_checkpointed.py"


def small_gpt(attention: str = "sdpa", dropout: float = 0.1, drop_path: float = 0.2, n_layer: int = 3) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=32, context_length=64, dropout=dropout,
                          attention=attention, attention_chunk_size=16))
    for module in model.modules():
        if isinstance(module, DropPath):
            module.p = drop_path
    return model


def small_resnet(drop_path: float = 0.3) -> ResNet:
    torch.manual_seed(0)
    # zero_init_residual=False: the branches contribute from the start, so a wrong recomputation would show
    model = ResNet(ResNetConfig(zero_init_residual=False, blocks_per_stage=2))
    for module in model.modules():
        if isinstance(module, DropPath):
            module.p = drop_path
    return model


def gpt_input() -> torch.Tensor:
    return torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))


def resnet_input() -> torch.Tensor:
    return torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def train_step(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """One forward + backward in training mode from a fixed RNG state: output, gradients, buffers afterwards."""
    model.train()
    torch.manual_seed(123)  # dropout and drop path draw the same masks in both runs
    output = model(inputs)
    output.float().square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return output.detach(), grads, {name: b.clone() for name, b in model.named_buffers()}


def assert_same_step(model: torch.nn.Module, target: type, inputs: torch.Tensor, policy: str) -> list[str]:
    reference = train_step(copy.deepcopy(model), inputs)
    checkpointed = copy.deepcopy(model)
    names = checkpoint_modules(checkpointed, [target], policy=policy)
    output, grads, buffers = train_step(checkpointed, inputs)
    assert torch.equal(output, reference[0])
    assert grads.keys() == reference[1].keys()
    for name in grads:
        assert torch.equal(grads[name], reference[1][name]), f"{policy}: gradient of {name} differs"
    for name in buffers:  # BatchNorm running statistics: updated once, as without checkpointing
        assert torch.equal(buffers[name], reference[2][name]), f"{policy}: buffer {name} differs"
    return names


# --- same outputs and gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("attention", ["sdpa", "naive", "chunked"])
def test_gpt_same_outputs_and_gradients_with_dropout_and_drop_path(policy, attention):
    names = assert_same_step(small_gpt(attention), Block, gpt_input(), policy)
    assert names == (["blocks.0", "blocks.2"] if policy == "every_k" else ["blocks.0", "blocks.1", "blocks.2"])


@pytest.mark.parametrize("policy", POLICIES)
def test_resnet_same_outputs_gradients_and_batchnorm_statistics(policy):
    names = assert_same_step(small_resnet(), BasicBlock, resnet_input(), policy)
    assert names == [f"blocks.{i}" for i in range(0, 6, 2 if policy == "every_k" else 1)]


def test_batchnorm_statistics_are_updated_once_per_step():
    """Plain torch checkpointing runs BatchNorm twice per step (forward, then the recomputation), so the running
    statistics would move twice; the wrapper lets the recomputation update copies instead."""
    model = small_resnet()
    checkpoint_modules(model, [BasicBlock])
    train_step(model, resnet_input())
    counts = {n: int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}
    assert set(counts.values()) == {1}, counts


def test_selective_with_chunked_attention_is_exact_because_no_grad_matmuls_are_recomputed():
    """Chunked attention's custom autograd.Function turns its score blocks (matmul outputs) into probabilities in
    place, where torch bumps no version counter. Were those matmuls kept, the recomputation would read overwritten
    tensors (gradients off by up to ~60%, silently); the policy keeps only ops that run with grad enabled."""
    model = small_gpt("chunked", dropout=0.0, drop_path=0.0, n_layer=1)
    assert_same_step(model, Block, gpt_input(), "selective")
    ctx = None
    with torch.no_grad():
        assert gc_module.selective_policy(ctx, torch.ops.aten.mm.default) == gc_module.CheckpointPolicy.PREFER_RECOMPUTE
    assert gc_module.selective_policy(ctx, torch.ops.aten.mm.default) == gc_module.CheckpointPolicy.MUST_SAVE
    assert gc_module.selective_policy(ctx, torch.ops.aten.gelu.default) == gc_module.CheckpointPolicy.PREFER_RECOMPUTE


# --- recomputation really happens: bytes saved for backward ----------------------------------------------------------
def saved_bytes(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during one forward (each storage once), via saved-tensor hooks. Tensors
    inside a checkpointed block go to checkpoint's own hooks, so they are not counted: exactly what it frees."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs).float().square().mean().backward()
    return sum(storages.values())


def test_checkpointing_saves_far_fewer_bytes_for_backward():
    model, inputs = small_gpt(n_layer=4), gpt_input()
    plain = saved_bytes(model, inputs)
    saved = {}
    for policy in POLICIES:
        checkpoint_modules(model, [Block], policy=policy)
        saved[policy] = saved_bytes(model, inputs) / plain
    remove_checkpointing(model)
    assert saved_bytes(model, inputs) == plain
    # full keeps only what lies outside the blocks (embeddings, final norm, head, loss); every_k (k=2) half of the
    # blocks; selective the matmul and attention outputs (the norms, GELU, dropout and residual adds are recomputed).
    assert saved["full"] < 0.2, saved
    assert saved["full"] < saved["every_k"] < 0.7, saved
    assert saved["full"] < saved["selective"] < 0.8, saved


# --- wrapping: state_dict, removal, evaluation, targets --------------------------------------------------------------
def test_state_dict_keys_unchanged_and_loadable_both_ways():
    plain = small_gpt()
    checkpointed = copy.deepcopy(plain)
    checkpoint_modules(checkpointed, [Block], policy="selective")
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    plain.load_state_dict(checkpointed.state_dict())  # strict, both ways
    checkpointed.load_state_dict(plain.state_dict())


def test_remove_checkpointing_restores_the_plain_forward():
    model = small_gpt()
    wrapped = checkpoint_modules(model, [Block])
    assert all(is_checkpointed(model.get_submodule(name)) for name in wrapped)
    assert remove_checkpointing(model) == wrapped
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert remove_checkpointing(model) == []
    # GPT's own switch goes through the same two functions
    model.set_grad_checkpointing(True, policy="every_k", every_k=3)
    assert [n for n, m in model.named_modules() if is_checkpointed(m)] == ["blocks.0"]
    model.set_grad_checkpointing(False)
    assert not any(is_checkpointed(m) for m in model.modules())


def test_checkpointing_again_replaces_the_configuration():
    model = small_resnet()
    assert checkpoint_modules(model, [BasicBlock], policy="every_k", every_k=3) == ["blocks.0", "blocks.3"]
    assert checkpoint_modules(model, ["blocks.1"]) == ["blocks.1"]
    assert [n for n, m in model.named_modules() if is_checkpointed(m)] == ["blocks.1"]


def test_evaluation_and_no_grad_run_the_plain_forward(monkeypatch):
    model = small_gpt()
    checkpoint_modules(model, [Block])
    calls = []
    real = gc_module.checkpoint
    monkeypatch.setattr(gc_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = gpt_input()
    model.eval()
    model(inputs)
    model.train()
    with torch.no_grad():
        model(inputs)
    assert calls == []
    model(inputs)
    assert len(calls) == 3  # training with grad: once per block


def test_deepcopy_rebinds_the_wrapper_to_the_copy():
    """EMA-style shadows deep-copy the model: the copy's blocks must run their own weights, not the original's."""
    model = small_gpt(dropout=0.0, drop_path=0.0)
    checkpoint_modules(model, [Block])
    shadow = copy.deepcopy(model)
    assert shadow.blocks[0].forward.args[0] is shadow.blocks[0]
    with torch.no_grad():
        for p in shadow.parameters():
            p.zero_()
    assert not torch.equal(shadow(gpt_input()), model(gpt_input()))


def test_targets_by_type_class_name_and_name_pattern():
    model = small_gpt()
    by_type = checkpoint_modules(model, [Block])
    assert checkpoint_modules(model, ["Block"]) == by_type == ["blocks.0", "blocks.1", "blocks.2"]
    # "blocks.*" also matches blocks.0.attn, blocks.0.mlp.fc, ...: those sit inside a wrapped block, so stay plain
    assert checkpoint_modules(model, ["blocks.*"]) == by_type
    assert checkpoint_modules(model, ["blocks.[02]"]) == ["blocks.0", "blocks.2"]
    assert checkpoint_modules(model, ["*.mlp"]) == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    assert checkpoint_modules(model, ["*.mlp", Block]) == by_type  # outermost wins
    resnet = small_resnet()
    assert checkpoint_modules(resnet, ["BasicBlock"], policy="every_k", every_k=4) == ["blocks.0", "blocks.4"]
    assert default_targets(model) == ["Block"] and default_targets(resnet) == ["BasicBlock"]


def test_nothing_matched_and_bad_arguments_are_refused():
    model = small_resnet()
    with pytest.raises(ConfigError, match=r"no module of ResNet matches \['Block'\].*stem \(Sequential\), blocks "
                                          r"\(Sequential\), head \(Sequential\).*BasicBlock"):
        checkpoint_modules(model, ["Block"])
    with pytest.raises(ConfigError, match="policy must be one of full, every_k, selective"):
        checkpoint_modules(model, [BasicBlock], policy="some")
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="every_k must be an integer ≥ 1"):
            checkpoint_modules(model, [BasicBlock], policy="every_k", every_k=bad)
        with pytest.raises(ConfigError, match="every_k"):
            GradientCheckpointing(every_k=bad)
    with pytest.raises(ConfigError, match="policy"):
        build_techniques({"gradient_checkpointing": {"policy": "half"}})
    state = TrainState(None, torch.nn.Sequential(torch.nn.Linear(2, 2)), None, None)
    with pytest.raises(ConfigError, match=r"repeats no block in a Sequential.*0 \(Linear\)"):
        GradientCheckpointing().before_prepare(state)


def test_technique_wraps_the_raw_model_and_reports_in_the_summary():
    [technique] = build_techniques({"gradient_checkpointing": {"modules": ["blocks.*"], "policy": "every_k"}})
    assert isinstance(technique, GradientCheckpointing)
    state = TrainState(None, small_gpt(n_layer=4), None, None)
    technique.before_prepare(state)
    assert state.summary["gradient_checkpointing"] == {"policy": "every_k", "every_k": 2,
                                                       "modules": ["blocks.0", "blocks.2"]}
    default = GradientCheckpointing()
    default.before_prepare(state)  # replaces the earlier wrapping: the default targets every Block
    assert state.summary["gradient_checkpointing"]["modules"] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]


# --- inside the loop --------------------------------------------------------------------------------------------------
def fit_resnet(tmp_path, techniques) -> tuple[Trainer, dict]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    data = [{"pixel_values": x, "label": y} for x, y in zip(images, labels)]
    model = ResNet(ResNetConfig(num_classes=3, widths=(4, 8), zero_init_residual=False))
    config = TrainerConfig(output_dir=str(tmp_path), epochs=2, tracker="none", log_every=1)
    trainer = Trainer(config, model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                      ClassificationTask(num_classes=3), DataLoader(data, batch_size=8, shuffle=True),
                      techniques=techniques)
    return trainer, trainer.fit()


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_loop_trains_identically_with_and_without_checkpointing(tmp_path, policy):
    plain, _ = fit_resnet(tmp_path / "plain", [StochasticDepth(rate=0.5)])
    checkpointed, summary = fit_resnet(tmp_path / "ckpt",
                                       [StochasticDepth(rate=0.5), GradientCheckpointing(policy=policy)])
    assert summary["run"]["steps"] == 8
    assert summary["gradient_checkpointing"]["modules"] == ["blocks.0", "blocks.1"]
    written = json.loads((tmp_path / "ckpt" / "summary.json").read_text())
    assert written["gradient_checkpointing"]["policy"] == policy
    trained = checkpointed.state.model.state_dict()
    reference = plain.state.model.state_dict()
    assert trained.keys() == reference.keys()
    for name in reference:  # weights and BatchNorm statistics, after 8 steps with drop path on
        assert torch.equal(trained[name], reference[name]), name
    # the exported weights load into a plain model
    exported = load_file(tmp_path / "ckpt" / "model.safetensors")
    ResNet(ResNetConfig(num_classes=3, widths=(4, 8))).load_state_dict(exported)


# --- real launches ----------------------------------------------------------------------------------------------------
def launch_run(tmp_path, name, launch_config, *args) -> tuple[dict, list[float], dict]:
    output_dir = tmp_path / name
    result = launch(SCRIPT, "--output_dir", str(output_dir), *args, launch_config=launch_config, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    losses = [line["train/loss"] for line in map(json.loads, (output_dir / "metrics.jsonl").open())
              if "train/loss" in line]
    world_size = summary["run"]["num_processes"]
    ranks = [load_file(output_dir / f"params_rank{rank}.safetensors") for rank in range(world_size)]
    for other in ranks[1:]:
        for key in ranks[0]:
            assert torch.equal(ranks[0][key], other[key]), f"{name}: {key} differs between ranks"
    return summary, losses, ranks[0]


@pytest.mark.slow
@pytest.mark.parametrize("launch_config, model, policy", [
    ("multi_cpu.yaml", "gpt", "full"),  # DDP: no "marked ready twice" (non-reentrant checkpointing)
    ("deepspeed_zero2.yaml", "gpt", "selective"),
    ("deepspeed_zero3.yaml", "resnet", "full"),  # parameters gathered again for the recomputation
])
def test_launched_training_matches_the_run_without_checkpointing(tmp_path, launch_config, model, policy):
    summary, losses, params = launch_run(tmp_path, "ckpt", launch_config, "--model", model, "--policy", policy)
    assert summary["run"]["num_processes"] == 2
    assert summary["gradient_checkpointing"]["policy"] == policy
    assert losses[-1] < losses[0] - 0.3, losses
    _, plain_losses, plain_params = launch_run(tmp_path, "plain", launch_config, "--model", model, "--policy", "none")
    assert losses == plain_losses
    for key in plain_params:
        assert torch.equal(params[key], plain_params[key]), key
