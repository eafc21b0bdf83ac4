"""The image recipe launched for real: one process, two gloo processes, W&B offline and TensorBoard read back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, launch
from wandb_reader import logged_history, run_file

RECIPE = ROOT / "recipes" / "image_classification.py"
DUMP = ROOT / "tests" / "scripts" / "recipe_then_dump_params.py"
CONFIG = ("--config", str(ROOT / "recipes" / "configs" / "image_classification.yaml"))


@pytest.mark.slow
def test_two_process_run_is_synchronised(tmp_path):
    result = launch(DUMP, *CONFIG, "--output_dir", str(tmp_path), "--epochs", "2", "--tracker", "wandb",
                    "--techniques.dump_params", "{}",
                    "--log_every", "5", launch_config="multi_cpu.yaml")
    assert result.returncode == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["num_processes"] == 2 and summary["run"]["distributed_type"] == "MULTI_CPU"
    assert summary["run"]["steps"] == 20  # 1257 training images / (64 per rank × 2 ranks) → 10 steps per epoch
    rank0, rank1 = (load_file(tmp_path / f"params_rank{rank}.safetensors") for rank in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 10
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train_lines] == [5, 10, 15, 20]  # one writer: each logged step once
    assert train_lines[-1]["train/loss"] < train_lines[0]["train/loss"]  # and it learned
    history = logged_history(run_file(tmp_path))  # exactly one W&B run for the two processes
    assert [row["_step"] for row in history if "train/loss" in row] == [5, 10, 15, 20]
    for row in (row for row in history if "train/loss" in row):  # per-rank step times, gathered into the one run
        assert 0 < row["perf/step_seconds/rank_0"] < 60 and 0 < row["perf/step_seconds/rank_1"] < 60


@pytest.mark.slow
def test_wandb_offline_run_holds_train_loss(tmp_path):
    result = launch(RECIPE, *CONFIG, "--output_dir", str(tmp_path), "--max_steps", "6", "--log_every", "2",
                    "--tracker", "wandb", "--techniques.cosine_lr", "{warmup_steps: 2}")
    assert result.returncode == 0
    history = logged_history(run_file(tmp_path))
    losses = {row["_step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert sorted(losses) == [2, 4, 6] and all(0 < loss < 5 for loss in losses.values())
    assert any("test/accuracy" in row for row in history)
    assert "test/accuracy" in result.stdout and "model.safetensors" in result.stdout


@pytest.mark.slow
def test_tensorboard_tracker_holds_train_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = launch(RECIPE, *CONFIG, "--output_dir", str(tmp_path), "--max_steps", "4", "--log_every", "2",
                    "--tracker", "tensorboard", "--techniques.ema", "null", "--techniques.cosine_lr", "null")
    assert result.returncode == 0
    event_dirs = {path.parent for path in tmp_path.rglob("events.out.tfevents.*")}
    steps = []
    for directory in event_dirs:
        events = EventAccumulator(str(directory))
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            steps += [event.step for event in events.Scalars("train/loss")]
    assert steps == [2, 4]
    assert not (tmp_path / "model_ema.safetensors").exists()  # `null` removed the technique


#: The default run's test accuracy, single run: at most 3 of the 360 test images wrong (357/360 = 99.17%). One image
#: is 0.28 points, so a single run is decided by floating-point differences between machines (summation order of
#: the CPU's kernels, thread count): measured runs of the default config got 0 to 2 wrong, 99.44% to 100% (seeds
#: 0-4 on 1 thread: 99.72% then 100% ×4, mean 99.94%; seeds 0-1 on 2 threads: 100%, 100%; seed 0 on three other
#: machines: 99.44%, 99.72%, 100%). The bar is the worst measured run less one image, so a correct program passes
#: on any machine; a real regression (a technique broken, the LR schedule off) loses far more than a few images.
DEFAULT_RUN_MIN_TEST_ACCURACY = 0.99


@pytest.mark.slow
def test_default_config_reaches_its_measured_test_accuracy(tmp_path):
    """The README's claim: the default run reaches its measured test accuracy on the embedded digits (≥ 99.17% in
    any single run, see DEFAULT_RUN_MIN_TEST_ACCURACY); and the doctor, on by default with its default thresholds,
    stays silent on it (the default run users start, launched once for both claims)."""
    result = launch(RECIPE, *CONFIG, "--output_dir", str(tmp_path), "--tracker", "none")
    assert result.returncode == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["test/accuracy"] >= DEFAULT_RUN_MIN_TEST_ACCURACY, summary
    assert (tmp_path / "model_ema.safetensors").exists() and (tmp_path / "model.safetensors").exists()
    assert summary["run"]["techniques"][0] == "doctor" and summary["doctor"] == []
    assert "doctor: no findings" in result.stdout


@pytest.mark.slow
def test_regularized_config_reaches_993_test_accuracy(tmp_path):
    """recipes/configs/digits_regularized.yaml: augmentation + Mixup/CutMix + label smoothing + stochastic depth
    on the embedded digits, end to end, ≥ 99.3% test accuracy (the issue's bar; README: its time and the plain
    recipe beside it)."""
    config = ROOT / "recipes" / "configs" / "digits_regularized.yaml"
    result = launch(RECIPE, "--config", str(config), "--output_dir", str(tmp_path), "--tracker", "none")
    assert result.returncode == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["test/accuracy"] >= 0.993, summary
    assert {"mixup", "label_smoothing", "stochastic_depth"} <= set(summary["run"]["techniques"])
    assert (tmp_path / "augmentations.png").stat().st_size > 10_000
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "train/loss" in line]
    assert all(0 <= line["train/accuracy"] <= 1 and 0 <= line["perf/data_wait"] <= 1 for line in train)
    assert [line["stochastic_depth/rate"] for line in train if "stochastic_depth/rate" in line][-1] == pytest.approx(0.1)
