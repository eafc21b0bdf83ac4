"""One run per output directory: a lock (pid, host) refuses a second run with one line, a stale lock is taken over;
an output_dir that cannot be a directory is one clear error; after a resume metrics.jsonl holds each step once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from framework.errors import ConfigError
from helpers import ROOT, launch_environment, make_trainer, reset_accelerate


def test_a_second_run_into_a_busy_output_dir_is_refused(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                    "started": "2026-12-02T10:00:00"}))
        with pytest.raises(ConfigError, match=rf"in use by process {sleeper.pid} on {socket.gethostname()}"):
            make_trainer(tmp_path, batch_size=4, n=16, epochs=1)
    finally:
        sleeper.kill()
        sleeper.wait()
    reset_accelerate()
    # The process is gone: its lock is stale, taken over with a warning, and released when the run ends.
    with pytest.warns(UserWarning, match="stale lock"):
        trainer = make_trainer(tmp_path, batch_size=4, n=16, epochs=1)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    trainer.fit()
    assert not (tmp_path / ".lock").exists()


@pytest.mark.slow
def test_two_real_launches_into_one_output_dir(tmp_path):
    command = [sys.executable, str(ROOT / "recipes" / "image_classification.py"), "--tracker", "none",
               "--output_dir", str(tmp_path), "--data.num_workers", "0"]
    first = subprocess.Popen(command + ["--epochs", "200"], cwd=ROOT, env=launch_environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / ".lock").exists() and time.time() < deadline:
            time.sleep(0.5)
        assert (tmp_path / ".lock").exists()
        second = subprocess.run(command + ["--max_steps", "2"], cwd=ROOT, env=launch_environment(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert second.stderr.count("error:") == 1 and f"in use by process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run trains on, untouched
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_output_dir_that_cannot_be_a_directory_is_one_clear_error(tmp_path, where):
    (tmp_path / "taken").write_text("not a directory")
    output_dir = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "run"
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "image_classification.py"), "--tracker", "none",
                             "--max_steps", "1", "--output_dir", str(output_dir)], cwd=ROOT,
                            env=launch_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: output_dir {output_dir} cannot be used" in result.stderr


def test_after_a_resume_metrics_hold_each_step_once(tmp_path):
    make_trainer(tmp_path, batch_size=4, n=16, epochs=2, keep_checkpoints=5, doctor=False).fit()
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    # A run killed after step 9 of a longer run left lines past its newest checkpoint (step 8).
    metrics.write_text("\n".join(lines + [json.dumps({"step": 9, "train/loss": 1.0}),
                                          json.dumps({"step": 10, "train/loss": 1.0})]) + "\n")
    reset_accelerate()
    make_trainer(tmp_path, batch_size=4, n=16, epochs=3, resume_from="latest", doctor=False).fit()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if "train/loss" in json.loads(line)]
    assert steps == list(range(1, 13))  # log_every 1: every step once, none repeated


def test_a_lock_from_another_host_is_refused_unless_this_slurm_job_left_it(tmp_path, monkeypatch):
    from framework.checkpoint import acquire_run_lock, release_run_lock

    (tmp_path / ".lock").write_text(json.dumps({"pid": 1234, "host": "node7", "job": "991"}))
    monkeypatch.setenv("SLURM_JOB_ID", "992")  # another job: that run may be alive on node7
    with pytest.raises(ConfigError, match="in use by process 1234 on node7"):
        acquire_run_lock(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "991")  # this job, requeued onto another node: its earlier run is gone
    with pytest.warns(UserWarning, match="stale lock"):
        acquire_run_lock(tmp_path)
    assert json.loads((tmp_path / ".lock").read_text())["job"] == "991"
    release_run_lock(tmp_path)
    assert not (tmp_path / ".lock").exists()
