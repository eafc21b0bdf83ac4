"""Data through HF datasets: every source kind, splits, augmentation pipelines, normalisation statistics, tuned
loaders, progressive resizing inside the loader, the data-wait share and the augmentation picture."""

from __future__ import annotations

import json
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from framework.config import TrainerConfig
from framework.data import (
    ImageDataConfig,
    auto_num_workers,
    digits_dataset,
    image_data,
    load_source,
    make_loader,
    make_splits,
    split_dataset,
    stdlib_text_dataset,
)
from framework.data.augment import AUGMENTATIONS, train_pipeline
from framework.data.images import channel_stats, cached_channel_stats
from framework.data.loaders import EpochSampler
from framework.errors import ConfigError
from framework.loop import Trainer
from framework.models.resnet import ResNet, ResNetConfig
from framework.task import ClassificationTask
from framework.technique import Technique
from framework.techniques import ProgressiveResizing, progressive_size

pytestmark = pytest.mark.usefixtures("private_cache")  # tests/conftest.py

CLASSES = ("cat", "dog", "fox")


def write_imagefolder(root, per_class: int = 10, size=(20, 12)) -> None:
    """class-per-folder PNGs, RGB and not square (width 20, height 12): the imagefolder layout."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            pixels[..., label] = 200  # a class-dependent colour
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.fixture
def imagefolder(tmp_path):
    write_imagefolder(tmp_path / "pets")
    return tmp_path / "pets"


# --- sources -------------------------------------------------------------------------------------------------
def test_embedded_digits_are_real_scans():
    digits = load_source("digits")["train"]
    assert len(digits) == 1797 and digits.features["label"].num_classes == 10
    pixels = np.stack([np.asarray(image) for image in digits[:100]["image"]])
    assert pixels.shape == (100, 8, 8) and pixels.max() == 255  # 0-16 scaled to 0-255


def test_imagefolder_loads_with_class_names_and_splits(imagefolder):
    data = image_data(ImageDataConfig(name=str(imagefolder), image_size=16, num_workers=0))
    assert data.class_names == list(CLASSES) and data.channels == 3
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes == {"train": 21, "validation": 3, "test": 6}
    for split in data.splits.values():  # stratified: each class keeps its share
        assert sorted(split["label"]).count(0) == len(split) // 3
    batch = next(iter(data.loaders["train"]))
    assert batch["pixel_values"].shape == (21, 3, 16, 16) or batch["pixel_values"].shape[1:] == (3, 16, 16)


def test_hub_layout_and_save_to_disk_load_through_the_same_calls(tmp_path):
    """A hub id goes through `datasets.load_dataset(name)`, which resolves a local folder in a hub repository's
    layout (data/<split>-*.parquet) exactly as it resolves a downloaded repository: no network needed here."""
    source = digits_dataset().train_test_split(test_size=0.25, seed=0)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    for split, part in source.items():
        part.to_parquet(str(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet"))
    from_hub_layout = load_source(str(tmp_path / "repo"))
    assert set(from_hub_layout) == {"train", "test"} and len(from_hub_layout["test"]) == len(source["test"])

    source.save_to_disk(str(tmp_path / "saved"))
    from_disk = load_source(str(tmp_path / "saved"))
    assert from_disk["train"]["label"] == source["train"]["label"]

    # train + test: validation is carved from train, the source's test split stays untouched
    data = image_data(ImageDataConfig(name=str(tmp_path / "repo"), num_workers=0))
    assert len(data.splits["test"]) == len(source["test"])
    assert len(data.splits["train"]) + len(data.splits["validation"]) == len(source["train"])
    assert data.splits["train"].features["label"].names == [str(i) for i in range(10)]


def test_csv_of_image_paths_and_string_labels(imagefolder):
    rows = ["file,animal"] + [f"{name}/{i}.png,{name}" for name in CLASSES for i in range(10)]
    (imagefolder / "labels.csv").write_text("\n".join(rows) + "\n")
    data = image_data(ImageDataConfig(name=str(imagefolder / "labels.csv"), image_column="file",
                                      label_column="animal", image_size=8, num_workers=0))
    assert data.class_names == list(CLASSES)
    assert next(iter(data.loaders["test"]))["pixel_values"].shape[1:] == (3, 8, 8)


def test_text_sources(tmp_path):
    stdlib = stdlib_text_dataset()
    assert len(stdlib) > 500 and sum(map(len, stdlib["text"])) > 8_000_000
    assert "json/__init__.py" in stdlib["path"] and not any("/test/" in p for p in stdlib["path"])
    (tmp_path / "a.txt").write_text("first document\nline two\n")
    (tmp_path / "b.txt").write_text("second document\n")
    loaded = load_source(str(tmp_path / "*.txt"), sample_by="document")["train"]
    assert sorted(loaded["text"]) == ["first document\nline two\n", "second document\n"]


def test_bad_sources_fail_with_the_name_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="no_such_folder.*could not be loaded.*embedded"):
        load_source(str(tmp_path / "no_such_folder" / "x.parquet"))
    with pytest.raises(ConfigError, match="empty"):
        split_dataset(datasets.Dataset.from_dict({"label": []}), 0.1, 0.2, seed=0)
    with pytest.raises(ConfigError, match="data.label_column 'klass' is not a column"):
        image_data(ImageDataConfig(label_column="klass", num_workers=0))


def test_splits_are_deterministic_and_stratified():
    digits = load_source("digits")
    a = make_splits(digits, 0.1, 0.2, seed=0, stratify_column="label")
    b = make_splits(digits, 0.1, 0.2, seed=0, stratify_column="label")
    c = make_splits(digits, 0.1, 0.2, seed=1, stratify_column="label")
    assert a["test"]["label"] == b["test"]["label"] and a["test"]["label"] != c["test"]["label"]
    assert {k: len(v) for k, v in a.items()} == {"train": 1257, "validation": 180, "test": 360}
    counts = np.bincount(a["test"]["label"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~10% of each class's ~180 scans


# --- statistics ----------------------------------------------------------------------------------------------
def test_channel_stats_match_numpy_and_are_cached_for_file_data(imagefolder, tmp_path):
    train = load_source(str(imagefolder))["train"]
    pixels = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in train["image"]])
    mean, std = channel_stats(train, "image", "RGB")
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 1, 2)), rtol=1e-7)

    assert cached_channel_stats(train, "image", "RGB") == (mean, std)
    [cache_file] = (tmp_path / "cache" / "channel_stats").iterdir()
    cache_file.write_text(json.dumps([[0.5] * 3, [0.25] * 3]))  # a second call reads the file
    assert cached_channel_stats(train, "image", "RGB") == ([0.5] * 3, [0.25] * 3)


def test_a_corrupt_image_is_named_before_training(imagefolder):
    (imagefolder / "dog" / "3.png").write_bytes(b"not a png at all")
    with pytest.raises(ConfigError, match=r"1 image\(s\) of the \w+ split cannot be read: .*dog/3.png.*corrupt"):
        image_data(ImageDataConfig(name=str(imagefolder), num_workers=0))


# --- augmentation ---------------------------------------------------------------------------------------------
ALL_AUGMENTATIONS = {
    "random_resized_crop": {"scale": [0.5, 1.0]}, "horizontal_flip": {}, "rotation": {"degrees": 10},
    "color_jitter": {"brightness": 0.3, "contrast": 0.3}, "random_grayscale": {"p": 0.5},
    "auto_augment": {"policy": "cifar10"}, "rand_augment": {"num_ops": 2}, "trivial_augment": None,
    "random_erasing": {"p": 0.5},
}


@pytest.mark.parametrize("source", ["digits", "imagefolder"])
def test_every_augmentation_runs_through_datasets_with_two_workers(source, imagefolder):
    assert set(ALL_AUGMENTATIONS) == set(AUGMENTATIONS)
    name = "digits" if source == "digits" else str(imagefolder)
    data = image_data(ImageDataConfig(name=name, image_size=16, batch_size=8, num_workers=2,
                                      augment=ALL_AUGMENTATIONS))
    channels = 1 if source == "digits" else 3
    batch = next(iter(data.loaders["train"]))
    assert batch["pixel_values"].shape == (8, channels, 16, 16) and torch.isfinite(batch["pixel_values"]).all()
    # and each augmentation alone, in the same loader set-up
    for augmentation, args in ALL_AUGMENTATIONS.items():
        pipeline = train_pipeline(16, {augmentation: args}, data.mean, data.std)
        split = data.splits["train"].with_transform(
            lambda rows: {"x": [pipeline(im.convert(data.mode)) for im in rows["image"]]})
        x = next(iter(DataLoader(split, batch_size=4, num_workers=2)))["x"]
        assert x.shape == (4, channels, 16, 16) and torch.isfinite(x).all(), augmentation


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    data = image_data(ImageDataConfig(batch_size=16, num_workers=0, augment={"rotation": {"degrees": 30}},
                                      image_size=16))
    evaluation = [next(iter(data.loaders["test"]))["pixel_values"] for _ in range(2)]
    assert torch.equal(*evaluation)  # the evaluation pipeline is deterministic
    train = data.loaders["train"].dataset
    state = torch.get_rng_state()
    first, again = train[0]["pixel_values"], train[0]["pixel_values"]
    assert torch.equal(first, again)  # the same sample in the same epoch: the same rotation, however often built
    assert torch.equal(torch.get_rng_state(), state)  # and building it moved no random stream
    train.image_transform.set_epoch(1)
    assert not torch.equal(first, train[0]["pixel_values"])  # a fresh random rotation each epoch
    reseeded = image_data(ImageDataConfig(batch_size=16, num_workers=0, augment={"rotation": {"degrees": 30}},
                                          image_size=16), seed=1).loaders["train"].dataset
    assert not torch.equal(first, reseeded[0]["pixel_values"])  # and for each seed


def test_augmented_batches_do_not_depend_on_workers_or_on_the_random_stream():
    """What a resumed run relies on: epoch after epoch (persistent workers included), the training batches are the
    same built in-process or by 2 workers, whatever the process's random stream holds."""
    augment = {"random_resized_crop": {}, "rotation": {"degrees": 20}, "random_erasing": {"p": 0.5}}

    def epochs(workers):
        loader = image_data(ImageDataConfig(batch_size=128, num_workers=workers, augment=augment, image_size=16),
                            seed=3).loaders["train"]
        batches = []
        for epoch in (0, 1):
            torch.manual_seed(100 * workers + epoch)  # a different stream in each case
            loader.sampler.set_epoch(epoch)
            batches.append([batch["pixel_values"] for batch in loader])
        return batches

    in_process, two_workers = epochs(0), epochs(2)
    for epoch in (0, 1):
        assert len(in_process[epoch]) == len(two_workers[epoch]) == 10
        assert all(torch.equal(a, b) for a, b in zip(in_process[epoch], two_workers[epoch])), epoch


def test_bad_augmentation_config_is_refused_before_loading():
    with pytest.raises(ConfigError, match="data.augment.blur: unknown augmentation. Available: random_resized_crop"):
        ImageDataConfig(augment={"blur": {}})
    with pytest.raises(ConfigError, match="data.augment.rotation: .*degree"):
        ImageDataConfig(augment={"rotation": {"degree": 10}})
    with pytest.raises(ConfigError, match="policy 'mnist'"):
        ImageDataConfig(augment={"auto_augment": {"policy": "mnist"}})


def test_augmentation_grid_picture(tmp_path):
    data = image_data(ImageDataConfig(num_workers=0, augment={"random_resized_crop": {}, "random_erasing": {}}))
    state = torch.get_rng_state()
    path = data.draw_augmentations(tmp_path / "grid.png", samples=4, versions=3)
    assert torch.equal(torch.get_rng_state(), state)  # drawing it does not move the training run's random stream
    with Image.open(path) as picture:
        assert picture.width > 300 and picture.height > 300


# --- loaders --------------------------------------------------------------------------------------------------
def test_tuned_loader_settings(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert auto_num_workers() == 7  # 16 cores / 2 processes, one core kept for the process itself
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert auto_num_workers() == 8  # capped
    loader = make_loader(list(range(10)), batch_size=2, shuffle=True, num_workers=2, prefetch_factor=4, seed=0)
    assert loader.persistent_workers and loader.prefetch_factor == 4
    assert loader.pin_memory == torch.cuda.is_available()
    orders = [torch.cat(list(make_loader(list(range(10)), 5, shuffle=True, num_workers=0, seed=0))) for _ in "ab"]
    assert torch.equal(*orders) and not torch.equal(orders[0], torch.arange(10))


def test_epoch_sampler_orders_as_accelerates_seedable_sampler_and_announces_each_epoch():
    from accelerate import Accelerator
    from accelerate.data_loader import SeedableRandomSampler
    from accelerate.utils import DataLoaderConfiguration

    for epoch in (0, 3):  # the order the training loader had with a RandomSampler, which accelerate replaced
        seedable = SeedableRandomSampler(range(50), generator=torch.Generator(), data_seed=7)
        seedable.set_epoch(epoch)
        sampler = EpochSampler(50, seed=7)
        sampler.set_epoch(epoch)
        assert list(sampler) == list(seedable)

    announced = []
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    loader = accelerator.prepare(make_loader(list(range(40)), batch_size=4, shuffle=True, num_workers=0, seed=0,
                                             on_epoch=announced.append))
    assert isinstance(loader.batch_sampler.sampler, EpochSampler)  # kept by accelerate, so set_epoch reaches it
    loader.set_epoch(5)
    full = [batch.tolist() for batch in loader]
    loader.set_epoch(5)
    rest = [batch.tolist() for batch in accelerator.skip_first_batches(loader, 3)]  # a mid-epoch resume
    assert rest == full[3:] and announced == [5, 5]


class SlowData(torch.utils.data.Dataset):
    def __init__(self, delay: float):
        self.delay, self.items = delay, [{"pixel_values": torch.randn(4), "label": torch.tensor(i % 3)}
                                         for i in range(16)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        time.sleep(self.delay)
        return self.items[index]


class SlowStep(torch.nn.Linear):
    """A model whose forward sleeps `delay` seconds: a step that takes as long as a real model's would."""

    def __init__(self, delay: float):
        super().__init__(4, 3)
        self.delay = delay

    def forward(self, x):
        time.sleep(self.delay)
        return super().forward(x)


@pytest.mark.parametrize("data_delay, step_delay, low, high", [(0.0, 0.05, 0.0, 0.3), (0.05, 0.0, 0.6, 1.0)])
def test_data_wait_share_is_logged(tmp_path, data_delay, step_delay, low, high):
    """Data that sleeps 50 ms per sample (200 ms per batch) against a step of well under a millisecond: the loop spends
    nearly all its time waiting for data, and perf/data_wait says so; the other way round, a 50 ms step against data
    built in well under a millisecond, it spends nearly none. Sleeps set the times; a loaded machine slows the step's
    work and the log line's, which is why the data sleeps long enough to dwarf them even then (at 80 ms per batch,
    with other jobs on both cores, the share fell to 0.55)."""
    torch.manual_seed(0)
    model = SlowStep(step_delay)
    config = TrainerConfig(output_dir=str(tmp_path), epochs=1, tracker="none", log_every=2)
    Trainer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), ClassificationTask(num_classes=3),
            DataLoader(SlowData(data_delay), batch_size=4), techniques=[]).fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    shares = [line["perf/data_wait"] for line in lines if "perf/data_wait" in line]
    assert len(shares) == 2 and all(low <= share <= high for share in shares), shares
    assert all(0.0 <= line["train/accuracy"] <= 1.0 for line in lines if "train/accuracy" in line)


# --- progressive resizing --------------------------------------------------------------------------------------
def test_progressive_size_schedule_by_hand():
    # 10 epochs, ramp over the first 5 from 16 to 32 (multiples of 4): 16, 19.2->20, 22.4->24, 25.6->24, 28.8->28
    sizes = [progressive_size(e, 10, 32, start_fraction=0.5, ramp_fraction=0.5, multiple=4) for e in range(10)]
    assert sizes == [16, 20, 24, 24, 28, 32, 32, 32, 32, 32]
    assert progressive_size(0, 10, 32, ramp_fraction=0.0) == 32


class RecordShapes(Technique):
    """Records (epoch, H, W) of each training batch as the loop sees it, after the loader."""

    def __init__(self):
        self.shapes: list[tuple[int, int, int]] = []

    def on_batch(self, state, batch):
        self.shapes.append((state.epoch, *batch["pixel_values"].shape[-2:]))
        return batch


def test_progressive_resizing_sets_sizes_inside_the_loader_with_persistent_workers(tmp_path):
    data = image_data(ImageDataConfig(image_size=16, batch_size=256, num_workers=2))
    assert data.loaders["train"].persistent_workers
    model = ResNet(ResNetConfig(widths=(4,), num_classes=10))
    recorder = RecordShapes()
    evaluated_sizes = []

    class RecordEval(Technique):
        def eval_start(self, state):
            evaluated_sizes.append(next(iter(data.loaders["validation"]))["pixel_values"].shape[-1])

    config = TrainerConfig(output_dir=str(tmp_path), epochs=4, tracker="none", log_every=1)
    Trainer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), ClassificationTask(10),
            data.loaders["train"], data.loaders["validation"],
            techniques=[ProgressiveResizing(start_fraction=0.5, ramp_fraction=0.75), recorder, RecordEval()]).fit()
    # 4 epochs, ramp over round(0.75 * 4) = 3: sizes 8, 10.67->12, 13.3->12, then 16; 5 batches of ≤256 per epoch
    expected = {0: 8, 1: 12, 2: 12, 3: 16}
    assert len(recorder.shapes) == 4 * 5
    assert all(h == w == expected[epoch] for epoch, h, w in recorder.shapes), recorder.shapes
    assert evaluated_sizes and set(evaluated_sizes) == {16}
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["progressive_resizing/image_size"] for line in logged
            if "progressive_resizing/image_size" in line] == [8, 12, 12, 16]  # once per epoch


def test_progressive_resizing_needs_a_resizable_loader(tmp_path):
    model = torch.nn.Linear(4, 3)
    config = TrainerConfig(output_dir=str(tmp_path), epochs=1, tracker="none")
    trainer = Trainer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), ClassificationTask(3),
                      DataLoader(SlowData(0.0), batch_size=4), techniques=[ProgressiveResizing()])
    with pytest.raises(ConfigError, match="progressive_resizing needs a training loader built by"):
        trainer.fit()


# --- pictures -------------------------------------------------------------------------------------------------
def test_pictures_are_written_and_logged_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = image_data(ImageDataConfig(num_workers=0, batch_size=256, augment={"rotation": {}}))
    model = ResNet(ResNetConfig(widths=(4,)))
    config = TrainerConfig(output_dir=str(tmp_path), max_steps=1, tracker="tensorboard")
    Trainer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), ClassificationTask(10),
            data.loaders["train"], techniques=[], pictures={"augmentations": data.draw_augmentations}).fit()
    assert (tmp_path / "augmentations.png").stat().st_size > 10_000
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 0, "picture/augmentations": "augmentations.png"} in logged
    accumulator = EventAccumulator(str(tmp_path / "framework"), size_guidance={"images": 0})  # project folder
    accumulator.Reload()
    [image] = accumulator.Images("augmentations")
    assert image.width > 300 and image.height > 300


def test_a_finished_run_leaves_no_loader_worker_behind(tmp_path):
    """The loaders' persistent workers end when `fit` returns. Left to the garbage collector, an iterator caught in a
    reference cycle had its queues finalized first, so its workers never got the stop sentinel: torch waited 5 s per
    worker and then killed them (10 s per loader, 30 s at the end of every recipe run with two workers)."""
    import gc

    import psutil

    from framework.data import make_loader
    from helpers import tiny_classification_data

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = tiny_classification_data(32)
    config = TrainerConfig(output_dir=str(tmp_path), epochs=1, max_steps=3, tracker="none", log_every=1)
    loaders = [make_loader(data, batch_size=4, shuffle=shuffle, num_workers=2, seed=0) for shuffle in (True, False)]
    trainer = Trainer(config, model, torch.optim.SGD(model.parameters(), lr=0.1), ClassificationTask(num_classes=3),
                      loaders[0], loaders[1], techniques=[])
    trainer.itself = trainer  # a reference cycle, as a real run's objects have
    gc.collect()  # earlier tests' garbage (a loader iterated by hand) is not this run's to time
    before = set(psutil.Process().children())  # another test's W&B service may live on in this process
    trainer.fit()
    assert set(psutil.Process().children()) - before == set()
    del trainer, loaders
    started = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - started < 2


def test_training_batches_carry_their_sample_indices():
    """Each batch names its samples (`index`), in the sampler's order, so a report (nan_guard's loss spikes) can
    point at the data; for images and for text blocks (the embedded defaults)."""
    from framework.data import TextDataConfig, text_data

    loaders = {"images": image_data(ImageDataConfig(batch_size=16, num_workers=0, image_size=16), seed=2).loaders,
               "text": text_data(TextDataConfig(batch_size=16, num_workers=0), seed=2).loaders}
    for kind, splits in loaders.items():
        loader = splits["train"]
        loader.sampler.set_epoch(1)
        order = list(loader.sampler)
        loader.sampler.set_epoch(1)  # a full pass moved it on to the next epoch
        batches = [batch for _, batch in zip(range(5), loader)]
        assert torch.cat([batch["index"] for batch in batches]).tolist() == order[:5 * 16], kind
