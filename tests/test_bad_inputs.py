"""Every bad input is refused before training: one `error:` message that names the problem and its fix, exit status
2, nothing written over an earlier run. Configs are data (nothing they name is imported or called), checkpoints load
weights-only, and a W&B API key never reaches the run's files or logs."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from framework.backend import Backend
from framework.checkpoint import MARKER, check_checkpoint_matches, load_checkpoint
from framework.config import build_techniques, parse_config, run_main
from framework.data.images import ImageDataConfig, image_data
from framework.errors import ConfigError
from framework.models.resnet import ResNet, ResNetConfig
from framework.technique import check_techniques
from helpers import ROOT, launch_environment, load_recipe

pytestmark = pytest.mark.usefixtures("private_cache")  # tests/conftest.py

RUN_NUMBERS = itertools.count()
#: A run small enough to reach its first step in about a second.
TINY = ["--tracker", "none", "--doctor", "false", "--max_steps", "2", "--data.batch_size", "8",
        "--data.image_size", "8", "--model.widths", "[4]", "--techniques", "{}"]


recipe = load_recipe


def run(name: str, *args: str) -> Callable[[Path], Callable[[], object]]:
    """A table row's action: the recipe's `main` on `args` ({files} is the folder of bad inputs), in a fresh
    output_dir unless the row gives its own."""
    def make(files: Path) -> Callable[[], object]:
        argv = ["--output_dir", str(files / "runs" / str(next(RUN_NUMBERS)))]
        return lambda: recipe(name).main(argv + [arg.format(files=files) if "{files}" in arg else arg for arg in args])
    return make


def call(function: Callable[[Path], object]) -> Callable[[Path], Callable[[], object]]:
    """A table row's action that is not a recipe run (a check called with made-up arguments)."""
    return lambda files: lambda: function(files)


class Stateful:
    """A registered object with a checkpointed counter, like a technique with state."""

    def __init__(self):
        self.count = torch.zeros(())

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """One folder holding every bad input of the table."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "runs").mkdir()
    (root / "typo.yaml").write_text("optimizer:\n  lrr: 0.1\n")
    (root / "os_system.yaml").write_text(
        f"techniques:\n  ema:\n    decay:\n      class_path: os.system\n      init_args:\n"
        f"        command: touch {root / 'pwned'}\n")
    corpus = root / "corpus"
    corpus.mkdir()
    for index in range(6):
        (corpus / f"doc{index}.txt").write_text(f"document {index} " * 60)
    (root / "empty.csv").write_text("text\n")
    (root / "corrupt.parquet").write_bytes(b"not a parquet file")
    images = root / "images"
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for index in range(10):
            Image.new("L", (8, 8), color=index * 20).save(images / label / f"{index}.png")
    (images / "a" / "broken.png").write_bytes(b"\x89PNG but not really")
    earlier = root / "earlier_run" / "checkpoints" / "step_00000010"
    earlier.mkdir(parents=True)
    (earlier / MARKER).write_text(json.dumps({"step": 10, "backend": {}}))
    other_model = root / "other_model_checkpoint"
    other_model.mkdir()
    save_file(ResNet(ResNetConfig(widths=[8], in_channels=1, num_classes=10)).state_dict(),
              str(other_model / "model.safetensors"))
    return root


def tiny_resnet() -> ResNet:
    return ResNet(ResNetConfig(widths=[4], in_channels=1, num_classes=10))


# (id, action, substrings the message must hold: the problem and the fix)
BAD_INPUTS = [
    ("unknown key", run("image_classification", "--epoch", "3"),
     ["unrecognized arguments: --epoch", "--help"]),
    ("unknown key in YAML", run("image_classification", "--config", "{files}/typo.yaml"),
     ["'optimizer' does not accept option 'lrr'", "--help"]),
    ("wrong type", run("image_classification", "--epochs", "many"),
     ['"epochs"', "Expected a <class 'int'>. Got value: many"]),
    ("missing config file", run("image_classification", "--config", "{files}/nothere.yaml"),
     ["File does not exist", "nothere.yaml"]),
    ("unknown technique", run("image_classification", "--techniques.emma.decay", "0.9"),
     ["techniques.emma: unknown technique", "Registered techniques: "]),
    ("negative LR", run("image_classification", *TINY, "--optimizer.lr", "-0.1"),
     ["optimizer.lr must be positive, got -0.1", "Set --optimizer.lr to the peak learning rate"]),
    ("accumulation 0", run("image_classification", "--gradient_accumulation_steps", "0"),
     ["gradient_accumulation_steps must be at least 1, got 0", "pass --gradient_accumulation_steps 1 or more"]),
    ("batch size 0", run("image_classification", "--data.batch_size", "0"),
     ["data.batch_size must be at least 1, got 0", "pass --data.batch_size 1 or more"]),
    ("no training data left", run("language_model", "--data.val_fraction", "0.5", "--data.test_fraction", "0.5"),
     ["leaves no training data", "keep their sum below 1"]),
    ("warmup longer than training",
     run("image_classification", *TINY, "--techniques.cosine_lr.warmup_steps", "10"),
     ["warmup (10 steps) is not shorter than the whole run (2 steps)", "shorten the warmup or train longer"]),
    ("batch larger than the data set with drop_last",
     run("language_model", "--tracker", "none", "--data.name", "{files}/corpus/*.txt", "--data.context_length", "16",
         "--data.batch_size", "1000"),
     ["batch size 1000 is larger than the", "last incomplete batch is dropped", "Lower data.batch_size to at most"]),
    ("two techniques that cannot run together",
     run("image_classification", *TINY, "--techniques.mixup.alpha", "0.2", "--techniques.cutmix.alpha", "1.0"),
     ["batches would be mixed twice", "List only `mixup` and set its `cutmix_alpha`"]),
    ("technique the backend cannot run",
     call(lambda files: check_techniques(build_techniques({"sam": {}}), Backend("DEEPSPEED", 2, deepspeed_stage=2))),
     ["under DeepSpeed the engine steps inside backward", "Use a DDP launch config"]),
    ("missing folder", run("image_classification", *TINY, "--data.name", "{files}/no_such_folder"),
     ["no_such_folder' could not be loaded: no such file or folder", "Check the path"]),
    ("missing data files", run("language_model", "--data.name", "{files}/nothing_*.parquet"),
     ["nothing_*.parquet' could not be loaded: no such file or folder", "Check the path"]),
    ("corrupt data file", run("language_model", "--data.name", "{files}/corrupt.parquet"),
     ["could not be loaded (Parquet magic bytes not found", "Give an embedded data set"]),
    ("corrupt image", run("image_classification", *TINY, "--data.name", "{files}/images"),
     ["1 image(s) of the", "broken.png", "cannot be read", "--data.skip_unreadable true"]),
    ("empty data set", run("language_model", "--data.name", "{files}/empty.csv"),
     ["empty.csv' holds no samples", "add data"]),
    ("empty split", run("language_model", "--data.name", "{files}/corpus/*.txt", "--data.context_length", "100000"),
     ["a split has no full block of 100001 tokens", "lower data.context_length"]),
    ("missing checkpoint", run("image_classification", *TINY, "--resume_from", "{files}/no_checkpoint"),
     ["no_checkpoint is not a complete checkpoint", "or `latest`"]),
    ("fresh start over an earlier run",
     run("image_classification", *TINY, "--output_dir", "{files}/earlier_run"),
     ["holds checkpoints of an earlier run", "`--resume_from latest`", "`--overwrite true`"]),
    ("checkpoint of a different model",
     call(lambda files: check_checkpoint_matches(files / "other_model_checkpoint", tiny_resnet(), [])),
     ["holds weights of a different model", "shapes differ", "[8, 1, 3, 3] in the checkpoint, [4, 1, 3, 3] in the "
      "model", "output_dir/config.yaml"]),
    ("checkpoint written with other techniques",
     call(lambda files: check_checkpoint_matches(files / "earlier_run" / "checkpoints" / "step_00000010", tiny_resnet(),
                                                 [Stateful()])),
     ["holds 0 saved state(s)", "this run has 1 (Stateful)", "Resume with the techniques of the run that wrote it"]),
    ("YAML naming os.system", run("image_classification", "--config", "{files}/os_system.yaml"),
     ["techniques.ema.decay.class_path: a config cannot name Python code", "'os.system'",
      "Choose techniques by registered name"]),
]


@pytest.mark.parametrize("action, expected", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_refused_with_problem_and_fix(files, capsys, action, expected):
    with pytest.raises(SystemExit) as exit_info:
        run_main(action(files))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err  # jsonargparse prints its usage and a tip line (run --help) before the error
    assert "Traceback" not in error and "\nerror: " in "\n" + error
    for part in expected:
        assert part in error
    assert not (files / "pwned").exists()  # no row may run what a config names


def test_an_earlier_runs_checkpoints_are_left_as_they_were(files, capsys):
    run_dir = files / "earlier_run"
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    with pytest.raises(SystemExit):
        run_main(run("image_classification", *TINY, "--output_dir", str(run_dir))(files))
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


def test_skip_unreadable_trains_without_them_and_counts_them(files):
    config = ImageDataConfig(name=str(files / "images"), skip_unreadable=True, image_size=8, num_workers=0)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of the \w+ split .*broken.png"):
        data = image_data(config)
    assert sum(data.skipped_images.values()) == 1
    assert sum(len(split) for split in data.splits.values()) == 20  # every readable image kept


@pytest.mark.parametrize("args, expected", [
    (["--config", "{files}/os_system.yaml"], "a config cannot name Python code"),
    (["--data.name", "{files}/images", "--max_steps", "1", "--tracker", "none"], "broken.png"),
], ids=["os.system YAML", "corrupt image"])
def test_a_real_process_exits_2_with_one_error_line(files, args, expected):
    command = [sys.executable, str(ROOT / "recipes" / "image_classification.py"),
               "--output_dir", str(files / "runs" / "subprocess"), *[arg.format(files=files) if "{files}" in arg else arg for arg in args]]
    result = subprocess.run(command, cwd=ROOT, env=launch_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0]
    assert not (files / "pwned").exists()


# --- the config parser never answers random input with a traceback ---------------------------------------------
OPTIONS = ["--epochs", "--max_steps", "--seed", "--tracker", "--resume_from", "--overwrite", "--log_every",
           "--gradient_accumulation_steps", "--checkpoint_every", "--tags", "--techniques", "--techniques.ema",
           "--techniques.ema.decay", "--techniques.cosine_lr.warmup_steps", "--techniques.mixup.alpha",
           "--techniques.nope.x", "--optimizer", "--optimizer.lr", "--optimizer.betas", "--optimizer.name",
           "--data", "--data.name", "--data.batch_size", "--data.augment", "--data.augment.rotation",
           "--data.val_fraction", "--data.image_mode", "--model", "--model.widths", "--config"]
VALUES = st.one_of(
    st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["null", "~", "true", "[]", "{}", "[1, 2", "{a: 1}", "{class_path: os.system}", "''", ".", "/",
                     "{ema: {decay: 2}}", "{rotation: {degrees: x}}", "[0.9, 2]", "- a\n- b", "!!python/name:os.system"]),
    st.text(max_size=20),
)
KEYS = st.one_of(st.sampled_from(OPTIONS), st.text(min_size=1, max_size=15).map(lambda text: "--" + text))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=4))
@example([("--techniques.ema.decay", "[1, 2")])  # once a yaml.ParserError traceback
@example([("--model", "\x00")])  # once jsonargparse's ValueError (embedded null byte), from a YAML's "\0" too
def test_random_keys_and_values_get_a_clear_error_never_a_traceback(capsys, pairs):
    args = [item for pair in pairs for item in pair]
    if any(arg in ("-h", "--help", "--print_config") for arg in args):
        return  # these exit 0 by design
    try:
        parse_config(recipe("image_classification").ImageClassificationConfig, args)
    except SystemExit as exit_info:
        assert exit_info.code == 2
        assert "error: " in capsys.readouterr().err
    # any other exception fails the test: it would reach the user as a traceback


# --- safe loading -------------------------------------------------------------------------------------------------
class TiedModel(torch.nn.Module):
    """An embedding and an output layer sharing one weight, as in a GPT (saved once in model.safetensors)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.out = torch.nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight


def saved_tied_model(directory: Path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(TiedModel())
    stateful = Stateful()
    accelerator.register_for_checkpointing(stateful)
    stateful.count = torch.tensor(7.0)
    torch.manual_seed(3)
    accelerator.save_state(str(directory))
    return accelerator, model, stateful


def test_a_checkpoint_of_the_same_model_passes_and_loads_weights_only(tmp_path):
    accelerator, model, stateful = saved_tied_model(tmp_path / "checkpoint")
    weights, next_random = model.embed.weight.detach().clone(), torch.rand(3)
    with torch.no_grad():
        model.embed.weight.zero_()
    stateful.count = torch.tensor(0.0)
    load_checkpoint(accelerator, tmp_path / "checkpoint", model, [stateful])
    assert torch.equal(model.embed.weight, weights) and model.out.weight is model.embed.weight
    assert stateful.count == 7
    assert torch.equal(torch.rand(3), next_random)  # accelerate's RNG states load weights-only too


def test_a_checkpoint_holding_pickled_code_is_refused_without_running_it(tmp_path):
    accelerator, model, stateful = saved_tied_model(tmp_path / "checkpoint")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"count": Payload()}, tmp_path / "checkpoint" / "custom_checkpoint_0.pkl")
    with pytest.raises(ConfigError, match="holds pickled Python objects, not only tensors"):
        load_checkpoint(accelerator, tmp_path / "checkpoint", model, [stateful])
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is put back


def test_the_framework_checkpoints_hold_only_tensors_and_plain_values_and_no_api_key(tmp_path, monkeypatch, capsys):
    """A run with every kind of technique state, W&B tracking and WANDB_API_KEY set: its checkpoint files load with
    `weights_only=True`, and the key appears in none of its files (config.yaml, W&B's run files) nor its output."""
    sentinel = "sentinel" + "7" * 32  # W&B keys are 40 characters
    monkeypatch.setenv("WANDB_API_KEY", sentinel)
    monkeypatch.setenv("WANDB_MODE", "offline")
    output_dir = tmp_path / "run"
    trainer = recipe("image_classification").main([
        *TINY, "--output_dir", str(output_dir), "--tracker", "wandb", "--max_steps", "3",
        "--techniques.cosine_lr.warmup_steps", "1", "--techniques.ema.decay", "0.9", "--techniques.lookahead.k", "2",
        "--techniques.early_stopping.patience", "3", "--techniques.best_model.top_k", "1"])
    checkpoint = sorted((output_dir / "checkpoints").glob("step_*"))[-1]
    custom = sorted(checkpoint.glob("custom_checkpoint_*.pkl"))
    assert len(custom) == 1 + 5  # the train state and five stateful techniques
    for path in [*custom, checkpoint / "optimizer.bin"]:
        torch.load(path, weights_only=True)
    registered = [trainer.state, *[t for t in trainer.techniques if t.has_state]]
    load_checkpoint(trainer.accelerator, checkpoint, trainer.state.model, registered)
    assert trainer.state.step == 3
    leaked = [path for path in output_dir.rglob("*") if path.is_file() and sentinel.encode() in path.read_bytes()]
    assert leaked == []
    assert (output_dir / "config.yaml").is_file() and list(output_dir.glob("wandb/offline-run-*/run-*.wandb"))
    captured = capsys.readouterr()
    assert sentinel not in captured.out + captured.err
