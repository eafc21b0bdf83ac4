"""Streaming training data (`data.streaming: true`): each rank reads its own part of the stream and an epoch covers
the data once; a parquet folder and the stdlib text stream through the recipes; the position saved with a
checkpoint resumes a SIGKILLed run to bitwise the weights of an uninterrupted one (cpu and 2-process multi_cpu);
held-out losses count each sample once; a stream of unknown length without --max_steps is refused (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import datasets
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from framework.checkpoint import completed_checkpoints
from framework.data import ImageDataConfig, TextDataConfig, image_data, text_data
from framework.data.sources import load_source, make_splits
from framework.models.resnet import ResNet
from framework.models.vision import ImageModelConfig
from helpers import ROOT, assert_same_weights, launch, launch_environment, load_recipe, reset_accelerate

DUMP = ROOT / "tests" / "scripts" / "recipe_then_dump_params.py"
STREAMING = ("--data.streaming", "true", "--data.shuffle_buffer", "200")  # several chunks per epoch
# EMA and Mixup on (their state and random draws must survive the resume too); validation batches of 64 leave
# the second of 2 ranks a padded batch (180 images in 3 batches), which must not count twice.
ARGS = ("--config", str(ROOT / "recipes" / "configs" / "image_classification.yaml"), "--tracker", "none",
        "--max_steps", "12", "--checkpoint_every", "4", "--log_every", "2", "--techniques.mixup", "{alpha: 0.4}",
        "--techniques.cosine_lr", "{warmup_steps: 2}", "--data.eval_batch_size", "64", *STREAMING)


def rows_of(batches) -> Counter:
    """The multiset of (pixels, label) of the batches' samples."""
    return Counter((pixels.numpy().tobytes(), int(label)) for batch in batches
                   for pixels, label in zip(batch["pixel_values"], batch["label"]))


def as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def test_an_epoch_covers_the_training_split_once_across_ranks(monkeypatch):
    config = ImageDataConfig(num_workers=0, batch_size=64)
    map_style = rows_of(image_data(config).loaders["train"])  # no augmentation: the same tensors either way
    per_rank = []
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        loader = image_data(ImageDataConfig(num_workers=0, batch_size=64, streaming=True, shuffle_buffer=200),
                            seed=0).loaders["train"]
        assert len(loader) == sum(map_style.values()) // 2 // 64  # the same steps on both ranks
        per_rank.append(rows_of(loader))
        assert loader.epoch == 1 and sum(per_rank[-1].values()) == len(loader) * 64
    both = per_rank[0] + per_rank[1]
    assert not both - map_style  # every streamed sample is a training sample, none seen twice
    assert sum((map_style - both).values()) < 2 * 64  # only each rank's last incomplete batch is left out


def test_the_loader_resumes_from_its_state_exactly(monkeypatch):
    make = lambda: image_data(ImageDataConfig(num_workers=0, batch_size=32, streaming=True, shuffle_buffer=100,
                                              augment={"rotation": {"degrees": 15}}), seed=3).loaders["train"]
    whole = list(make())
    interrupted = make()
    for _, _ in zip(range(11), interrupted):  # 11 batches: the position is mid-chunk (100 rows, 32 per batch)
        pass
    saved = interrupted.state_dict()
    resumed = make()
    resumed.load_state_dict(saved)
    rest = list(resumed)
    assert len(rest) == len(whole) - 11
    for expected, got in zip(whole[11:], rest):
        assert all(torch.equal(expected[key], got[key]) for key in expected)


def write_parquet_folder(folder, train_files: int = 2) -> dict[str, datasets.Dataset]:
    splits = make_splits(load_source("digits"), 0.1, 0.2, 0)
    folder.mkdir()
    for index in range(train_files):
        splits["train"].shard(train_files, index, contiguous=True).to_parquet(
            str(folder / f"train-{index:05d}-of-{train_files:05d}.parquet"))
    for split in ("validation", "test"):
        splits[split].to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return splits


def test_a_parquet_folder_streams_each_rank_its_own_files(tmp_path, monkeypatch):
    splits = write_parquet_folder(tmp_path / "digits")
    raw = splits["train"].cast_column("image", datasets.Image(decode=False))
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        data = image_data(ImageDataConfig(name=str(tmp_path / "digits"), num_workers=0, batch_size=32,
                                          streaming=True))
        assert data.class_names == [str(i) for i in range(10)] and len(data.splits["validation"]) == 180
        loader = data.loaders["train"]
        assert len(loader) == (len(splits["train"]) // 2) // 32  # the shorter file's rows, for both ranks
        # this rank reads its own file, whole and in order, and nothing else
        mine = [row["image"]["bytes"] for row in loader.dataset.stream.make()]
        assert mine == [image["bytes"] for image in raw.shard(2, rank, contiguous=True)["image"]]
        assert sum(len(batch["label"]) for batch in loader) == len(loader) * 32


def test_a_parquet_folder_trains_through_the_image_recipe(tmp_path):
    write_parquet_folder(tmp_path / "digits", train_files=3)
    reset_accelerate()
    trainer = load_recipe("image_classification").main([
        "--tracker", "none", "--data.name", str(tmp_path / "digits"), "--data.num_workers", "0",
        "--max_steps", "3", "--output_dir", str(tmp_path / "run"), *STREAMING])
    assert trainer.state.step == 3 and trainer.state.steps_per_epoch == 1257 // 64
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["run"]["steps"] == 3


def test_stdlib_text_streams_through_the_language_model_recipe(tmp_path):
    config = TextDataConfig(streaming=True, context_length=64, batch_size=4, max_eval_blocks=8, shuffle_buffer=16)
    loader = text_data(config).loaders["train"]
    loader.length = 9
    whole = list(loader)
    assert whole[0]["input_ids"].shape == (4, 65) and whole[0]["input_ids"].dtype == torch.int64
    again = text_data(config).loaders["train"]
    again.length = 9
    for _, _ in zip(range(4), again):
        pass
    resumed = text_data(config).loaders["train"]
    resumed.load_state_dict(again.state_dict())
    resumed.length = 9
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(whole[4:], list(resumed), strict=True))

    reset_accelerate()
    trainer = load_recipe("language_model").main([
        "--tracker", "none", "--data.streaming", "true", "--max_steps", "3", "--output_dir", str(tmp_path / "run"),
        "--model.n_layer", "1", "--model.n_embd", "32", "--data.context_length", "64", "--data.max_eval_blocks", "8",
        "--techniques.text_sample", "null", "--techniques.cosine_lr.warmup_steps", "1"])
    assert trainer.state.step == 3 and trainer.state.steps_per_epoch == 3  # the run is one epoch of max_steps


MALLOC_PROBE = """
import ctypes, json, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def in_an_mmap(size):  # is a block of `size` bytes served by an mmap of its own (returned whole when freed)?
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    mapped = libc.mallinfo2().hblkhd - before >= size
    libc.free(block)
    return mapped
libc.free(libc.malloc(16 << 20))  # a stream frees a big block: glibc raises its threshold to 16 MiB
if sys.argv[1] == "loader":
    from framework.data.streaming import StreamingLoader, StreamingSplit
    StreamingLoader(StreamingSplit(None, None, 0, 1), 1, list, 1)
print(json.dumps(in_an_mmap(2 << 20)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_streaming_loader_keeps_large_blocks_in_mmaps_so_memory_stays_flat():
    """Seen without the fix: glibc serves 2 MiB blocks from the heap once a 16 MiB one was freed, and a 1 GB
    stream's resident memory grew 16% from 10% to 100% of it; with it, blocks >= 1 MiB are mmaps (+0.8%)."""
    def probe(mode: str) -> bool:
        done = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], env=launch_environment(), cwd=ROOT,
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert probe("bare") is False and probe("loader") is True


def test_a_stream_of_unknown_length_needs_max_steps(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "language_model.py"), "--tracker", "none", "--data.streaming", "true",
         "--max_steps", "null", "--output_dir", str(tmp_path / "run"), "--data.max_eval_blocks", "8"],
        cwd=ROOT, env=launch_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pass --max_steps" in result.stderr and "Traceback" not in result.stderr


def held_out_loss(run_dir) -> float:
    """The validation loss of the run's EMA weights (what evaluation swaps in), summed over every validation
    sample once, by hand."""
    model = ResNet(ImageModelConfig(in_channels=1, num_classes=10))
    model.load_state_dict(load_file(run_dir / "model_ema.safetensors"))
    model.eval()
    validation = image_data(ImageDataConfig(num_workers=0)).loaders["validation"]
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in validation:
            total += F.cross_entropy(model(batch["pixel_values"]), batch["label"], reduction="sum").item()
            count += len(batch["label"])
    assert count == 180
    return total / count


@pytest.mark.slow
@pytest.mark.parametrize("launch_config, world", [("cpu.yaml", 1), ("multi_cpu.yaml", 2)])
def test_killed_streaming_run_resumes_to_the_same_weights(tmp_path, launch_config, world):
    reference = launch(DUMP, *ARGS, "--output_dir", str(tmp_path / "reference"), launch_config=launch_config)
    assert reference.returncode == 0
    summary = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["run"]["num_processes"] == world
    # 1257 training images: 19 batches of 64 per epoch on one rank, 9 per rank on two (the run crosses an epoch)
    assert summary["run"]["steps"] == 12
    if world == 2:  # the validation loss counts each of the 180 images once, the padded batch's copies not again
        assert summary["metrics"]["val/loss"] == pytest.approx(held_out_loss(tmp_path / "reference"), rel=1e-5)

    killed = launch(DUMP, *ARGS, "--output_dir", str(tmp_path / "run"), "--techniques.kill_at", "{step: 6}",
                    launch_config=launch_config)
    assert killed.returncode != 0
    latest = completed_checkpoints(tmp_path / "run")[-1]
    assert latest.name == "step_00000004"  # mid-epoch, mid-chunk: 4 × 64 rows of 200-row chunks

    resumed = launch(DUMP, *ARGS, "--output_dir", str(tmp_path / "run"), "--resume_from", "latest",
                     launch_config=launch_config)
    assert resumed.returncode == 0 and f"resuming from {latest}" in resumed.stdout
    assert_same_weights(tmp_path / "reference", tmp_path / "run")
