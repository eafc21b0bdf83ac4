"""Changes between restarts are never silent: on resume the config is compared with the checkpoint's. What would
misread the saved state (data, model, accumulation, seed, techniques) is refused with the key named;
what can be applied (LR, weight decay, epochs, max_steps, intervals) is applied and printed, and config.yaml holds it.
(A DDP run resumes on another world size: tests/test_elastic_resume.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from framework.backend import Backend
from framework.checkpoint import MARKER, check_resumable
from framework.errors import ConfigError
from helpers import ROOT, launch_environment

TINY = ["--tracker", "none", "--doctor", "false", "--data.batch_size", "8", "--data.image_size", "8",
        "--model.widths", "[4]", "--techniques", "{}", "--data.num_workers", "0", "--checkpoint_every", "4",
        "--log_every", "1"]


def recipe(output_dir, *args):
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "image_classification.py"), *TINY,
                           "--output_dir", str(output_dir), *args], cwd=ROOT, env=launch_environment(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def run_to_step_8(tmp_path):
    first = recipe(tmp_path, "--max_steps", "8")
    assert first.returncode == 0, first.stderr[-3000:]
    return tmp_path


def test_a_changed_lr_and_length_are_applied_and_printed(run_to_step_8):
    resumed = recipe(run_to_step_8, "--max_steps", "12", "--optimizer.lr", "0.02", "--resume_from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: changed since the checkpoint: max_steps 8 -> 12, optimizer.lr 0.01 -> 0.02" in resumed.stdout
    lrs = {line["step"]: line["lr"] for line in map(json.loads, (run_to_step_8 / "metrics.jsonl").read_text()
                                                     .splitlines()) if "lr" in line}
    assert lrs[8] == pytest.approx(0.01) and all(lrs[step] == pytest.approx(0.02) for step in range(9, 13))
    saved = yaml.safe_load((run_to_step_8 / "config.yaml").read_text())
    assert saved["optimizer"]["lr"] == 0.02 and saved["max_steps"] == 12


@pytest.mark.parametrize("change, key", [
    (["--data.batch_size", "16"], "data.batch_size"),
    (["--gradient_accumulation_steps", "2"], "gradient_accumulation_steps"),
    (["--seed", "1"], "seed"),
    (["--techniques", "{ema: {decay: 0.9}}"], "techniques.ema"),
])
def test_a_change_that_would_misread_the_state_is_refused(run_to_step_8, change, key):
    resumed = recipe(run_to_step_8, "--max_steps", "12", "--resume_from", "latest", *change)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert resumed.stderr.count("error:") == 1 and key in resumed.stderr
    assert "cannot change on resume" in resumed.stderr


def test_a_zero3_checkpoint_of_another_world_size_is_refused(tmp_path):
    """ZeRO-1/2 checkpoints resume on another world size through DeepSpeed's universal checkpoint
    (tests/test_elastic_resume.py); ZeRO-3's only without DeepSpeed: refused with both fixes."""
    (tmp_path / MARKER).write_text(json.dumps({"step": 4, "backend": {"distributed_type": "DEEPSPEED",
                                                                      "num_processes": 2, "deepspeed_stage": 3}}))
    check_resumable(tmp_path, Backend(distributed_type="NO", num_processes=1))  # consolidated as it loads
    with pytest.raises(ConfigError, match="ZeRO-3 on 2 processes.*ZeRO-3 on 1 processes.*without DeepSpeed"):
        check_resumable(tmp_path, Backend(distributed_type="DEEPSPEED", num_processes=1, deepspeed_stage=3))
