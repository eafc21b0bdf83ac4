"""Elastic resume of a DDP run on another number of processes: the data position is carried over by samples seen,
so within the interrupted epoch no sample is trained twice or skipped (sample indices recorded by every rank)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from framework.checkpoint import batch_position_for_world_size
from framework.errors import ConfigError
from helpers import ROOT, launch

SCRIPT = ROOT / "tests" / "scripts" / "record_samples.py"


def test_batch_position_converts_by_samples_seen():
    assert batch_position_for_world_size(3, old_world=2, new_world=1, accumulation=1) == 6
    assert batch_position_for_world_size(6, old_world=1, new_world=2, accumulation=1) == 3
    assert batch_position_for_world_size(4, old_world=2, new_world=1, accumulation=2) == 8
    with pytest.raises(ConfigError, match="5 batches of 1 process"):
        batch_position_for_world_size(5, old_world=1, new_world=2, accumulation=1)
    with pytest.raises(ConfigError, match="accumulation"):
        batch_position_for_world_size(2, old_world=1, new_world=2, accumulation=2)


def epoch_samples(run_dir, epoch):
    seen = Counter()
    for path in run_dir.glob("samples_rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["epoch"] == epoch:
                seen.update(record["indices"])
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("multi_cpu.yaml", "cpu.yaml"), ("cpu.yaml", "multi_cpu.yaml")])
def test_resume_on_another_world_size_trains_each_sample_of_the_epoch_once(tmp_path, first, then):
    # 40 samples, batches of 4: an epoch is 10 batches on 1 process, 5 per rank on 2. Stop mid-epoch (4 batches of
    # 1 process, or 2 of 2 processes: 16 samples either way), resume on the other world size to the epoch's end.
    stop = 4 if first == "cpu.yaml" else 2
    interrupted = launch(SCRIPT, str(tmp_path), str(stop), launch_config=first)
    assert interrupted.returncode == 0
    assert sum(epoch_samples(tmp_path, 0).values()) == 16
    finish = 7 if then == "multi_cpu.yaml" else 8  # the epoch's last step on the new world size: 4 + 3, or 2 + 6
    resumed = launch(SCRIPT, str(tmp_path), str(finish), "--resume", launch_config=then)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    seen = epoch_samples(tmp_path, 0)
    assert sorted(seen) == list(range(40)) and set(seen.values()) == {1}  # every sample once: none twice or skipped
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["num_processes"] == (2 if then == "multi_cpu.yaml" else 1) and summary["run"]["epochs"] == 1
