"""Exact resume with random data augmentation, launched for real: the regularized digits recipe (random resized crop,
rotation, random erasing, Mixup/CutMix, stochastic depth, EMA) SIGKILLed at a random step and resumed from its last
(mid-epoch) checkpoint ends with bitwise the weights of the uninterrupted run, whatever the number of DataLoader
workers: each sample's augmentation is a function of (seed, epoch, sample index), not of a process's RNG state.

Each process count has one uninterrupted reference run, with the data loaded in-process (`--data.num_workers 0`);
the killed runs load it in-process or in 2 worker processes, and both must end on the reference's weights.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint import completed_checkpoints
from helpers import ROOT, launch

DUMP = ROOT / "tests" / "scripts" / "recipe_then_dump_params.py"
STEPS, EVERY = 24, 8  # digits: 20 steps an epoch on 1 process, 10 on 2, so the run crosses an epoch boundary
ARGS = ("--config", str(ROOT / "recipes" / "configs" / "digits_regularized.yaml"), "--tracker", "none",
        "--max_steps", str(STEPS), "--checkpoint_every", str(EVERY), "--log_every", "4", "--eval_every", "0",
        "--techniques.dump_params", "{}")
WORLD = {"cpu.yaml": 1, "multi_cpu.yaml": 2}
STEPS_PER_EPOCH = {"cpu.yaml": 20, "multi_cpu.yaml": 10}  # 1,257 training digits, 64 a batch on each process


def last_checkpoint_before(step: int, per_epoch: int) -> int:
    """The loop checkpoints every EVERY steps and at each epoch's end; a run killed in the hook after step S has not
    yet saved S."""
    return max(s for s in range(1, step) if s % EVERY == 0 or s % per_epoch == 0)


def run(output_dir, launch_config, workers, *extra):
    return launch(DUMP, *ARGS, "--output_dir", str(output_dir), "--data.num_workers", str(workers), *extra,
                  launch_config=launch_config)


def assert_same_weights(first_dir, second_dir):
    for name in ("model.safetensors", "model_ema.safetensors"):
        first, second = load_file(first_dir / name), load_file(second_dir / name)
        assert first.keys() == second.keys()
        differing = [key for key in first if not torch.equal(first[key], second[key])]
        assert not differing, f"{name}: {len(differing)}/{len(first)} tensors differ from the uninterrupted run, " \
                              f"e.g. {differing[:3]}"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The uninterrupted run of each launch config, run once for the tests that need it."""
    done = {}

    def reference(launch_config):
        if launch_config not in done:
            directory = tmp_path_factory.mktemp(f"reference-{launch_config.removesuffix('.yaml')}")
            result = run(directory, launch_config, 0)
            assert result.returncode == 0
            summary = json.loads((directory / "summary.json").read_text())
            assert summary["run"]["num_processes"] == WORLD[launch_config] and summary["run"]["steps"] == STEPS
            assert f"{STEPS_PER_EPOCH[launch_config]} steps per epoch" in result.stdout
            done[launch_config] = directory
        return done[launch_config]

    return reference


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("launch_config", list(WORLD))
def test_killed_with_augmentation_resumes_to_the_same_weights(tmp_path, references, launch_config, workers):
    reference = references(launch_config)
    per_epoch = STEPS_PER_EPOCH[launch_config]
    # A random step whose newest checkpoint is a mid-epoch one: the resumed run starts inside an epoch.
    kill_step = random.choice([s for s in range(EVERY + 1, STEPS) if last_checkpoint_before(s, per_epoch) % per_epoch])
    print(f"killing at step {kill_step}")
    killed = run(tmp_path, launch_config, workers, "--techniques.kill_at", f"{{step: {kill_step}}}")
    assert killed.returncode != 0
    assert int((tmp_path / "step_rank0").read_text()) == kill_step
    latest = completed_checkpoints(tmp_path)[-1]
    assert latest.name == f"step_{last_checkpoint_before(kill_step, per_epoch):08d}"
    assert not (tmp_path / "summary.json").exists()

    # kill_at stays, disarmed (step 0 has passed): resuming refuses a technique added or removed since the checkpoint.
    resumed = run(tmp_path, launch_config, workers, "--resume_from", "latest", "--techniques.kill_at", "{step: 0}")
    assert resumed.returncode == 0 and f"resuming from {latest}" in resumed.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["run"]["steps"] == STEPS
    assert_same_weights(reference, tmp_path)
