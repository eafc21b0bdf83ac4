"""The LR range test: its pure parts by hand, a toy regression whose good LR range is known, restoration of model
and optimizer, and a 2-process run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from framework.config import TrainerConfig
from framework.loop import Trainer
from framework.task import Task
from framework.lr_finder import lr_sweep, smooth, suggest_lrs
from helpers import ROOT, launch


def test_sweep_smoothing_and_suggestions_by_hand():
    assert lr_sweep(1e-4, 1.0, 5) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert smooth([2.0, 2.0, 2.0], beta=0.9) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull toward 0
    assert smooth([1.0, 3.0], beta=0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])
    lrs = lr_sweep(1e-4, 1.0, 5)
    suggestions = suggest_lrs(lrs, [5.0, 4.9, 2.0, 1.5, 9.0])  # the big drop is around 1e-2, the minimum at 1e-1
    # (5 points: too few to skip any)
    assert suggestions == {"steepest": pytest.approx(1e-2), "minimum_over_10": pytest.approx(1e-2)}


class Regression(Task):
    def forward(self, model, batch):
        return model(batch["x"]).squeeze(-1)

    def loss(self, outputs, batch):
        return F.mse_loss(outputs, batch["y"])

    def batch_size(self, batch):
        return len(batch["y"])


def test_toy_regression_gets_an_lr_inside_its_known_good_range(tmp_path):
    """Least squares on standard-normal inputs: the loss's Hessian is about 2·I, so plain SGD converges for LR < 1
    (2 / largest eigenvalue; a batch of 64 makes it ~0.55) and fastest near 0.5; LRs below ~0.01 barely move."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=generator)
    y = x @ torch.randn(8, generator=generator) + 0.1 * torch.randn(4096, generator=generator)  # a floor > 0
    model = torch.nn.Linear(8, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=64, shuffle=True)
    trainer = Trainer(TrainerConfig(output_dir=str(tmp_path), tracker="none", find_lr=True), model, optimizer,
                      Regression(), loader, techniques=[])
    result = trainer.fit()
    for name, lr in result["suggestions"].items():
        assert 0.01 <= lr <= 1.0, (name, lr)
    assert result["stopped_early"]  # LRs above 1 diverge and end the sweep
    assert torch.equal(model.weight, torch.zeros_like(model.weight))  # restored
    assert optimizer.param_groups[0]["lr"] == 0.1 and not optimizer.state  # restored (SGD without momentum)
    assert (tmp_path / "lr_finder.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "lr_finder.json").read_text())["suggestions"] == result["suggestions"]


@pytest.mark.slow
def test_lr_finder_on_two_ranks(tmp_path):
    result = launch(ROOT / "recipes" / "image_classification.py", "--config",
                    str(ROOT / "recipes" / "configs" / "image_classification.yaml"), "--output_dir", str(tmp_path),
                    "--tracker", "none", "--find_lr", "true", launch_config="multi_cpu.yaml")
    assert result.returncode == 0, result.stderr[-3000:]  # the ranks' suggestions are compared inside the run
    found = json.loads((tmp_path / "lr_finder.json").read_text())
    assert 1e-3 <= found["suggestions"]["steepest"] <= 1.0 and 1e-3 <= found["suggestions"]["minimum_over_10"] <= 1.0
    assert "LR finder: steepest descent at" in result.stdout
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained
