"""A checkpoint never runs code: planted pickles in a DeepSpeed ZeRO-2 checkpoint (the framework's own state file and
DeepSpeed's optimizer-state file) are refused on resume, and their code does not run; DeepSpeed checkpoints are
consolidated by the framework's own command, not by the script inside the checkpoint. (That an intact ZeRO-2
checkpoint resumes, loaded the same weights-only way, is tests/test_fault_tolerance.py's bitwise kill test.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint import MARKER, _flush_and_list
from helpers import ROOT, launch, launch_environment

pytestmark = pytest.mark.slow
RECIPE = ROOT / "recipes" / "image_classification.py"
ARGS = ("--tracker", "none", "--data.num_workers", "0", "--techniques.ema", "null")


class Planted:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("zero2")
    result = launch(RECIPE, *ARGS, "--max_steps", "3", "--output_dir", str(run), launch_config="deepspeed_zero2.yaml")
    assert result.returncode == 0
    return run


@pytest.mark.parametrize("planted_in", ["custom_checkpoint_0.pkl",
                                        "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_planted_pickle_in_a_zero2_checkpoint_is_refused_and_never_runs(zero2_run, tmp_path, planted_in):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(zero2_run), str(run)], check=True)
    checkpoint = run / "checkpoints" / "step_00000003"
    marker_file = tmp_path / "code_ran"
    torch.save({"payload": Planted(marker_file)}, checkpoint / planted_in)
    # An attacker who can write the files can rewrite the manifest too: the refusal must not rely on the checksum.
    marker = json.loads((checkpoint / MARKER).read_text())
    marker["files"] = _flush_and_list(checkpoint)
    (checkpoint / MARKER).write_text(json.dumps(marker))

    resumed = launch(RECIPE, *ARGS, "--max_steps", "6", "--output_dir", str(run), "--resume_from", "latest",
                     launch_config="deepspeed_zero2.yaml")
    assert resumed.returncode != 0
    assert not marker_file.exists(), "the checkpoint's pickled code ran"
    assert "pickled Python objects" in resumed.stderr


def test_consolidate_command_writes_the_runs_weights(zero2_run, tmp_path):
    """`python -m framework.checkpoint consolidate CKPT OUT`: the sharded checkpoint's fp32 weights as
    model.safetensors, equal to the weights the run exported at that same step."""
    out = tmp_path / "consolidated"
    done = subprocess.run([sys.executable, "-m", "framework.checkpoint", "consolidate",
                           str(zero2_run / "checkpoints" / "step_00000003"), str(out)],
                          capture_output=True, text=True, env=launch_environment(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    consolidated, exported = load_file(out / "model.safetensors"), load_file(zero2_run / "model.safetensors")
    assert consolidated.keys() == exported.keys()
    for key in exported:
        assert torch.equal(consolidated[key], exported[key].to(consolidated[key].dtype)), key
