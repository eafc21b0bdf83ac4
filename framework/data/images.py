"""Image data: any source -> train/validation/test splits -> torchvision v2 pipelines -> tuned DataLoaders."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from framework.data.augment import eval_pipeline, make_augmentation, train_pipeline
from framework.data.loaders import make_loader
from framework.data.sources import (check_sizes, find_column, held_out_splits, load_source, make_splits,
                                    per_class_subset, stream_source, streams_from_files)
from framework.data.streaming import (RankStream, StreamingLoader, StreamingSplit, in_memory_stream, rank_and_world,
                                      rank_stream)
from framework.errors import ConfigError


@dataclass
class ImageDataConfig:
    """Image data: source, splits, image size, augmentation and loaders."""

    name: str = "digits"
    """Source: `digits` (embedded: scikit-learn's handwritten digits), a hub id (`cifar10`), a local folder (one
    sub-folder per class, or a `save_to_disk` folder) or data files (`train/*.parquet`, `labels.csv`)."""
    subset: str | None = None
    """The hub data set's configuration name, if it has several."""
    image_column: str | None = None
    """Default: the first column of type Image (a column of file paths is decoded as images)."""
    label_column: str | None = None
    """Default: the first ClassLabel column, else `label` / `labels` (strings or integers become a ClassLabel)."""
    image_mode: str | None = None
    """PIL mode every image is converted to: `L` (grayscale) or `RGB`. Default: from the first training image."""
    image_size: int = 32
    """Training and evaluation images are image_size × image_size."""
    augment: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    """Training augmentations in order, name -> arguments (see framework/data/augment.py), e.g.
    {random_resized_crop: {scale: [0.8, 1.0]}, rotation: {degrees: 10}, random_erasing: {p: 0.25}}."""
    eval_crop_fraction: float = 1.0
    """Evaluation resizes to image_size / eval_crop_fraction, then center-crops image_size (ImageNet: 0.875)."""
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    """Used only for the splits the source does not have."""
    split_seed: int = 0
    """Seed of the stratified split (fixed, independent of the training seed)."""
    train_per_class: int | None = None
    """Train on only this many images of each class: a stratified subsample of the training split drawn with
    split_seed (a low-data regime; validation and test stay whole). None: the whole training split."""
    batch_size: int = 64
    """Per-process batch size (the global batch is batch_size × processes × gradient_accumulation_steps)."""
    eval_batch_size: int = 256
    num_workers: int | None = None
    """DataLoader worker processes per training process. Default: from the machine's cores (0: in-process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    skip_unreadable: bool = False
    """Train without the images that cannot be read (counted and named in a warning) instead of refusing to start."""
    streaming: bool = False
    """Read the training split as a stream (`datasets.IterableDataset`): each process reads only its own part,
    shuffled in chunks of shuffle_buffer rows, and a resumed run continues exactly where it stopped (see
    framework/data/streaming.py). Local files and folders are read by `load_dataset(..., streaming=True)` and need
    their own validation and test splits (files named validation-*, test-*), which are read into memory."""
    shuffle_buffer: int = 1000
    """Streaming: rows shuffled together (seeded by the run's seed, the epoch and the chunk)."""

    def __post_init__(self):
        check_sizes("data", self.val_fraction, self.test_fraction,
                    {"image_size": self.image_size, "batch_size": self.batch_size,
                     "eval_batch_size": self.eval_batch_size, "prefetch_factor": self.prefetch_factor,
                     "train_per_class": self.train_per_class, "shuffle_buffer": self.shuffle_buffer},
                    {"num_workers": self.num_workers})
        if not 0 < self.eval_crop_fraction <= 1:
            raise ConfigError(f"data.eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}.")
        if self.image_mode not in (None, "L", "RGB"):
            raise ConfigError(f"data.image_mode must be L or RGB, got {self.image_mode!r}.")
        for name, args in self.augment.items():  # unknown names and bad arguments fail here, before any loading
            make_augmentation(name, args, self.image_size)


class ImageBatchTransform:
    """PIL images -> tensors through the pipeline for the current size; random draws from (seed, epoch, index).

    The size and the epoch are tensors in shared memory, so the training process changes them (progressive resizing;
    the loader's `EpochSampler` as each epoch starts) and the DataLoader's worker processes, persistent ones
    included, build their next batches with the new values.

    A random pipeline (training) draws each sample's augmentation from the global torch generator seeded with a hash
    of (seed, epoch, sample index), and puts the generator's state back after the batch. So an augmentation does not
    depend on which process or worker builds it, nor on what that process drew before, and building a batch moves
    no random stream: a batch accelerate fetches one ahead of the step a checkpoint is saved at, and builds again
    after resuming, is built the same both times; with `num_workers: 0` the training process's stream (Mixup,
    stochastic depth, saved with the checkpoint) is left as it was.
    """

    def __init__(self, make_pipeline: Callable[[int], Callable], image_size: int, image_column: str,
                 label_column: str, mode: str, seed: int | None = None):
        self.size = torch.tensor(image_size).share_memory_()
        self.epoch = torch.tensor(0, dtype=torch.int64).share_memory_()
        self.full_size = image_size
        self.make_pipeline = make_pipeline
        self.image_column, self.label_column, self.mode = image_column, label_column, mode
        self.seed = seed
        """None: a deterministic pipeline (evaluation), applied without seeding."""
        self._pipelines: dict[int, Callable] = {}

    def set_size(self, size: int) -> None:
        self.size.fill_(size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        size = int(self.size)
        if size not in self._pipelines:
            self._pipelines[size] = self.make_pipeline(size)
        pipeline = self._pipelines[size]
        images = [image.convert(self.mode) for image in batch[self.image_column]]
        if self.seed is None:
            pixels = [pipeline(image) for image in images]
        else:
            epoch, generator = int(self.epoch), torch.default_generator  # torchvision v2 draws from the global one
            with torch.random.fork_rng(devices=[]):  # CPU stream saved here, restored after the batch
                pixels = []
                for image, index in zip(images, indices):
                    generator.manual_seed(sample_seed(self.seed, epoch, index))
                    pixels.append(pipeline(image))
        # The sample indices travel with the batch, so a report (nan_guard's loss spikes) can name the samples.
        return {"pixel_values": pixels, "label": batch[self.label_column], "index": list(indices)}


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation: a hash, so nearby (seed, epoch, index) give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TransformedSplit(torch.utils.data.Dataset):
    """A split (a `datasets.Dataset`) seen through an `ImageBatchTransform`, which is given each sample's index.

    (`datasets`' own `with_transform` hands the transform the rows without their indices.) A DataLoader fetches a
    whole batch with one `__getitems__` call, one Arrow read, as it would from the split itself.
    """

    def __init__(self, split: datasets.Dataset, transform: ImageBatchTransform):
        self.split = split.select_columns([transform.image_column, transform.label_column])
        self.image_transform = transform  # found by progressive resizing through the (prepared) loader

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        columns = self.image_transform(self.split[list(indices)], list(indices))
        return [dict(zip(columns, values)) for values in zip(*columns.values())]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]


def size_control(loader: DataLoader) -> ImageBatchTransform | None:
    """The training transform whose image size progressive resizing sets (None for data not built here)."""
    return getattr(loader.dataset, "image_transform", None)


@dataclass
class ImageData:
    """What a recipe needs from its image data: loaders, classes, channels, and the augmentation picture."""

    config: ImageDataConfig
    splits: datasets.DatasetDict
    loaders: dict[str, DataLoader]
    class_names: list[str]
    mode: str
    mean: list[float]
    std: list[float]
    skipped_images: dict[str, int] = field(default_factory=dict)
    """Unreadable images left out of each split (`data.skip_unreadable`)."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def preprocessor(self) -> dict[str, Any]:
        """Class names and how evaluation reads an image (a run's preprocessor.json; see `preprocess_images`)."""
        return {"class_names": self.class_names, "image_mode": self.mode, "image_size": self.config.image_size,
                "eval_crop_fraction": self.config.eval_crop_fraction, "mean": self.mean, "std": self.std}

    def draw_augmentations(self, path: str | Path, samples: int = 8, versions: int = 6) -> Path:
        """A grid: each row one training image, at evaluation (left) then as `versions` augmented draws."""
        from framework.plots import plot_image_grid

        config, column = self.config, self.loaders["train"].dataset.image_transform.image_column
        original = eval_pipeline(config.image_size, self.mean, self.std, config.eval_crop_fraction, normalize=False)
        augmented = train_pipeline(config.image_size, config.augment, self.mean, self.std, normalize=False)
        shown = self.splits["train"] if len(self.splits["train"]) else self.splits["validation"]  # streamed: none kept
        images = [image.convert(self.mode) for image in shown[:samples][column]]
        with torch.random.fork_rng():  # the picture must not change the training run's random stream
            torch.manual_seed(0)
            rows = [[original(image)] + [augmented(image) for _ in range(versions)] for image in images]
        return plot_image_grid(rows, ["evaluation"] + [f"augmented {i + 1}" for i in range(versions)], path)


def preprocess_images(preprocessor: dict[str, Any], images: list[Any]) -> torch.Tensor:
    """PIL images -> the (N, C, H, W) batch a run's model saw at evaluation (mode, resize, crop, normalisation)."""
    pipeline = eval_pipeline(preprocessor["image_size"], preprocessor["mean"], preprocessor["std"],
                             preprocessor["eval_crop_fraction"])
    return torch.stack([pipeline(image.convert(preprocessor["image_mode"])) for image in images])


def image_data(config: ImageDataConfig, seed: int = 0) -> ImageData:
    """Load `config.name`, split it, and build the DataLoaders yielding {"pixel_values": (B, C, H, W) float,
    "label": (B,) long}. The training loader shuffles with `seed`; each training sample's augmentation is drawn from
    (`seed`, epoch, sample index), so a resumed run sees the same images; its image size can follow a schedule."""
    if config.streaming and streams_from_files(config.name):
        return _streamed_image_data(config, seed)
    loaded = load_source(config.name, config.subset)
    sample = loaded["train"]
    image_column = find_column(sample, config.image_column, datasets.Image, ("image", "img"), "image",
                               "data.image_column")
    label_column = find_column(sample, config.label_column, datasets.ClassLabel, ("label", "labels"), "label",
                               "data.label_column")
    loaded = _decode_columns(loaded, image_column, label_column, config.name)
    splits = make_splits(loaded, config.val_fraction, config.test_fraction, config.split_seed, label_column)
    skipped = {}
    for split, dataset in splits.items():
        unreadable = cached(dataset, "unreadable_images", image_column,
                            lambda: unreadable_images(dataset, image_column, split))
        if not unreadable:
            continue
        names = "; ".join(description for _, description in unreadable[:5])
        more = f" (and {len(unreadable) - 5} more)" if len(unreadable) > 5 else ""
        if not config.skip_unreadable:
            raise ConfigError(f"{len(unreadable)} image(s) of the {split} split cannot be read: {names}{more}. Remove "
                              "or replace the corrupt files, or pass --data.skip_unreadable true to train without them.")
        bad = {index for index, _ in unreadable}
        splits[split] = dataset.select([i for i in range(len(dataset)) if i not in bad])
        skipped[split] = len(unreadable)
        warnings.warn(f"data.skip_unreadable: skipped {len(unreadable)} unreadable image(s) of the {split} split "
                      f"({len(splits[split])} left): {names}{more}", stacklevel=2)
        if len(splits[split]) == 0:
            raise ConfigError(f"every image of the {split} split is unreadable ({names}{more}): check data.name.")
    if config.train_per_class is not None:  # after the unreadable images are gone, so every class gets exactly N
        splits["train"] = per_class_subset(splits["train"], config.train_per_class, config.split_seed, label_column)
    mode = config.image_mode or _mode_of(splits["train"][0][image_column])
    mean, std = cached_channel_stats(splits["train"], image_column, mode)

    loaders = {}
    for split, dataset in splits.items():
        training = split == "train"
        make_pipeline = (functools.partial(train_pipeline, augment=config.augment, mean=mean, std=std) if training
                         else functools.partial(eval_pipeline, mean=mean, std=std,
                                                crop_fraction=config.eval_crop_fraction))
        transform = ImageBatchTransform(make_pipeline, config.image_size, image_column, label_column, mode,
                                        seed=seed if training else None)
        loaders[split] = make_loader(TransformedSplit(dataset, transform),
                                     config.batch_size if training else config.eval_batch_size,
                                     shuffle=training, num_workers=config.num_workers,
                                     prefetch_factor=config.prefetch_factor, seed=seed if training else None,
                                     on_epoch=transform.set_epoch if training else None)
    if config.streaming:  # the same split and transform, read as a stream
        rank, world = rank_and_world()
        train = splits["train"].select_columns([image_column, label_column])
        train = train.cast_column(image_column, datasets.Image(decode=False))  # decoded batch by batch
        loaders["train"] = streaming_image_loader(in_memory_stream(train, rank, world),
                                                  loaders["train"].dataset.image_transform, config, seed)
    names = splits["train"].features[label_column].names
    return ImageData(config, splits, loaders, names, mode, mean, std, skipped)


def streaming_image_loader(stream: RankStream, transform: ImageBatchTransform, config: ImageDataConfig,
                           seed: int) -> StreamingLoader:
    """Training batches of `stream` through the training `transform`, as the map-style loader gives them; each
    sample's augmentation is drawn from (seed, epoch, its position in this rank's stream × processes + rank)."""
    rank, world = rank_and_world()
    image_column, label_column = transform.image_column, transform.label_column
    decoder = datasets.Image()

    def prepare(rows: list[dict], first: int) -> list[tuple[Any, Any, int]]:
        return [(row[image_column], row[label_column], (first + i) * world + rank) for i, row in enumerate(rows)]

    def collate(items: list[tuple[Any, Any, int]]) -> dict[str, torch.Tensor]:
        images = [decoder.decode_example(image) if isinstance(image, dict) else image for image, _, _ in items]
        columns = transform({image_column: images, label_column: [label for _, label, _ in items]},
                            [index for _, _, index in items])
        return torch.utils.data.default_collate([dict(zip(columns, values)) for values in zip(*columns.values())])

    length = None if stream.rows is None else stream.rows // config.batch_size
    if length == 0:
        raise ConfigError(f"data.streaming: each of the {world} process(es) gets {stream.rows} training images, "
                          f"fewer than data.batch_size {config.batch_size}: lower it or add data.")
    split = StreamingSplit(stream, prepare, seed, config.shuffle_buffer, image_transform=transform)
    return StreamingLoader(split, config.batch_size, collate, length, on_epoch=transform.set_epoch)


def _streamed_image_data(config: ImageDataConfig, seed: int) -> ImageData:
    """`image_data` for local files read as streams: the training split streamed, the held-out splits in memory;
    channel statistics from the validation split (the training split is never read whole)."""
    streams, shard_rows = stream_source(config.name, config.subset)
    train = streams["train"]
    if train.features is None:
        raise ConfigError(f"data.streaming: the columns of {config.name!r} are not known before reading it; "
                          "store the data as parquet (its schema records them).")
    image_column = find_column(train, config.image_column, datasets.Image, ("image", "img"), "image",
                               "data.image_column")
    label_column = find_column(train, config.label_column, datasets.ClassLabel, ("label", "labels"), "label",
                               "data.label_column")
    if not isinstance(train.features[label_column], datasets.ClassLabel):
        raise ConfigError(f"data.streaming: the label column {label_column!r} is not a ClassLabel, so the classes "
                          "are unknown before the whole stream is read; save the data with a ClassLabel feature.")
    held_out = held_out_splits(streams, config.name)
    mode = config.image_mode or _mode_of(held_out["validation"][0][image_column])
    mean, std = channel_stats(held_out["validation"], image_column, mode)
    loaders = {}
    for split, dataset in held_out.items():
        transform = ImageBatchTransform(functools.partial(eval_pipeline, mean=mean, std=std,
                                                          crop_fraction=config.eval_crop_fraction),
                                        config.image_size, image_column, label_column, mode)
        loaders[split] = make_loader(TransformedSplit(dataset, transform), config.eval_batch_size, shuffle=False,
                                     num_workers=config.num_workers, prefetch_factor=config.prefetch_factor)
    rank, world = rank_and_world()
    train = train.select_columns([image_column, label_column]).cast_column(image_column,
                                                                          datasets.Image(decode=False))
    transform = ImageBatchTransform(functools.partial(train_pipeline, augment=config.augment, mean=mean, std=std),
                                    config.image_size, image_column, label_column, mode, seed=seed)
    loaders["train"] = streaming_image_loader(rank_stream(train, rank, world, shard_rows["train"]), transform,
                                              config, seed)
    splits = datasets.DatasetDict({"train": held_out["validation"].select([]), **held_out})  # no rows in memory
    names = train.features[label_column].names
    return ImageData(config, splits, loaders, names, mode, mean, std)


def _decode_columns(loaded: datasets.DatasetDict, image_column: str, label_column: str,
                    name: str) -> datasets.DatasetDict:
    """Image paths -> Image feature; string or integer labels -> one ClassLabel shared by every split."""
    features = loaded["train"].features
    if not isinstance(features[image_column], datasets.Image):
        base = Path(name).parent if Path(name).suffix else Path(".")  # paths in a CSV are relative to the CSV
        loaded = loaded.map(lambda rows: {image_column: [str(base / p) for p in rows[image_column]]}, batched=True)
        loaded = loaded.cast_column(image_column, datasets.Image())
    if not isinstance(features[label_column], datasets.ClassLabel):
        values = sorted({v for split in loaded.values() for v in split.unique(label_column)})
        if all(isinstance(v, int) for v in values):
            if values[0] < 0:
                raise ConfigError(f"data.label_column {label_column!r} has negative labels ({values[0]}).")
            label_feature = datasets.ClassLabel(names=[str(i) for i in range(values[-1] + 1)])
        else:
            label_feature = datasets.ClassLabel(names=[str(v) for v in values])
            loaded = loaded.map(lambda rows: {label_column: [str(v) for v in rows[label_column]]}, batched=True)
        loaded = loaded.cast_column(label_column, label_feature)
    return loaded


def _mode_of(image) -> str:
    return "L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"


def channel_stats(dataset: datasets.Dataset, image_column: str, mode: str,
                  max_images: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of pixel values in [0, 1], over up to `max_images` images spread
    evenly through the data set."""
    channels = 1 if mode == "L" else 3
    total, total_sq, count = np.zeros(channels), np.zeros(channels), 0
    indices = np.linspace(0, len(dataset) - 1, min(len(dataset), max_images)).round().astype(int)
    for start in range(0, len(indices), 256):
        for image in dataset.select(indices[start:start + 256])[image_column]:
            pixels = np.asarray(image.convert(mode), dtype=np.float64).reshape(-1, channels) / 255.0
            total += pixels.sum(axis=0)
            total_sq += (pixels ** 2).sum(axis=0)
            count += pixels.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
    return mean.tolist(), std.tolist()


def unreadable_images(dataset: datasets.Dataset, image_column: str, split: str) -> list[tuple[int, str]]:
    """Open every image's header (cheap: no pixels are decoded) so a corrupt, missing or non-image file is named
    before training starts, not deep inside a DataLoader worker. Returns (index, "file (reason)") of each bad one."""
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    unreadable = []
    for start in range(0, len(raw), 1000):
        for offset, item in enumerate(raw[start:start + 1000][image_column]):
            index = start + offset
            try:
                Image.open(io.BytesIO(item["bytes"]) if item["bytes"] else item["path"]).close()
            except (OSError, ValueError) as error:
                unreadable.append((index, f"{item['path'] or f'{split} sample {index}'} ({error})"))
    return unreadable


def cache_dir() -> Path:
    return Path(os.environ.get("FRAMEWORK_CACHE", Path.home() / ".cache" / "framework"))


def cached(dataset: datasets.Dataset, kind: str, key: str, compute: Callable[[], Any]) -> Any:
    """`compute()`, cached in a JSON file keyed by the data set's fingerprint, for data read from files (local
    folders, data files, the hub cache, the embedded digits): computed once. In-memory data built in the run has a
    random fingerprint: computed each time."""
    if not dataset.cache_files:
        return compute()
    digest = hashlib.sha256(f"{dataset._fingerprint}-{key}".encode()).hexdigest()[:24]
    path = cache_dir() / kind / f"{digest}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")  # several ranks may write it at once: rename is atomic
    temporary.write_text(json.dumps(value))
    temporary.replace(path)
    return value


def cached_channel_stats(dataset: datasets.Dataset, image_column: str, mode: str) -> tuple[list[float], list[float]]:
    mean, std = cached(dataset, "channel_stats", f"{image_column}-{mode}",
                       lambda: channel_stats(dataset, image_column, mode))
    return list(mean), list(std)
