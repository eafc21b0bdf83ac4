"""LR schedules against torch's own schedulers and closed forms; checks against the planned run; stepping counts."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch.optim import lr_scheduler

from framework.errors import ConfigError, IncompatibleError
from framework.techniques import (
    CosineLR,
    CosineRestartsLR,
    ExponentialLR,
    MultiStepLR,
    OneCycleLR,
    PlateauLR,
    StepLR,
    schedule_lrs,
)
from helpers import ROOT, launch, make_trainer

STEPS_PER_EPOCH, EPOCHS = 10, 6
TOTAL = STEPS_PER_EPOCH * EPOCHS


def torch_lrs(make, steps: int, base_lr: float = 1.0) -> list[float]:
    """torch's scheduler stepped once per optimizer step: the LR each step used."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr, momentum=0.9)
    scheduler, lrs = make(optimizer), []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if len(lrs) < steps:
            scheduler.step()
    return lrs


# (technique, the same schedule built directly with torch for `steps` optimizer steps)
CASES = {
    "step": (StepLR(step_size_epochs=2, gamma=0.5), lambda o, steps: lr_scheduler.StepLR(o, 20, 0.5)),
    "multistep": (MultiStepLR(milestones_epochs=[1.5, 4], gamma=0.1),
                  lambda o, steps: lr_scheduler.MultiStepLR(o, [15, 40], 0.1)),
    "exponential": (ExponentialLR(gamma=0.5), lambda o, steps: lr_scheduler.ExponentialLR(o, 0.5 ** (1 / 10))),
    "cosine": (CosineLR(eta_min=0.01), lambda o, steps: lr_scheduler.CosineAnnealingLR(o, steps, 0.01)),
    "cosine_restarts": (CosineRestartsLR(cycle_steps=7, cycle_mult=2),
                        lambda o, steps: lr_scheduler.CosineAnnealingWarmRestarts(o, 7, 2)),
    "onecycle": (OneCycleLR(), lambda o, steps: lr_scheduler.OneCycleLR(o, 1.0, total_steps=steps)),
}
ABSOLUTE = {"step", "multistep"}  # their drops fall at steps counted from the start of the run, warmup included


@pytest.mark.parametrize("case", list(CASES))
def test_schedule_equals_torch_at_every_step(case):
    technique, reference = CASES[case]
    ours = schedule_lrs(technique, STEPS_PER_EPOCH, TOTAL)
    assert ours == pytest.approx(torch_lrs(lambda o: reference(o, TOTAL), TOTAL), abs=1e-9)
    assert len(set(round(lr, 9) for lr in ours)) > 2  # the schedule really moves


@pytest.mark.parametrize("case", list(CASES))
def test_warmup_is_linear_then_the_schedule_runs_on_the_remaining_steps(case):
    technique, reference = CASES[case]
    warmup = 8
    technique = type(technique)(**{**{k: getattr(technique, k) for k in vars(technique)
                                      if k in type(technique).__init__.__code__.co_varnames},
                                   "warmup_steps": warmup})
    ours = schedule_lrs(technique, STEPS_PER_EPOCH, TOTAL)
    if case in ABSOLUTE:  # drops at absolute steps: the warmup replaces the schedule's first steps
        main = torch_lrs(lambda o: reference(o, TOTAL), TOTAL)[warmup:]
    else:  # a curve of its own length, started after the warmup
        main = torch_lrs(lambda o: reference(o, TOTAL - warmup), TOTAL - warmup)
    start = main[0]  # warmup ramps up to where the schedule starts
    assert ours[:warmup] == pytest.approx([start * (s + 1) / warmup for s in range(warmup)])
    assert ours[warmup:] == pytest.approx(main, abs=1e-9)


@pytest.mark.parametrize(
    "step, expected",
    [(0, 1 / 10), (4, 5 / 10), (9, 1.0), (10, 1.0), (35, 0.5 * (1 + math.cos(math.pi * 0.25))), (60, 0.5),
     (109, 0.5 * (1 + math.cos(math.pi * 99 / 100)))],
)
def test_warmup_cosine_closed_form(step, expected):
    lrs = schedule_lrs(CosineLR(warmup_steps=10), steps_per_epoch=10, max_steps=110)
    assert lrs[step] == pytest.approx(expected)


def test_plateau_reduces_like_torch_after_warmup():
    metrics = [1.0, 0.9, 0.9, 0.9, 0.9, 0.8]  # improves, stalls for 4 epochs, improves
    ours = schedule_lrs(PlateauLR(patience=1, factor=0.5, warmup_steps=5), STEPS_PER_EPOCH, TOTAL,
                        metric=lambda epoch: metrics[epoch - 1])
    assert ours[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    plateau, expected = lr_scheduler.ReduceLROnPlateau(optimizer, patience=1, factor=0.5), []
    for epoch in range(EPOCHS):
        expected += [optimizer.param_groups[0]["lr"]] * STEPS_PER_EPOCH
        plateau.step(metrics[epoch])
    assert ours[5:] == pytest.approx(expected[5:])
    assert min(ours[5:]) == pytest.approx(0.5)  # one reduction, after two epochs without improvement


def test_schedules_are_checked_against_the_planned_run():
    with pytest.raises(ConfigError, match="warmup .60 steps. is not shorter than the whole run .60 steps"):
        schedule_lrs(CosineLR(warmup_steps=60), STEPS_PER_EPOCH, TOTAL)  # in epochs it would shrink (below)
    with pytest.warns(UserWarning, match=r"milestones \[70\]"):
        schedule_lrs(MultiStepLR(milestones_steps=[30, 70]), STEPS_PER_EPOCH, TOTAL)
    with pytest.warns(UserWarning, match=r"milestones \[60\] \(steps from the start of the run\)"):
        schedule_lrs(MultiStepLR(milestones_steps=[30, 60], warmup_steps=8), STEPS_PER_EPOCH, TOTAL)
    with pytest.raises(ConfigError, match="total_steps=50 is shorter than the run"):
        schedule_lrs(OneCycleLR(total_steps=50), STEPS_PER_EPOCH, TOTAL)
    with pytest.raises(ConfigError, match="step_size_steps or step_size_epochs"):
        StepLR()
    with pytest.raises(ConfigError, match="in steps or in epochs, not both"):
        schedule_lrs(CosineLR(warmup_steps=3, warmup_epochs=1), STEPS_PER_EPOCH, TOTAL)


def test_plateau_refuses_a_run_without_validation(tmp_path):
    trainer = make_trainer(tmp_path, [PlateauLR()], eval_every=0)
    with pytest.raises(ConfigError, match="no validation data"):
        trainer.fit()


def test_plateau_names_a_missing_metric(tmp_path):
    trainer = make_trainer(tmp_path, [PlateauLR(metric="val/f1")])
    with pytest.raises(ConfigError, match=r"'val/f1' is not among the validation metrics \['val/accuracy', 'val/loss'\]"):
        trainer.fit()


def test_per_step_schedule_steps_once_per_optimizer_step_under_accumulation(tmp_path):
    schedule = StepLR(step_size_steps=1, gamma=0.5)
    trainer = make_trainer(tmp_path, [schedule], batch_size=2, n=16, accumulation=4, epochs=2)  # 8 micro, 2 steps/epoch
    trainer.fit()
    assert trainer.state.step == 4 and schedule.scheduler.last_epoch == 4
    assert trainer.state.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


@pytest.mark.slow
def test_per_step_schedule_steps_once_per_optimizer_step_on_two_ranks(tmp_path):
    result = launch(ROOT / "recipes" / "image_classification.py", "--config",
                    str(ROOT / "recipes" / "configs" / "image_classification.yaml"), "--output_dir", str(tmp_path),
                    "--max_steps", "20", "--log_every", "5", "--tracker", "none", "--techniques.cosine_lr", "null",
                    "--techniques.step_lr", "{step_size_steps: 5, gamma: 0.5}", launch_config="multi_cpu.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    lrs = {line["step"]: line["lr"] for line in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "lr" in line}
    assert lrs == pytest.approx({5: 0.01 * 0.5, 10: 0.01 * 0.25, 15: 0.01 * 0.125, 20: 0.01 * 0.0625})


def test_preview_draws_the_configured_run_without_training(tmp_path):
    trainer = make_trainer(tmp_path, [CosineLR(warmup_steps=2)], batch_size=2, n=8, epochs=3, preview_lr=True)
    before = [p.detach().clone() for p in trainer.state.model.parameters()]
    preview = trainer.fit()
    assert preview["lrs"]["cosine_lr"] == pytest.approx(schedule_lrs(CosineLR(warmup_steps=2), 4, 12, 0.1))
    assert (tmp_path / "lr_schedule.png").stat().st_size > 10_000
    assert trainer.state.step == 0 and not (tmp_path / "checkpoints").exists()
    for p, q in zip(trainer.state.model.parameters(), before):
        assert torch.equal(p, q)


def test_lr_schedules_recipe_draws_every_schedule(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    output = tmp_path / "lr_schedules.png"
    subprocess.run([sys.executable, str(ROOT / "recipes" / "lr_schedules.py"), "--output_dir", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True)
    width, height = Image.open(output).size
    assert width > 1500 and height > 600  # 4 × 2 panels: the seven schedules, each with and without warmup


def test_two_lr_schedules_are_refused_before_training():
    from framework.backend import Backend
    from framework.technique import Technique, check_techniques

    with pytest.raises(IncompatibleError, match=r"\['cosine_lr', 'step_lr'\] each set the learning rate.*keep one"):
        check_techniques([CosineLR(), StepLR(step_size_steps=5)], Backend())
    check_techniques([CosineLR()], Backend())  # one is fine

    class OwnSchedule(Technique):  # a declared capability, not a type: any technique that sets the LR counts
        name = "own_schedule"
        sets_learning_rate = True

    with pytest.raises(IncompatibleError, match=r"\['own_schedule', 'plateau_lr'\] each set the learning rate"):
        check_techniques([OwnSchedule(), PlateauLR()], Backend())


def test_a_trainer_with_two_schedules_is_refused(tmp_path):
    with pytest.raises(IncompatibleError, match="keep one"):
        make_trainer(tmp_path, [CosineLR(), StepLR(step_size_steps=2)])


def layerwise_run(schedule, metric=lambda epoch: 1.0, steps_per_epoch=10, max_steps=60):
    """Every parameter group's LR at every step of a run whose groups layerwise_lr made (scales 0.25, 0.5, 1), and
    each group's lr_scale."""
    from pathlib import Path

    from framework.optim import OptimizerConfig
    from framework.state import TrainState
    from framework.techniques import LayerwiseLR

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    optimizer = OptimizerConfig(name="sgd", lr=0.01).build(model)
    state = TrainState(None, model, optimizer, Path("."), steps_per_epoch=steps_per_epoch, max_steps=max_steps,
                       validates=True)
    LayerwiseLR(lr_multipliers={"0.*": 0.25, "1.*": 0.5}).before_prepare(state)
    schedule.fit_start(state)
    lrs = []
    for step in range(1, max_steps + 1):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        state.step = step
        schedule.after_optimizer_step(state)
        if step % steps_per_epoch == 0:
            state.epoch += 1
            state.eval_metrics, state.eval_step = {"val/loss": metric(state.epoch)}, step
            schedule.epoch_end(state)
    return lrs, [group["lr_scale"] for group in optimizer.param_groups]


@pytest.mark.parametrize("schedule", [
    CosineLR(eta_min=0.004, warmup_steps=5),
    CosineLR(eta_min=0.004, period_steps=20),
    CosineRestartsLR(cycle_steps=7, cycle_mult=2, eta_min=0.004, warmup_steps=5),
    PlateauLR(factor=0.5, patience=0, min_lr=0.004, warmup_steps=5),
], ids=["cosine", "cosine_period", "cosine_restarts", "plateau"])
def test_layerwise_ratios_hold_at_every_step_down_to_the_floor(schedule):
    lrs, scales = layerwise_run(schedule)
    assert sorted(set(scales)) == [0.25, 0.5, 1.0]
    top = scales.index(1.0)
    for step, group_lrs in enumerate(lrs):
        for lr, scale in zip(group_lrs, scales):
            assert lr / group_lrs[top] == pytest.approx(scale, rel=1e-9), (step, group_lrs)
    # eta_min / min_lr is the floor of the base group (scale 1), reached and never crossed after the warmup; the
    # other groups' floors keep their ratios (before the fix every group stopped at 0.004: the stem's LR rose)
    after_warmup = lrs[5:]
    for scale, floor in ((1.0, 0.004), (0.5, 0.002), (0.25, 0.001)):
        lowest = min(row[scales.index(scale)] for row in after_warmup)
        assert floor * (1 - 1e-9) <= lowest <= floor * 1.01, (scale, lowest)


def test_schedule_lrs_previews_a_scaled_group_with_its_own_floor():
    lrs = schedule_lrs(CosineLR(eta_min=0.004), STEPS_PER_EPOCH, TOTAL, base_lr=0.0025, lr_scale=0.25)
    assert lrs[0] == pytest.approx(0.0025) and lrs[-1] == pytest.approx(0.001, rel=1e-2)
    assert min(lrs) >= 0.001 - 1e-12


SHRINK_WARNING = (r"^cosine_lr: warmup_epochs=1 is 50 steps, not shorter than this run \(20 steps\); warming up over "
                  r"2 steps instead \(10% of the run\)$")


def test_a_warmup_in_epochs_longer_than_the_run_shrinks_with_one_warning():
    with pytest.warns(UserWarning) as caught:
        lrs = schedule_lrs(CosineLR(warmup_epochs=1), steps_per_epoch=50, max_steps=20)  # --max_steps 20 < 1 epoch
    assert len(caught) == 1 and re.match(SHRINK_WARNING, str(caught[0].message)), [str(w.message) for w in caught]
    assert lrs[:2] == pytest.approx([0.5, 1.0])  # a linear ramp over the 2 steps it shrank to
    cosine = torch_lrs(lambda o: lr_scheduler.CosineAnnealingLR(o, 18), 18)  # then the cosine over the 18 left
    assert lrs[2:] == pytest.approx(cosine, abs=1e-9)


@pytest.mark.parametrize("max_steps, warmup", [(2, 1), (9, 1), (20, 2), (39, 3), (1, 0)])
def test_a_shrunk_warmup_is_a_tenth_of_the_run_at_least_one_step_and_shorter_than_it(max_steps, warmup):
    with pytest.warns(UserWarning, match=f"warming up over {warmup} steps instead"):
        lrs = schedule_lrs(StepLR(step_size_steps=1000, warmup_epochs=2), steps_per_epoch=50, max_steps=max_steps)
    assert lrs == pytest.approx([(s + 1) / warmup for s in range(warmup)] + [1.0] * (max_steps - warmup))


def test_a_warmup_in_steps_longer_than_the_run_stays_refused():
    with pytest.raises(ConfigError, match=r"cosine_lr: warmup \(50 steps\) is not shorter than the whole run \(20 "):
        schedule_lrs(CosineLR(warmup_steps=50), steps_per_epoch=50, max_steps=20)


def test_a_fitting_warmup_in_epochs_is_kept_without_a_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrs = schedule_lrs(CosineLR(warmup_epochs=1), steps_per_epoch=10, max_steps=20)
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_a_run_cut_short_trains_and_previews_the_same_shrunk_warmup(tmp_path):
    from framework.technique import Technique

    class LRs(Technique):  # the LR each optimizer step used
        name = "lrs"

        def __init__(self):
            self.lrs = []

        def before_optimizer_step(self, state):
            self.lrs.append(state.optimizer.param_groups[0]["lr"])

    recorder = LRs()  # 80 samples in batches of 2: 40 steps an epoch, a run of 20 steps
    trainer = make_trainer(tmp_path / "run", [CosineLR(warmup_epochs=1), recorder], n=80, epochs=1, max_steps=20)
    with pytest.warns(UserWarning, match="warmup_epochs=1 is 40 steps, not shorter than this run .20 steps.; "
                                         "warming up over 2 steps instead"):
        trainer.fit()
    assert recorder.lrs[:2] == pytest.approx([0.05, 0.1])
    preview = make_trainer(tmp_path / "preview", [CosineLR(warmup_epochs=1)], n=80, epochs=1, max_steps=20,
                           preview_lr=True)
    with pytest.warns(UserWarning, match="warming up over 2 steps instead"):
        curve = preview.fit()["lrs"]["cosine_lr"]
    assert curve == pytest.approx(recorder.lrs)


def test_multistep_milestones_are_absolute_epochs():
    lrs = schedule_lrs(MultiStepLR(milestones_epochs=[15, 25], warmup_epochs=3), steps_per_epoch=10, max_steps=300)
    assert lrs[:30] == pytest.approx([(s + 1) / 30 for s in range(30)])
    drops = [step for step in range(1, 300) if lrs[step] < lrs[step - 1] * 0.5]
    assert drops == [150, 250]  # epochs 15 and 25 of the run, not 18 and 28
    assert lrs[149] == pytest.approx(1.0) and lrs[150] == pytest.approx(0.1) and lrs[250] == pytest.approx(0.01)


def test_step_lr_drops_at_absolute_multiples_of_its_step_size():
    lrs = schedule_lrs(StepLR(step_size_epochs=10, warmup_epochs=3), steps_per_epoch=10, max_steps=300)
    assert lrs[:30] == pytest.approx([(s + 1) / 30 for s in range(30)])
    drops = [step for step in range(1, 300) if lrs[step] < lrs[step - 1] * 0.5]
    assert drops == [100, 200]  # epochs 10 and 20 of the run, not 13 and 23
    assert lrs[99] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.1) and lrs[299] == pytest.approx(0.01)


def test_a_milestone_at_the_end_of_the_warmup_drops_right_after_it():
    lrs = schedule_lrs(MultiStepLR(milestones_steps=[5, 12], warmup_steps=5), steps_per_epoch=10, max_steps=20)
    assert lrs[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 0.1]) and lrs[12] == pytest.approx(0.01)
    lrs = schedule_lrs(StepLR(step_size_steps=5, warmup_steps=5), steps_per_epoch=10, max_steps=20)
    assert lrs[4:] == pytest.approx([1.0] + [0.1] * 5 + [0.01] * 5 + [0.001] * 5)


def test_a_drop_inside_the_warmup_is_refused():
    with pytest.raises(ConfigError, match=r"^multistep_lr: milestones \[10, 20\] \(steps from the start of the run\) "
                                          r"fall inside the warmup \(30 steps\)"):
        schedule_lrs(MultiStepLR(milestones_epochs=[1, 2, 5], warmup_epochs=3), STEPS_PER_EPOCH, TOTAL)
    with pytest.raises(ConfigError, match=r"^step_lr: the first drop \(step 10 of the run\) falls inside the warmup "
                                          r"\(30 steps\)"):
        schedule_lrs(StepLR(step_size_epochs=1, warmup_epochs=3), STEPS_PER_EPOCH, TOTAL)


def test_step_lr_with_warmup_resumes_at_the_same_lr():
    from pathlib import Path

    from framework.state import TrainState

    def start(schedule):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        state = TrainState(None, None, optimizer, Path("."), steps_per_epoch=10, max_steps=60)
        schedule.fit_start(state)
        return state

    first = StepLR(step_size_steps=10, gamma=0.5, warmup_steps=4)
    state = start(first)
    for step in range(1, 16):
        state.optimizer.step(), setattr(state, "step", step), first.after_optimizer_step(state)
    second = StepLR(step_size_steps=10, gamma=0.5, warmup_steps=4)
    resumed = start(second)
    second.load_state_dict(first.state_dict())
    resumed.step = 15
    lrs = []
    for step in range(16, 31):
        resumed.optimizer.step(), setattr(resumed, "step", step), second.after_optimizer_step(resumed)
        lrs.append(resumed.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx(schedule_lrs(StepLR(step_size_steps=10, gamma=0.5, warmup_steps=4), 10, 60)[16:31])
