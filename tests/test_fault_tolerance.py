"""Fault tolerance, launched for real: a run SIGKILLed mid-epoch (or mid-save) resumes to bitwise the weights of an
uninterrupted one; SIGTERM on one rank stops both at the same step with a checkpoint and status 0; a NaN on one rank
skips that step on both; NaNs in a row roll back and lower the LR; NaNs that persist stop the run with a report."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint import MARKER, completed_checkpoints, resolve_resume
from framework.optim import scale_learning_rates_
from framework.techniques.nan_guard import nonfinite
from helpers import ROOT, assert_same_weights, launch

DUMP = ROOT / "tests" / "scripts" / "recipe_then_dump_params.py"
# EMA (from the config) and Mixup on: their state and their random draws must survive the resume too.
ARGS = ("--config", str(ROOT / "recipes" / "configs" / "image_classification.yaml"), "--tracker", "none",
        "--max_steps", "12", "--checkpoint_every", "4", "--log_every", "2", "--techniques.mixup", "{alpha: 0.4}",
        "--techniques.cosine_lr", "{warmup_steps: 2}", "--techniques.dump_params", "{}")
WORLD = {"cpu.yaml": 1, "multi_cpu.yaml": 2, "deepspeed_zero2.yaml": 2}


def run(output_dir, launch_config="cpu.yaml", *extra):
    return launch(DUMP, *ARGS, "--output_dir", str(output_dir), *extra, launch_config=launch_config)


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", list(WORLD))
def test_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, launch_config):
    reference = run(tmp_path / "reference", launch_config)
    assert reference.returncode == 0
    summary = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["run"]["num_processes"] == WORLD[launch_config]

    kill_step = random.Random(launch_config).randint(5, 9)  # after the checkpoint of step 4, before an epoch ends
    killed = run(tmp_path / "run", launch_config, "--techniques.kill_at", f"{{step: {kill_step}}}")
    assert killed.returncode != 0
    latest = completed_checkpoints(tmp_path / "run")[-1]
    assert int((tmp_path / "run" / "step_rank0").read_text()) == kill_step
    # Killed in the hook after step S, before the loop checkpoints S: the newest checkpoint is the one before.
    assert latest.name == f"step_{(kill_step - 1) // 4 * 4:08d}" and not (tmp_path / "run" / "summary.json").exists()

    resumed = run(tmp_path / "run", launch_config, "--resume_from", "latest")
    assert resumed.returncode == 0 and f"resuming from {latest}" in resumed.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["run"]["steps"] == 12
    assert_same_weights(tmp_path / "reference", tmp_path / "run")


@pytest.mark.slow
def test_killed_while_saving_keeps_the_previous_checkpoint(tmp_path):
    killed = run(tmp_path / "run", "cpu.yaml", "--techniques.kill_while_saving", "{step: 8}")
    assert killed.returncode != 0
    root = tmp_path / "run" / "checkpoints"
    half_written = root / ".tmp_step_00000008"
    assert half_written.is_dir() and not (half_written / MARKER).exists()  # the files were there, unmarked
    assert resolve_resume("latest", tmp_path / "run") == root / "step_00000004"
    resumed = run(tmp_path / "run", "cpu.yaml", "--resume_from", "latest")
    assert resumed.returncode == 0 and f"resuming from {root / 'step_00000004'}" in resumed.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["run"]["steps"] == 12
    assert not half_written.exists()  # the step-8 save of the resumed run replaced it


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    stopped = run(tmp_path / "run", "multi_cpu.yaml", "--techniques.sigterm_at", "{step: 5, rank: 1}",
                  "--tracker", "wandb")
    assert stopped.returncode == 0
    assert "preempted: stopped after step 5" in stopped.stdout
    assert [int((tmp_path / "run" / f"step_rank{r}").read_text()) for r in (0, 1)] == [5, 5]
    assert completed_checkpoints(tmp_path / "run")[-1].name == "step_00000005"
    assert not (tmp_path / "run" / "summary.json").exists()  # it did not pretend to finish

    resumed = run(tmp_path / "run", "multi_cpu.yaml", "--resume_from", "latest", "--tracker", "wandb")
    assert resumed.returncode == 0
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))  # .../offline-run-<time>-<run id>
    assert len(runs) == 2 and runs[0].name.rsplit("-", 1)[1] == runs[1].name.rsplit("-", 1)[1]  # one W&B run, resumed
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["run"]["steps"] == 12 and summary["run"]["num_processes"] == 2
    rank0, rank1 = (load_file(tmp_path / "run" / f"params_rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_both(tmp_path):
    result = run(tmp_path / "run", "multi_cpu.yaml", "--techniques.nan_guard", "{}",
                 "--techniques.nan_at", "{step: 3, rank: 1}")
    assert result.returncode == 0
    for rank in (0, 1):  # rank 0's loss was finite, yet it skipped too: the weights did not move on either rank
        report = json.loads((tmp_path / "run" / f"nan_rank{rank}.json").read_text())
        assert report == {"step": 3, "weights_unchanged": True}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["nan_guard"] == {"skipped": 1, "rollbacks": 0, "spikes": 0} and summary["run"]["steps"] == 12
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["nan_guard/skipped"] for line in logged if "nan_guard/skipped" in line] == [1]
    rank0, rank1 = (load_file(tmp_path / "run" / f"params_rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


@pytest.mark.slow
def test_nans_in_a_row_roll_back_once_and_halve_the_lr(tmp_path):
    result = run(tmp_path / "run", "cpu.yaml", "--techniques.nan_guard", "{max_consecutive: 3, lr_factor: 0.5}",
                 "--techniques.nan_at", "{step: 6, times: 3}", "--techniques.cosine_lr", "null")
    assert result.returncode == 0
    assert "rolled back to step_00000004" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["nan_guard"] == {"skipped": 3, "rollbacks": 1, "spikes": 0} and summary["run"]["steps"] == 12
    lrs = {line["step"]: line["lr"] for line in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
           if "lr" in line}
    assert lrs[4] == pytest.approx(0.01) and lrs[12] == pytest.approx(0.005)  # constant LR (no schedule), halved

    stopped = run(tmp_path / "stopped", "cpu.yaml", "--techniques.nan_guard", "{max_consecutive: 2, max_rollbacks: 1}",
                  "--techniques.nan_at", "{step: 6, times: 100}")
    assert stopped.returncode != 0  # the recipe exits 2; accelerate's launcher reports that as 1
    assert "nan_guard: 2 non-finite steps in a row at step" in stopped.stderr and "1 rollback(s) did not help" in \
        stopped.stderr


def test_scaling_learning_rates_reaches_schedules_and_groups():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, 0.5, 1.0, total_iters=2)
    main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[2])
    twin = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    twin_schedule = torch.optim.lr_scheduler.SequentialLR(
        twin, [torch.optim.lr_scheduler.LinearLR(twin, 0.5, 1.0, total_iters=2),
               torch.optim.lr_scheduler.CosineAnnealingLR(twin, 10)], milestones=[2])
    for _ in range(4):
        optimizer.step(), schedule.step(), twin.step(), twin_schedule.step()
    scale_learning_rates_(optimizer, [schedule], 0.5)
    for _ in range(4):  # from here on, every LR is half the unscaled schedule's
        optimizer.step(), schedule.step(), twin.step(), twin_schedule.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * twin.param_groups[0]["lr"])


def test_mid_epoch_resume_skips_batches_without_loading_them():
    """The loop resumes with `accelerator.skip_first_batches` on the framework's (map-style) loaders: the batches
    already seen are skipped in the sampler, so resuming late in an epoch costs no loading, and the rest of the epoch
    is exactly what the uninterrupted epoch would have served."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from framework.data.loaders import make_loader

    class Counting(torch.utils.data.Dataset):
        def __init__(self):
            self.loaded = []

        def __len__(self):
            return 40

        def __getitem__(self, index):
            self.loaded.append(index)
            return torch.tensor(index)

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    dataset = Counting()
    loader = accelerator.prepare(make_loader(dataset, batch_size=4, shuffle=True, num_workers=0, seed=0))
    loader.set_epoch(3)
    full_epoch = [batch.tolist() for batch in loader]
    dataset.loaded.clear()
    loader.set_epoch(3)
    rest = [batch.tolist() for batch in accelerator.skip_first_batches(loader, 7)]
    assert rest == full_epoch[7:]
    assert sorted(dataset.loaded) == sorted(i for batch in full_epoch[7:] for i in batch)  # 12 loaded, not 40


def test_nonfinite_flags_a_loss_or_a_gradient_alone():
    finite = [torch.ones(3), torch.zeros(2, 2)]
    assert not nonfinite(finite) and not nonfinite([None])
    assert nonfinite([torch.tensor(float("nan"))])  # a NaN loss whose gradients happen to be finite
    assert nonfinite([*finite, torch.tensor([1.0, float("inf")])])
