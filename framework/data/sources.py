"""Every data source through one HF `datasets` path: embedded data, a hub id, a local folder, or data files.

    name                          what is loaded
    digits / stdlib               embedded, no network (framework/data/embedded.py)
    path/saved                    a folder written by `Dataset(Dict).save_to_disk` -> `datasets.load_from_disk`
    data/*.parquet, x.csv, a.txt  data files (parquet, csv, json/jsonl, text, arrow; globs allowed)
    path/folder or cifar10        `datasets.load_dataset(name)`: a local folder (imagefolder layout, or files in a
                                  hub repository's layout) or a hub id, the very same call for both
"""

from __future__ import annotations

import glob
from pathlib import Path

import datasets
import numpy as np

from framework.data.embedded import EMBEDDED
from framework.errors import ConfigError

#: File suffix -> the `datasets` builder that reads it.
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text",
                 ".arrow": "arrow"}
#: Split names some data sets use for validation.
VALIDATION_NAMES = ("validation", "valid", "val", "dev")


def load_source(name: str, subset: str | None = None, **builder_kwargs) -> datasets.DatasetDict:
    """Load `name` (see the module docstring) as a `DatasetDict` (a source without splits comes back as "train")."""
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.suffix in FILE_BUILDERS
    if name not in EMBEDDED and looks_local and not glob.glob(str(path), recursive=True):
        raise ConfigError(f"data.name {name!r} could not be loaded: no such file or folder (relative paths start "
                          f"from {Path.cwd()}). Check the path, or give an embedded data set: {', '.join(EMBEDDED)}.")
    try:
        if name in EMBEDDED:
            loaded = EMBEDDED[name]()
        elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif path.suffix in FILE_BUILDERS:
            loaded = datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), **builder_kwargs)
        else:
            loaded = datasets.load_dataset(name, subset, **builder_kwargs)
    except (FileNotFoundError, ConnectionError, ValueError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as error:
        reason = error.__cause__ or error  # a file that cannot be parsed: the builder's own error says which
        first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        if "corresponds to no data" in first_line:  # datasets' words for files that hold no rows
            raise ConfigError(f"data.name {name!r} holds no samples (its files are empty): add data, or point "
                              "data.name at the files that hold it.") from error
        raise ConfigError(
            f"data.name {name!r} could not be loaded ({first_line}). Give an embedded data set "
            f"({', '.join(EMBEDDED)}), a local folder, data files ({', '.join(FILE_BUILDERS)}), or a hub id (needs "
            "the network, or the data set in the local HF cache)."
        ) from error
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if "train" not in loaded:
        raise ConfigError(f"data.name {name!r} has the splits {sorted(loaded)} but no 'train' split.")
    return loaded


def streams_from_files(name: str) -> bool:
    """Whether `data.streaming` reads `name` from its files (a local folder or data files). The embedded data and
    `save_to_disk` folders are in memory or memory-mapped already: they stream from their map-style splits."""
    path = Path(name).expanduser()
    saved = path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())
    return name not in EMBEDDED and not saved


def stream_source(name: str, subset: str | None = None, **builder_kwargs
                  ) -> tuple[datasets.IterableDatasetDict, dict[str, list[int] | None]]:
    """`name` (a local folder or data files, or a hub id) as streams, one per split, read by
    `load_dataset(..., streaming=True)`; with the rows of each split's shards (its files) where the files record
    them (parquet metadata), else None. A folder's splits come from its file names (`train-*.parquet`,
    `test/...`), as `datasets` finds them."""
    path = Path(name).expanduser()
    if path.suffix in FILE_BUILDERS:
        builder, data_files = FILE_BUILDERS[path.suffix], {"train": sorted(glob.glob(str(path), recursive=True))}
        if not data_files["train"]:
            raise ConfigError(f"data.name {name!r}: no such files (relative paths start from {Path.cwd()}).")
    elif path.is_dir():
        from datasets.data_files import DataFilesDict, get_data_patterns

        data_files = {split: list(files) for split, files in
                      DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path)).items()}
        suffixes = {Path(f).suffix for files in data_files.values() for f in files}
        builder = FILE_BUILDERS.get(suffixes.pop()) if len(suffixes) == 1 else None
    else:
        builder, data_files = None, None
    if builder is None:  # image folders, mixed files, hub ids: datasets finds the builder itself
        streams = datasets.load_dataset(name, subset, streaming=True, **builder_kwargs)
        return streams, {split: None for split in streams}
    streams = datasets.load_dataset(builder, data_files=data_files, streaming=True, **builder_kwargs)
    if builder != "parquet":
        return streams, {split: None for split in streams}
    import pyarrow.parquet as pq

    return streams, {split: [pq.ParquetFile(f).metadata.num_rows for f in files] for split, files in data_files.items()}


def held_out_splits(streams: datasets.IterableDatasetDict, name: str) -> datasets.DatasetDict:
    """A streamed source's validation and test splits, read into memory (held-out splits are small; evaluating
    them map-style counts each sample once through accelerate's `gather_for_metrics`)."""
    validation = next((split for split in VALIDATION_NAMES if split in streams), None)
    if validation is None or "test" not in streams:
        raise ConfigError(f"data.streaming: {name!r} has the splits {sorted(streams)}; a streamed source needs its "
                          "own validation and test splits (files named e.g. validation-*.parquet and "
                          "test-*.parquet beside train-*.parquet), since rows cannot be drawn out of a stream "
                          "for them.")
    return datasets.DatasetDict({
        out: datasets.Dataset.from_list(list(streams[split]), features=streams[split].features)
        for out, split in (("validation", validation), ("test", "test"))})


def check_sizes(prefix: str, val_fraction: float, test_fraction: float, at_least_one: dict[str, int | None],
                at_least_zero: dict[str, int | None] | None = None) -> None:
    """Refuse a data config's out-of-range numbers before anything is loaded (None means automatic or unlimited).

    Args:
        prefix: the option's prefix in messages (`data`).
        at_least_one / at_least_zero: option name -> value, for values that must be >= 1 (batch sizes) or >= 0.
    """
    for least, values in ((1, at_least_one), (0, at_least_zero or {})):
        for name, value in values.items():
            if value is not None and value < least:
                raise ConfigError(f"{prefix}.{name} must be at least {least}, got {value}: pass --{prefix}.{name} "
                                  f"{least} or more.")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ConfigError(f"{prefix}.{name} must be in (0, 1), got {value}: e.g. 0.1 holds out 10% of the data.")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(f"{prefix}.val_fraction + {prefix}.test_fraction = {val_fraction + test_fraction} leaves "
                          "no training data: keep their sum below 1.")


def split_dataset(dataset: datasets.Dataset, val_fraction: float, test_fraction: float, seed: int,
                  stratify_column: str | None = None) -> datasets.DatasetDict:
    """Deterministic train / validation / test splits of a data set that has none (stratified when a ClassLabel
    column is named, so every class keeps its share in each split)."""
    if len(dataset) == 0:
        raise ConfigError("the data set is empty: check data.name (the folder or files may hold no samples).")
    rest_test = _split(dataset, test_fraction, seed, stratify_column)
    train_val = _split(rest_test["train"], val_fraction / (1.0 - test_fraction), seed, stratify_column)
    return datasets.DatasetDict({"train": train_val["train"], "validation": train_val["test"],
                                 "test": rest_test["test"]})


def make_splits(loaded: datasets.DatasetDict, val_fraction: float, test_fraction: float, seed: int,
                stratify_column: str | None = None) -> datasets.DatasetDict:
    """train / validation / test: the source's own splits where it has them, the rest carved from its train split."""
    validation = next((loaded[name] for name in VALIDATION_NAMES if name in loaded), None)
    if "test" not in loaded and validation is None:
        return split_dataset(loaded["train"], val_fraction, test_fraction, seed, stratify_column)
    train = loaded["train"]
    if validation is None:  # e.g. cifar10: train + test; validation comes from train, test stays untouched
        train, validation = _split(train, val_fraction, seed, stratify_column).values()
    test = loaded["test"] if "test" in loaded else None
    if test is None:
        train, test = _split(train, test_fraction, seed, stratify_column).values()
    splits = datasets.DatasetDict({"train": train, "validation": validation, "test": test})
    if any(len(split) == 0 for split in splits.values()):
        raise ConfigError(f"a split is empty ({ {k: len(v) for k, v in splits.items()} }): check data.name.")
    return splits


def per_class_subset(dataset: datasets.Dataset, per_class: int, seed: int, label_column: str,
                     option: str = "data.train_per_class") -> datasets.Dataset:
    """`per_class` samples of every class of `dataset`, drawn without replacement by a numpy Generator seeded with
    `seed` (a low-data regime carved from a bigger split). The rows keep the split's order, so the result depends on
    (dataset, per_class, seed) only."""
    if per_class < 1:
        raise ConfigError(f"{option} must be at least 1, got {per_class}: pass e.g. --{option} 10 (images per class).")
    labels = np.asarray(dataset[label_column])
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):  # a class with no training image at all counts as short too
        names, counts = feature.names, np.bincount(labels, minlength=feature.num_classes)
        classes = np.arange(feature.num_classes)
    else:
        classes, counts = np.unique(labels, return_counts=True)
        names = None
    short = {(names[c] if names else c.item()): int(n) for c, n in zip(classes, counts) if n < per_class}
    if short:
        raise ConfigError(f"{option} {per_class}: the training split has fewer images than that in class(es) "
                          f"{short} (class: images). Pass --{option} {int(counts.min())} or fewer.")
    generator = np.random.default_rng(seed)
    chosen = [generator.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
    return dataset.select(np.sort(np.concatenate(chosen)))


def _split(dataset: datasets.Dataset, fraction: float, seed: int, stratify_column: str | None):
    stratify = stratify_column if stratify_column and isinstance(
        dataset.features.get(stratify_column), datasets.ClassLabel) else None
    try:
        return dataset.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
    except ValueError as error:  # e.g. too few samples for every class to appear in both parts
        raise ConfigError(f"cannot split {len(dataset)} samples with fraction {fraction}: {error}") from error


def find_column(dataset: datasets.Dataset, wanted: str | None, feature_type: type, names: tuple[str, ...],
                what: str, option: str) -> str:
    """The column named `wanted`, else the first of type `feature_type`, else the first of the usual `names`."""
    columns = dataset.column_names
    if wanted is not None:
        if wanted not in columns:
            raise ConfigError(f"{option} {wanted!r} is not a column of the data set; its columns: {columns}.")
        return wanted
    typed = [c for c in columns if isinstance(dataset.features[c], feature_type)]
    found = typed or [c for c in names if c in columns]
    if not found:
        raise ConfigError(f"no {what} column found among {columns}: name it with {option}.")
    return found[0]

