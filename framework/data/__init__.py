"""Data through HF `datasets`: every source (the embedded defaults included) becomes a `datasets.Dataset`."""

from framework.data.embedded import digits_dataset
from framework.data.images import ImageDataConfig, image_loaders, split_dataset

__all__ = ["ImageDataConfig", "digits_dataset", "image_loaders", "split_dataset"]
