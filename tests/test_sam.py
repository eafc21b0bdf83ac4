"""SAM: the perturbation against a hand computation, the loop's two passes against a hand-written SAM step, the
refusals, and two ranks that stay identical."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from framework.backend import Backend
from framework.errors import ConfigError, IncompatibleError
from framework.technique import check_techniques
from framework.techniques import SAM, GradientClipping, sam_perturbation
from helpers import ROOT, launch, make_trainer, tiny_classification_data


def test_perturbation_matches_hand_computation():
    w, g = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])
    (e,) = sam_perturbation([w], [g], rho=0.5)
    torch.testing.assert_close(e, 0.5 * torch.tensor([3.0, 4.0]) / 5.0)  # rho g / ‖g‖
    (e,) = sam_perturbation([w], [g], rho=0.5, adaptive=True)
    torch.testing.assert_close(e, 0.5 * torch.tensor([3.0, 16.0]) / math.sqrt(73.0))  # rho w² g / ‖|w| g‖


def reference_sam(rho: float, epochs: int, clip: float | None = None,
                  model: torch.nn.Module | None = None) -> list[torch.Tensor]:
    """SAM written out by hand on make_trainer's model (or `model`), data and optimizer. The second pass's changes to
    buffers (BatchNorm running statistics) are undone: they move once per step, from the first pass."""
    if model is None:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = tiny_classification_data(8)
    for _ in range(epochs):
        for start in range(0, 8, 2):
            x = torch.stack([d["pixel_values"] for d in data[start:start + 2]])
            y = torch.stack([d["label"] for d in data[start:start + 2]])
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            norm = torch.sqrt(sum((g**2).sum() for g in grads))
            steps = [rho * g / norm for g in grads]
            buffers = [b.clone() for b in model.buffers()]
            with torch.no_grad():
                for p, e in zip(model.parameters(), steps):
                    p.add_(e)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            with torch.no_grad():
                for p, e in zip(model.parameters(), steps):
                    p.sub_(e)
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
            optimizer.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("clip", [None, 0.05])
def test_sam_in_the_loop_equals_hand_written_sam(tmp_path, clip):
    techniques = [SAM(rho=0.2)] + ([GradientClipping(max_norm=clip)] if clip else [])
    trainer = make_trainer(tmp_path, techniques, batch_size=2, n=8, epochs=2)
    trainer.fit()
    for ours, reference in zip(trainer.state.model.parameters(), reference_sam(0.2, 2, clip)):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_sam_refusals(tmp_path):
    with pytest.raises(IncompatibleError, match="engine steps inside backward"):
        check_techniques([SAM()], Backend("DEEPSPEED", 2, deepspeed_stage=2))
    with pytest.raises(IncompatibleError, match="only one"):
        check_techniques([SAM(), SAM(rho=0.1)], Backend())
    with pytest.raises(ConfigError, match="gradient_accumulation_steps to 1"):
        make_trainer(tmp_path, [SAM()], accumulation=2).fit()


@pytest.mark.slow
def test_sam_keeps_two_ranks_identical_with_clipping_and_bf16(tmp_path):
    result = launch(ROOT / "tests" / "scripts" / "recipe_then_dump_params.py", "--config",
                    str(ROOT / "recipes" / "configs" / "image_classification.yaml"), "--output_dir", str(tmp_path),
                    "--epochs", "2", "--tracker", "none", "--techniques.sam", "{rho: 0.05}", "--log_every", "5",
                    "--techniques.dump_params", "{}", launch_config="multi_cpu.yaml",
                    launcher_args=("--mixed_precision", "bf16"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["num_processes"] == 2 and summary["run"]["mixed_precision"] == "bf16"
    assert "sam" in summary["run"]["techniques"] and "gradient_clipping" in summary["run"]["techniques"]
    rank0, rank1 = (load_file(tmp_path / f"params_rank{rank}.safetensors") for rank in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    losses = [line["train/loss"] for line in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "train/loss" in line]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_recipe_with_sam_lookahead_onecycle_and_centralization_reaches_99(tmp_path):
    result = launch(ROOT / "recipes" / "image_classification.py", "--config",
                    str(ROOT / "recipes" / "configs" / "image_classification.yaml"), "--output_dir", str(tmp_path),
                    "--tracker", "none", "--epochs", "10", "--techniques",
                    "{gradient_centralization: {}, sam: {rho: 0.05}, lookahead: {k: 5, alpha: 0.5}, onecycle_lr: {}, "
                    "gradient_clipping: {max_norm: 2.0}, ema: {decay: 0.99, warmup: true}}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["techniques"] == ["doctor", "gradient_centralization", "sam", "lookahead", "onecycle_lr",
                                            "gradient_clipping", "ema"]  # the doctor is on by default, first
    assert summary["doctor"] == []  # and finds nothing wrong with SAM's two passes
    assert summary["metrics"]["test/accuracy"] >= 0.99


def test_second_pass_leaves_batchnorm_running_statistics_alone(tmp_path):
    """The second forward-backward runs at the perturbed weights: BatchNorm's running statistics move once per step,
    from the first pass only (a hand-written SAM that restores the buffers after its second pass agrees)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from framework.config import TrainerConfig
    from framework.loop import Trainer
    from framework.task import ClassificationTask

    def bn_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                   torch.nn.Linear(8, 3))

    data = tiny_classification_data(8)
    model = bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = TrainerConfig(output_dir=str(tmp_path), epochs=2, tracker="none", log_every=1, doctor=False)
    Trainer(config, model, optimizer, ClassificationTask(num_classes=3), DataLoader(data, batch_size=2),
            techniques=[SAM(rho=0.2)], accelerator=Accelerator(cpu=True)).fit()
    assert int(model[1].num_batches_tracked) == 8  # 2 epochs × 4 steps, not 16

    reference = bn_model()
    reference_sam(0.2, epochs=2, model=reference)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
