"""Image data: source -> train/validation/test splits -> torchvision v2 transforms -> DataLoaders."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from framework.data.embedded import digits_dataset
from framework.errors import ConfigError

EMBEDDED = {"digits": digits_dataset}


@dataclass
class ImageDataConfig:
    name: str = "digits"
    """Data source: `digits` (embedded, scikit-learn's handwritten digits)."""
    image_size: int = 32
    """Images are resized to image_size × image_size."""
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    """Seed of the stratified train/validation/test split (fixed, independent of the training seed)."""
    batch_size: int = 64
    """Per-process batch size (the global batch is batch_size × processes × gradient_accumulation_steps)."""
    eval_batch_size: int = 256
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process, best for small in-memory data)."""


def load_image_dataset(name: str) -> datasets.Dataset:
    if name not in EMBEDDED:
        raise ConfigError(f"data.name: unknown data set {name!r}. Available: {', '.join(EMBEDDED)}.")
    return EMBEDDED[name]()


def split_dataset(dataset: datasets.Dataset, val_fraction: float, test_fraction: float, seed: int,
                  label_column: str = "label") -> datasets.DatasetDict:
    """Deterministic, stratified train / validation / test splits of a data set that has none."""
    if len(dataset) == 0:
        raise ConfigError("the data set is empty: check the data source.")
    rest_test = dataset.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column=label_column)
    train_val = rest_test["train"].train_test_split(
        test_size=val_fraction / (1.0 - test_fraction), seed=seed, stratify_by_column=label_column
    )
    return datasets.DatasetDict(
        {"train": train_val["train"], "validation": train_val["test"], "test": rest_test["test"]}
    )


def channel_stats(dataset: datasets.Dataset, image_column: str = "image") -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of pixel values in [0, 1] (for normalisation)."""
    pixels = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in dataset[image_column]])
    axes = tuple(range(pixels.ndim - 1)) if pixels.ndim == 4 else None
    mean, std = pixels.mean(axis=axes), pixels.std(axis=axes)
    return np.atleast_1d(mean).tolist(), np.atleast_1d(std).tolist()


def image_transform(image_size: int, mean: list[float], std: list[float]) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.Resize((image_size, image_size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def image_loaders(config: ImageDataConfig, seed: int = 0) -> dict[str, DataLoader]:
    """Train / validation / test DataLoaders yielding {"pixel_values": (B, C, H, W) float, "label": (B,) long}."""
    splits = split_dataset(load_image_dataset(config.name), config.val_fraction, config.test_fraction,
                           config.split_seed)
    mean, std = channel_stats(splits["train"])
    transform = image_transform(config.image_size, mean, std)

    def apply(batch: dict) -> dict:
        return {"pixel_values": [transform(image) for image in batch["image"]], "label": batch["label"]}

    loaders = {}
    for split, dataset in splits.items():
        training = split == "train"
        loaders[split] = DataLoader(
            dataset.with_transform(apply),
            batch_size=config.batch_size if training else config.eval_batch_size,
            shuffle=training,
            num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(seed) if training else None,
        )
    return loaders

