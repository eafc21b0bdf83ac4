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
