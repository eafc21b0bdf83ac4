"""Elastic resume on another number of processes (DDP; DeepSpeed ZeRO-2 through DeepSpeed's universal checkpoint;
ZeRO-3 into a run without DeepSpeed): the data position is carried over by samples seen, so within the interrupted
epoch no sample is trained twice or skipped (sample indices recorded by every rank), and the model and optimizer state
right after loading equal the checkpoint's."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch

from framework.checkpoint import (
    adam_state_from_universal,
    batch_position_for_world_size,
    safe_checkpoint_loads,
    universal_checkpoint,
)
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


def checkpoint_state(checkpoint) -> dict[str, torch.Tensor]:
    """What DeepSpeed checkpoint `checkpoint` holds, gathered from its ZeRO shards by DeepSpeed's own tools: every
    parameter's fp32 value and Adam moments (its universal checkpoint), the buffers, the Adam step."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    zero = universal_checkpoint(checkpoint)
    with safe_checkpoint_loads(deepspeed=True):
        result = {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(checkpoint)).items()}
        for name in [p.parent.name for p in zero.glob("*/exp_avg.pt")]:  # the parameters (zero/ has buffers too)
            for key in ("exp_avg", "exp_avg_sq"):
                value = torch.load(zero / name / f"{key}.pt", weights_only=True)
                result[f"{name}.{key}"] = (value["param"] if isinstance(value, dict) else value).reshape(
                    result[name].shape)
        saved = torch.load(zero / "optimizer_state.pt", weights_only=True)
    step = (torch.load(zero / "0.weight" / "step.pt", weights_only=True) if (zero / "0.weight" / "step.pt").exists()
            else saved["optimizer_state_dict"]["state"][0]["step"])
    result["step"] = torch.as_tensor(step, dtype=torch.float32)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("first, then, then_processes", [("deepspeed_zero2.yaml", "deepspeed_zero2.yaml", 1),
                                                         ("deepspeed_zero3.yaml", "cpu.yaml", 1)])
def test_deepspeed_checkpoint_resumes_on_another_world_size_or_backend(tmp_path, first, then, then_processes):
    # 2 ranks stop after 2 steps (16 of the epoch's 40 samples); 1 process continues to the epoch's end (step 2 + 6).
    interrupted = launch(SCRIPT, str(tmp_path), "2", "--adamw", launch_config=first)
    assert interrupted.returncode == 0
    checkpoint = tmp_path / "saved_step_2"  # a copy: the resumed run's retention deletes the original
    shutil.copytree(tmp_path / "checkpoints" / "step_00000002", checkpoint)
    resumed = launch(SCRIPT, str(tmp_path), "8", "--adamw", "--resume", launch_config=then,
                     launcher_args=("--num_processes", str(then_processes)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    seen = epoch_samples(tmp_path, 0)
    assert sorted(seen) == list(range(40)) and set(seen.values()) == {1}  # every sample once: none twice or skipped
    # Right after loading, the 1-process run holds the checkpoint's weights, buffers, Adam moments and step exactly.
    saved = checkpoint_state(checkpoint)
    loaded = torch.load(tmp_path / "state_after_resume.pt", weights_only=True)
    assert loaded.keys() == saved.keys()
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key


def test_adam_state_from_a_universal_checkpoint_matches_torch(tmp_path):
    """The conversion of a universal checkpoint's per-parameter files into a torch AdamW state_dict, against AdamW's
    own state after two steps (two groups, the no-decay group listed in another order than the model's)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    groups = [{"params": [model[1].weight, model[0].weight], "weight_decay": 0.05},
              {"params": [model[1].bias, model[0].bias], "weight_decay": 0.0}]
    reference = torch.optim.AdamW(groups, lr=0.01)
    for _ in range(2):
        model(torch.randn(5, 4)).square().sum().backward()
        reference.step()
    names = {id(p): n for n, p in model.named_parameters()}
    zero = tmp_path / "zero"
    for parameter, state in reference.state.items():  # the universal layout: ZeRO-3's flat tensors, ZeRO-1/2's dicts
        (zero / names[id(parameter)]).mkdir(parents=True)
        torch.save(state["exp_avg"].flatten(), zero / names[id(parameter)] / "exp_avg.pt")
        torch.save({"param": state["exp_avg_sq"]}, zero / names[id(parameter)] / "exp_avg_sq.pt")
    saved_groups = [{k: v for k, v in group.items() if k != "params"} for group in reference.param_groups]
    torch.save({"param_groups": saved_groups, "optimizer_state_dict": {"state": {0: {"step": torch.tensor(2.0)}}}},
               zero / "optimizer_state.pt")
    fresh = torch.optim.AdamW([{**g, "params": list(g["params"])} for g in groups], lr=0.5)  # another LR: replaced
    converted = adam_state_from_universal(zero, [[names[id(p)] for p in g["params"]] for g in fresh.param_groups],
                                          {n: p.shape for n, p in model.named_parameters()}, fresh.state_dict())
    fresh.load_state_dict(converted)
    expected = reference.state_dict()
    assert fresh.state_dict()["param_groups"] == expected["param_groups"]
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(fresh.state_dict()["state"][index][key], value), (index, key)
