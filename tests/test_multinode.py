"""Multi-node on one machine: the SLURM batch script starts one `accelerate launch` per "node" (here: two on the
loopback address, through stand-ins for srun/scontrol), and the two machines × one process rendezvous and train."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, launch_environment

SCRIPT = ROOT / "launch_configs" / "slurm" / "multi_node.sbatch"


@pytest.mark.slow
def test_slurm_script_runs_two_machines_on_loopback(tmp_path):
    env = launch_environment({
        "PATH": f"{ROOT / 'tests' / 'fake_slurm'}:{launch_environment()['PATH']}",
        "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "GPUS_PER_NODE": "1",
        "MAIN_PROCESS_PORT": "29561", "ACCELERATE": str(ROOT / ".venv" / "bin" / "accelerate"),
    })
    result = subprocess.run(
        ["bash", str(SCRIPT), "tests/scripts/recipe_then_dump_params.py",
         "--config", "recipes/configs/image_classification.yaml", "--output_dir", str(tmp_path),
         "--epochs", "2", "--tracker", "none", "--techniques.dump_params", "{}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["num_processes"] == 2 and summary["run"]["distributed_type"] == "MULTI_CPU"
    rank0, rank1 = (load_file(tmp_path / f"params_rank{rank}.safetensors") for rank in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the machines"


def test_sbatch_script_takes_the_first_host_without_a_broken_pipe(tmp_path):
    """`scontrol show hostnames` lists every node of the job: reading only its first line must not kill it with
    SIGPIPE (under `set -o pipefail` that ended the script with status 141 and no output, whenever scontrol wrote
    after the reader had gone, a race on a clean machine, certain on a cluster of many nodes). Here scontrol writes
    the other nodes after a pause, as a slow daemon does, and the launcher is a stub that prints what it is given."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/bash\necho 10.0.0.1\nsleep 0.5\nfor i in $(seq 2 300); do echo "10.0.0.$i"; '
                                   'done\n')
    (fake / "srun").write_text((ROOT / "tests" / "fake_slurm" / "srun").read_text())
    (fake / "accelerate").write_text('#!/bin/bash\necho "rank $SLURM_NODEID: $*"\n')
    for script in fake.iterdir():
        script.chmod(0o755)
    for restarts, resume in (("0", ""), ("2", "--resume_from latest ")):
        # A fresh job starts a fresh run; only a requeued one (SLURM_RESTART_COUNT > 0) resumes.
        env = launch_environment({"PATH": f"{fake}:{launch_environment()['PATH']}",
                                  "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "GPUS_PER_NODE": "1",
                                  "ACCELERATE": str(fake / "accelerate"), "SLURM_RESTART_COUNT": restarts})
        result = subprocess.run(["bash", str(SCRIPT), "recipes/image_classification.py", "--epochs", "1"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
        assert "main process: 10.0.0.1:29514" in result.stdout
        for rank in (0, 1):
            assert f"rank {rank}: launch --config_file launch_configs/multi_node.yaml --num_machines 2 " \
                   f"--num_processes 2 --machine_rank {rank} --main_process_ip 10.0.0.1 --main_process_port 29514 " \
                   f"recipes/image_classification.py {resume}--epochs 1" in result.stdout
