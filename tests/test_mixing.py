"""Mixup, CutMix and label smoothing: the pure functions against hand computations and torch's own loss, the hooks
on a small state, the refusals, and one short run inside the loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from framework.backend import Backend
from framework.config import build_techniques
from framework.errors import ConfigError, IncompatibleError
from framework.state import TrainState
from framework.task import ClassificationTask, Task
from framework.technique import check_techniques
from framework.techniques import (
    CutMix,
    LabelSmoothing,
    Mixup,
    cutmix_batch,
    cutmix_box,
    mixup_batch,
    one_hot_targets,
    smooth_targets,
)
from helpers import make_trainer


def state_for(task: Task | None, epoch: int = 0, tmp_path=".") -> TrainState:
    """The hooks here read only `task` and `epoch`: no accelerator, model or optimizer needed."""
    return TrainState(None, None, None, tmp_path, epoch=epoch, task=task)


def image_batch(b: int = 8, c: int = 3, h: int = 12, w: int = 20, classes: int = 5, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(b, c, h, w, generator=generator),
            "label": torch.randint(0, classes, (b,), generator=generator), "id": torch.arange(b)}


def constant_image_batch(b: int = 8, classes: int = 5) -> dict:
    """Sample i is the constant i + 1: Mixup keeps each sample constant, CutMix gives it two values."""
    inputs = torch.arange(1, b + 1, dtype=torch.float64).view(b, 1, 1, 1).expand(b, 3, 12, 20).contiguous()
    return {"pixel_values": inputs, "label": torch.arange(b) % classes}


def distinct_values_per_sample(inputs: torch.Tensor) -> list[int]:
    return [len(torch.unique(sample)) for sample in inputs]


# --- pure functions ----------------------------------------------------------------------------------------------
def test_one_hot_targets_from_indices_and_soft_targets_pass_through():
    one_hot = one_hot_targets(torch.tensor([2, 0]), 3)
    assert one_hot.dtype == torch.float32
    assert torch.equal(one_hot, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    soft = torch.tensor([[0.2, 0.8, 0.0]])
    assert one_hot_targets(soft, 3) is soft


def test_mixup_batch_equals_formula_for_fixed_lambda_and_permutation():
    inputs = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    targets = one_hot_targets(torch.tensor([0, 1, 2]), 3)
    permutation = torch.tensor([2, 0, 1])
    mixed, mixed_targets = mixup_batch(inputs, targets, 0.25, permutation)
    # row 0: 0.25·[1, 2] + 0.75·[5, 6] = [4, 5]; row 1: 0.25·[3, 4] + 0.75·[1, 2] = [1.5, 2.5]; ...
    torch.testing.assert_close(mixed, torch.tensor([[4.0, 5.0], [1.5, 2.5], [3.5, 4.5]]))
    torch.testing.assert_close(mixed_targets, torch.tensor([[0.25, 0, 0.75], [0.75, 0.25, 0], [0, 0.75, 0.25]]))
    torch.testing.assert_close(mixed_targets.sum(dim=1), torch.ones(3))
    # Any input shape; the input dtype is kept (λ may be a 0-dim float32 tensor).
    images = torch.randn(4, 3, 5, 7, dtype=torch.bfloat16)
    out, _ = mixup_batch(images, one_hot_targets(torch.arange(4), 4), torch.tensor(0.7), torch.tensor([1, 2, 3, 0]))
    assert out.dtype == torch.bfloat16 and out.shape == images.shape
    expected = 0.7 * images.float() + 0.3 * images.float()[[1, 2, 3, 0]]
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)  # bf16 arithmetic: ~3 digits


def test_cutmix_box_uses_real_height_and_width_and_stays_inside_the_image():
    height, width = 12, 20
    generator = torch.Generator().manual_seed(0)
    clipped = unclipped = 0
    for lam in torch.linspace(0.02, 0.98, 200).tolist():
        top, bottom, left, right = cutmix_box(height, width, lam, generator)
        assert 0 <= top <= bottom <= height and 0 <= left <= right <= width
        cut_h, cut_w = round(height * math.sqrt(1 - lam)), round(width * math.sqrt(1 - lam))
        assert bottom - top <= cut_h and right - left <= cut_w
        if (bottom - top, right - left) == (cut_h, cut_w):
            unclipped += 1
            # Away from the border the area is (1 - λ)·H·W up to rounding each side to whole pixels.
            assert abs((bottom - top) * (right - left) - (1 - lam) * height * width) <= (cut_h + cut_w) / 2 + 0.25
        else:
            clipped += 1
    assert clipped > 20 and unclipped > 20  # both the border and the interior were exercised


def test_cutmix_batch_pastes_the_partner_in_the_box_and_corrects_lambda_on_non_square_images():
    batch = image_batch(b=6, h=12, w=20)
    inputs, targets = batch["pixel_values"], one_hot_targets(batch["label"], 5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):
        lam = float(torch.rand((), generator=generator))
        box = cutmix_box(12, 20, lam, generator)
        permutation = torch.randperm(6, generator=generator)
        mixed, mixed_targets, corrected = cutmix_batch(inputs, targets, box, permutation)
        top, bottom, left, right = box
        assert corrected == 1 - (bottom - top) * (right - left) / (12 * 20)
        inside = torch.zeros(12, 20, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(mixed[..., inside], inputs[permutation][..., inside])
        assert torch.equal(mixed[..., ~inside], inputs[..., ~inside])
        torch.testing.assert_close(mixed_targets, corrected * targets + (1 - corrected) * targets[permutation])
        torch.testing.assert_close(mixed_targets.sum(dim=1), torch.ones(6))
    assert torch.equal(inputs, image_batch(b=6, h=12, w=20)["pixel_values"])  # the input batch is untouched


# --- the techniques' hooks ---------------------------------------------------------------------------------------
def test_mixup_hook_returns_a_new_batch_with_soft_targets_and_leaves_the_input_alone():
    state = state_for(ClassificationTask(num_classes=5))
    batch = image_batch()
    original = {key: value.clone() for key, value in batch.items()}
    mixup = Mixup(alpha=0.4)
    mixup.fit_start(state)
    torch.manual_seed(0)
    mixed = mixup.on_batch(state, batch)
    assert mixed is not batch
    for key, value in original.items():
        assert torch.equal(batch[key], value)  # the loader's dict was not mutated
    assert torch.equal(mixed["id"], batch["id"])  # other keys ride along
    assert mixed["label"].shape == (8, 5) and mixed["pixel_values"].dtype == torch.float32
    torch.testing.assert_close(mixed["label"].sum(dim=1), torch.ones(8))
    assert not torch.equal(mixed["pixel_values"], batch["pixel_values"])
    # λ and the permutation come from torch's global RNG: the same seed mixes the same way.
    torch.manual_seed(0)
    again = mixup.on_batch(state, batch)
    assert torch.equal(again["pixel_values"], mixed["pixel_values"]) and torch.equal(again["label"], mixed["label"])


def test_mixup_hook_equals_mixup_batch_with_the_drawn_lambda_and_permutation():
    state = state_for(ClassificationTask(num_classes=5))
    batch = image_batch()
    torch.manual_seed(3)
    mixed = Mixup(alpha=0.4).on_batch(state, batch)
    torch.manual_seed(3)  # replay the draws in the hook's order: permutation, then λ
    permutation = torch.randperm(8)
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    inputs, targets = mixup_batch(batch["pixel_values"], one_hot_targets(batch["label"], 5), lam, permutation)
    assert torch.equal(mixed["pixel_values"], inputs) and torch.equal(mixed["label"], targets)


@pytest.mark.parametrize("switch_prob, expected", [(0.0, "mixup"), (1.0, "cutmix")])
def test_switch_prob_selects_mixup_or_cutmix(switch_prob, expected):
    state = state_for(ClassificationTask(num_classes=5))
    technique = Mixup(alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob)
    batch = constant_image_batch()
    torch.manual_seed(0)
    for _ in range(20):
        out = technique.on_batch(state, batch)
        counts = distinct_values_per_sample(out["pixel_values"])
        if expected == "mixup":  # every pixel of a sample mixed alike: no box
            assert counts == [1] * 8
            assert not torch.equal(out["pixel_values"], batch["pixel_values"])
        else:  # pixels outside the box kept, inside pasted: two values in a sample
            assert max(counts) == 2
        torch.testing.assert_close(out["label"].sum(dim=1), torch.ones(8, dtype=out["label"].dtype))


def test_switch_prob_one_half_uses_both_and_cutmix_alone_never_blends():
    state = state_for(ClassificationTask(num_classes=5))
    batch = constant_image_batch()
    torch.manual_seed(0)
    both = Mixup(alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5)
    kinds = {max(distinct_values_per_sample(both.on_batch(state, batch)["pixel_values"])) for _ in range(30)}
    assert kinds == {1, 2}
    cutmix = CutMix()
    assert (cutmix.alpha, cutmix.cutmix_alpha, cutmix.name) == (0.0, 1.0, "cutmix")
    for _ in range(10):
        pasted = cutmix.on_batch(state, batch)["pixel_values"]
        # CutMix only copies pixels: every value is one of the original constants 1..8.
        assert set(torch.unique(pasted).tolist()) <= set(range(1, 9))


def test_stop_epoch_and_prob_leave_the_batch_unchanged():
    task = ClassificationTask(num_classes=5)
    batch = image_batch()
    mixup = Mixup(alpha=0.4, stop_epoch=2)
    assert mixup.on_batch(state_for(task, epoch=2), batch) is batch
    assert mixup.on_batch(state_for(task, epoch=5), batch) is batch
    assert mixup.on_batch(state_for(task, epoch=1), batch)["label"].shape == (8, 5)  # still mixing before it
    assert Mixup(alpha=0.4, prob=0.0).on_batch(state_for(task), batch) is batch
    torch.manual_seed(0)
    half = Mixup(alpha=0.4, prob=0.5)
    mixed = [half.on_batch(state_for(task), batch) is not batch for _ in range(40)]
    assert 5 < sum(mixed) < 35


def test_cutmix_refuses_inputs_that_are_not_images():
    state = state_for(ClassificationTask(num_classes=3))
    batch = {"pixel_values": torch.randn(4, 6), "label": torch.tensor([0, 1, 2, 0])}
    with pytest.raises(ConfigError, match="cutmix_alpha"):
        CutMix().on_batch(state, batch)
    assert Mixup(alpha=0.2).on_batch(state, batch)["pixel_values"].shape == (4, 6)  # Mixup takes any shape


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": -0.1}, r"mixup\.alpha must be >= 0"),
    ({"cutmix_alpha": -1.0}, r"mixup\.cutmix_alpha must be >= 0"),
    ({"switch_prob": 1.5}, r"mixup\.switch_prob .* \[0, 1\]"),
    ({"prob": -0.2}, r"mixup\.prob .* \[0, 1\]"),
    ({"alpha": 0.0, "cutmix_alpha": 0.0}, r"both 0"),
    ({"stop_epoch": -1}, r"mixup\.stop_epoch"),
])
def test_mixup_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Mixup(**kwargs)


def test_cutmix_errors_use_its_own_name_and_label_smoothing_validates_epsilon():
    with pytest.raises(ConfigError, match=r"cutmix\.cutmix_alpha"):
        CutMix(cutmix_alpha=-1.0)
    for epsilon in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=r"label_smoothing\.epsilon"):
            LabelSmoothing(epsilon)


def test_mixup_and_cutmix_together_are_refused_with_the_fix():
    techniques = build_techniques({"mixup": {"alpha": 0.2}, "cutmix": {}})
    with pytest.raises(IncompatibleError, match="List only `mixup` and set its `cutmix_alpha`"):
        check_techniques(techniques, Backend())
    built = build_techniques({"mixup": {"alpha": 0.2, "cutmix_alpha": 1.0, "switch_prob": 0.3, "stop_epoch": 8},
                              "label_smoothing": {"epsilon": 0.1}, "cutmix": None})
    check_techniques(built, Backend())  # the switching form is accepted, with label smoothing
    assert [type(t) for t in built] == [Mixup, LabelSmoothing] and built[0].stop_epoch == 8


def test_techniques_refuse_a_task_without_classes():
    class Regression(Task):
        pass

    for technique in (Mixup(), LabelSmoothing()):
        for task in (Regression(), None):
            with pytest.raises(ConfigError, match=r"ClassificationTask\(num_classes=\.\.\.\)"):
                technique.fit_start(state_for(task))
        technique.fit_start(state_for(ClassificationTask(num_classes=3)))


# --- label smoothing ---------------------------------------------------------------------------------------------
def test_smooth_targets_by_hand():
    smoothed = smooth_targets(torch.tensor([1, 0]), 4, 0.2)
    # (1 - 0.2)·one_hot + 0.2 / 4 = 0.85 on the label, 0.05 elsewhere
    torch.testing.assert_close(smoothed, torch.tensor([[0.05, 0.85, 0.05, 0.05], [0.85, 0.05, 0.05, 0.05]]))
    soft = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(smooth_targets(soft, 4, 0.2), torch.tensor([[0.45, 0.45, 0.05, 0.05]]))


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_torch_loss_for_index_targets(epsilon):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (64,), generator=generator)
    ours = F.cross_entropy(logits, smooth_targets(labels, 10, epsilon))
    reference = torch.nn.CrossEntropyLoss(label_smoothing=epsilon)(logits, labels)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_label_smoothing_equals_closed_form_for_soft_targets():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 7, generator=generator, dtype=torch.float64)
    soft = torch.softmax(torch.randn(32, 7, generator=generator, dtype=torch.float64), dim=1)
    epsilon = 0.15
    closed_form = -(((1 - epsilon) * soft + epsilon / 7) * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(F.cross_entropy(logits, smooth_targets(soft, 7, epsilon)), closed_form,
                               rtol=1e-12, atol=1e-12)


def test_label_smoothing_hook_returns_new_batch():
    state = state_for(ClassificationTask(num_classes=5))
    batch = image_batch()
    smoothed = LabelSmoothing(0.1).on_batch(state, batch)
    assert smoothed is not batch and batch["label"].dtype == torch.int64  # the input dict is untouched
    assert smoothed["pixel_values"] is batch["pixel_values"]
    torch.testing.assert_close(smoothed["label"], smooth_targets(batch["label"], 5, 0.1))
    torch.testing.assert_close(smoothed["label"].sum(dim=1), torch.ones(8))


@pytest.mark.parametrize("cutmix_alpha", [0.0, 1.0])
def test_mixup_with_label_smoothing_smooths_once_in_either_order(cutmix_alpha):
    state = state_for(ClassificationTask(num_classes=5))
    batch = image_batch()
    mixup, smoothing = Mixup(alpha=0.4, cutmix_alpha=cutmix_alpha), LabelSmoothing(0.2)

    def run(techniques):
        torch.manual_seed(7)  # the same λ, permutation and box for both orders
        out = batch
        for technique in techniques:
            out = technique.on_batch(state, out)
        return out

    mix_first, smooth_first = run([mixup, smoothing]), run([smoothing, mixup])
    mixed_only = run([mixup])
    torch.testing.assert_close(mix_first["pixel_values"], smooth_first["pixel_values"])
    torch.testing.assert_close(mix_first["label"], smooth_first["label"])
    once = smooth_targets(mixed_only["label"], 5, 0.2)
    torch.testing.assert_close(mix_first["label"], once)
    assert not torch.allclose(once, smooth_targets(once, 5, 0.2))  # smoothing twice would have been visible
    torch.testing.assert_close(mix_first["label"].sum(dim=1), torch.ones(8))


# --- in the loop -------------------------------------------------------------------------------------------------
def test_mixup_and_label_smoothing_train_in_the_loop_with_honest_accuracy(tmp_path):
    trainer = make_trainer(tmp_path, [Mixup(alpha=0.4, stop_epoch=2), LabelSmoothing(0.1)], batch_size=4, n=16,
                           epochs=3)
    initial = trainer.state.model.weight.detach().clone()
    summary = trainer.fit()
    assert trainer.state.step == 12
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "train/loss" in line]
    assert len(train_lines) == 12
    for line in train_lines:
        assert math.isfinite(line["train/loss"])
        assert 0.0 <= line["train/accuracy"] <= 1.0  # against the dominant label of the soft targets
    assert math.isfinite(summary["metrics"]["test/loss"])
    assert (trainer.state.model.weight.detach() - initial).abs().max() > 1e-3
