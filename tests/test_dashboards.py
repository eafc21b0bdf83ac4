"""What a user watches: the W&B run read back from its offline files (metrics, pictures, group and tags), the same
scalar names in TensorBoard, and the debug modes (--overfit_batches, --detect_anomaly)."""

from __future__ import annotations

import json

import pytest

from helpers import ROOT, launch
from wandb_reader import finished_records, logged_history, read_records, run_file

RECIPE = ROOT / "recipes" / "image_classification.py"
CONFIG = ("--config", str(ROOT / "recipes" / "configs" / "digits_regularized.yaml"))
SHORT = ("--max_steps", "6", "--log_every", "3", "--data.num_workers", "0", "--techniques.cosine_lr", "{warmup_steps: 2}")
STORY = ["train/loss", "train/accuracy", "lr", "grad_norm", "grad_norm_clipped", "samples_per_second",
         "perf/data_wait", "perf/step_seconds/rank_0", "memory/rss_mb", "epoch", "samples_seen"]


@pytest.mark.slow
def test_wandb_run_tells_the_story(tmp_path):
    result = launch(RECIPE, *CONFIG, "--output_dir", str(tmp_path), *SHORT, "--tracker", "wandb",
                    "--group", "sweep-7", "--tags", "[digits, regularized]")
    assert result.returncode == 0
    path = run_file(tmp_path)
    history = logged_history(path)
    train = [row for row in history if "train/loss" in row]
    assert [row["_step"] for row in train] == [3, 6]
    for row in train:
        assert set(STORY) <= set(row), set(STORY) - set(row)
        assert 0 < row["train/loss"] < 5 and 0 <= row["train/accuracy"] <= 1 and 0 <= row["perf/data_wait"] <= 1
        assert row["grad_norm_clipped"] == pytest.approx(min(row["grad_norm"], 2.0), rel=1e-5)
        assert 50 < row["memory/rss_mb"] < 20_000 and 0 < row["perf/step_seconds/rank_0"] < 60
    assert any("val/accuracy" in row for row in history) and any("test/accuracy" in row for row in history)
    pictures = {key.removesuffix("/_type") for row in history for key, value in row.items()
                if key.endswith("/_type") and value == "images/separated"}  # the reader flattens nested keys
    assert {"augmentations", "lr_schedule"} <= pictures, pictures
    [run] = [r.run for r in read_records(path) if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "sweep-7" and list(run.tags) == ["digits", "regularized"]


@pytest.mark.slow
def test_tensorboard_holds_the_same_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = launch(RECIPE, *CONFIG, "--output_dir", str(tmp_path), *SHORT, "--tracker", "tensorboard")
    assert result.returncode == 0
    events = EventAccumulator(str(tmp_path / "framework"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert set(STORY) <= set(events.Tags()["scalars"]), set(STORY) - set(events.Tags()["scalars"])
    assert {"augmentations", "lr_schedule"} <= set(events.Tags()["images"])
    jsonl = {key for line in (tmp_path / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    assert set(STORY) <= jsonl  # metrics.jsonl is always written, with the same names


@pytest.mark.slow
def test_overfit_batches_drives_the_training_loss_near_zero(tmp_path):
    """The handbook's first debugging step: a model that cannot memorise two batches has a bug."""
    result = launch(RECIPE, "--config", str(ROOT / "recipes" / "configs" / "image_classification.yaml"),
                    "--output_dir", str(tmp_path), "--tracker", "none", "--overfit_batches", "2", "--epochs", "60",
                    "--eval_every", "0",  # validation once, at the end: 60 evaluations would cost more than training
                    "--techniques.label_smoothing", "null", "--techniques.ema", "null", "--log_every", "10")
    assert result.returncode == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["steps"] == 120  # 2 batches per epoch
    assert summary["overfit_batches"]["near_zero"] and summary["overfit_batches"]["last_loss"] < 0.05, summary
    assert "overfit_batches 2: training loss" in result.stdout and "near zero" in result.stdout


def test_detect_anomaly_is_on_during_training_only(tmp_path):
    import torch

    from framework.technique import Technique
    from helpers import make_trainer

    seen = []

    class Probe(Technique):
        def on_loss(self, state, loss, batch, outputs):
            seen.append(torch.is_anomaly_enabled())
            return loss

    make_trainer(tmp_path, techniques=[Probe()], epochs=1, detect_anomaly=True).fit()
    assert seen and all(seen) and not torch.is_anomaly_enabled()


@pytest.mark.parametrize("rewind", [False, True])
def test_a_resumed_run_continues_its_wandb_run_or_rewinds_it_to_the_checkpoint(tmp_path, monkeypatch, rewind):
    """Killed after step 6, resumed from its step-3 checkpoint: the same W&B run id; with --wandb_rewind the run
    file names the checkpoint's step as the branch point (W&B truncates the history there), without it none."""
    import torch
    from torch.utils.data import DataLoader

    from framework.config import TrainerConfig
    from framework.loop import Trainer
    from framework.task import ClassificationTask
    from helpers import reset_accelerate, tiny_classification_data

    monkeypatch.setenv("WANDB_MODE", "offline")
    data = tiny_classification_data(16)

    def run(**config):
        reset_accelerate()
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        settings = TrainerConfig(output_dir=str(tmp_path), epochs=2, max_steps=6, checkpoint_every=3,
                                 keep_checkpoints=3, log_every=1, tracker="wandb", **config)
        Trainer(settings, model, torch.optim.SGD(model.parameters(), lr=0.1), ClassificationTask(num_classes=3),
                DataLoader(data, batch_size=4), techniques=[]).fit()

    run()
    run(resume_from=str(tmp_path / "checkpoints" / "step_00000003"), wandb_rewind=rewind)
    first, second = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    records = [finished_records(path) for path in (first, second)]
    runs = [[r.run for r in rs if r.WhichOneof("record_type") == "run"] for rs in records]
    assert [len(r) for r in runs] == [1, 1], runs
    assert runs[0][0].run_id == runs[1][0].run_id == (tmp_path / "wandb_run_id").read_text().strip()
    internal = [json.loads(item.value_json) for item in runs[1][0].config.update if item.key == "_wandb"]
    expected = {"run_id": runs[0][0].run_id, "step": 3} if rewind else None
    assert [entry.get("branch_point") for entry in internal] == [expected], internal
    assert [row["_step"] for row in logged_history(second) if "train/loss" in row] == [4, 5, 6]
