"""Data through HF `datasets`: every source (the embedded defaults included) becomes a `datasets.Dataset`."""

from framework.data.embedded import digits_dataset, stdlib_text_dataset
from framework.data.images import ImageData, ImageDataConfig, image_data, size_control
from framework.data.loaders import auto_num_workers, make_loader
from framework.data.sources import load_source, make_splits, split_dataset
from framework.data.text import TextData, TextDataConfig, text_data

__all__ = ["ImageData", "ImageDataConfig", "auto_num_workers", "digits_dataset", "image_data", "load_source",
           "make_loader", "make_splits", "size_control", "split_dataset", "stdlib_text_dataset",
           "TextData", "TextDataConfig", "text_data"]
