"""Resuming late in a run, launched for real with every default technique on (the default config: doctor, label
smoothing, cosine LR with warmup, gradient clipping, EMA): a run killed past the doctor's first plateau window (100
steps) resumes mid-epoch to bitwise the weights of an uninterrupted run, and a finished run extended with a larger
--max_steps trains on. Techniques whose state depends on the step must derive it after the checkpoint restored it:
the doctor once took its plateau window's start from `state.step` in fit_start (0, before the restore) and crashed
one step after any resume past step 100 (`statistics.StatisticsError: fmean requires at least one data point`)."""

from __future__ import annotations

import json

import pytest

from framework.checkpoint import completed_checkpoints
from helpers import ROOT, assert_same_weights, launch

DUMP = ROOT / "tests" / "scripts" / "recipe_then_dump_params.py"
# 1257 training images / batch 64 → 20 steps per epoch; checkpoints every 10 steps put one mid-epoch (step 110).
ARGS = ("--config", str(ROOT / "recipes" / "configs" / "image_classification.yaml"), "--tracker", "none",
        "--max_steps", "130", "--checkpoint_every", "10", "--log_every", "10")
KILL_STEP = 115  # past the first plateau window (steps 0-99, checked at step 100); newest checkpoint: step 110


def run(output_dir, *extra):
    return launch(DUMP, *ARGS, "--output_dir", str(output_dir), *extra)


@pytest.mark.slow
def test_killed_late_resumes_to_the_same_weights_and_a_finished_run_extends(tmp_path):
    reference = run(tmp_path / "reference")
    assert reference.returncode == 0
    summary = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["run"]["steps"] == 130 and summary["run"]["techniques"][0] == "doctor"
    assert summary["doctor"] == []  # its plateau window ran (at step 100) and stayed quiet

    killed = run(tmp_path / "run", "--techniques.kill_at", f"{{step: {KILL_STEP}}}")
    assert killed.returncode != 0
    latest = completed_checkpoints(tmp_path / "run")[-1]
    assert latest.name == "step_00000110"  # mid-epoch: step 110 is batch 10 of epoch 5

    resumed = run(tmp_path / "run", "--resume_from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {latest}" in resumed.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["run"]["steps"] == 130 and summary["doctor"] == []
    assert_same_weights(tmp_path / "reference", tmp_path / "run")

    # A finished run, trained on: `--resume_from latest` with a larger --max_steps (the resumed run covers a whole
    # plateau window of 20 steps, so the doctor's window after the restore is exercised, not only skipped).
    extended = run(tmp_path / "reference", "--resume_from", "latest", "--max_steps", "160",
                   "--techniques.doctor", "{plateau_window: 20}")
    assert extended.returncode == 0, extended.stderr[-3000:]
    summary = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["run"]["steps"] == 160
    assert [f["code"] for f in summary["doctor"]] == []  # a converged run's late window is no plateau
