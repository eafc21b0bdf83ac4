"""Real data sets that need no network, as ordinary `datasets.Dataset` objects."""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image


def digits_dataset() -> datasets.Dataset:
    """scikit-learn's bundled handwritten digits: 1,797 real 8×8 grayscale scans of 0-9 (UCI optdigits test set).

    Pixel values 0-16 are scaled to 0-255 and stored as PIL images, so the same image pipeline serves any image
    data set. Built once and saved under the `datasets` cache: later processes load it in milliseconds instead of
    importing scikit-learn and encoding 1,797 PNGs again (about 2 s of every run's start).
    """
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "framework_embedded" / "digits-v1"
    if not (folder / "dataset_info.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Processes building it at once each save to a folder of their own and rename it into place: the first
        # wins, the others' identical copies are dropped.
        staging = tempfile.mkdtemp(dir=folder.parent, prefix=".digits-")
        bars_were_off = datasets.utils.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # a user's run prints its own lines, not a "Saving the dataset" bar
        _build_digits().save_to_disk(staging)
        if not bars_were_off:
            datasets.enable_progress_bars()
        try:
            os.replace(staging, folder)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    # Memory-mapped like any data read from files: its fingerprint is stable, so what is derived from it (splits,
    # channel statistics, the unreadable-image check) is cached too.
    return datasets.load_from_disk(str(folder))


def _build_digits() -> datasets.Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": digits.target.tolist()}, features=features
    )


def stdlib_text_dataset(include_tests: bool = False) -> datasets.Dataset:
    """The Python standard library's own source files as real text: one row per file ("path", "text").

    About 11 MB without the test suite (~31 MB with it). Files are sorted by path so the data set is the same on
    every run; the few files that are not UTF-8 are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths, texts = [], []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if "site-packages" in relative.parts or (not include_tests and _is_test_file(relative)):
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        paths.append(str(relative))
    return datasets.Dataset.from_dict({"path": paths, "text": texts})


def _is_test_file(relative: Path) -> bool:
    return any(part in ("test", "tests", "idle_test") for part in relative.parts) or relative.name.startswith("test_")


#: Embedded data sets by the name a config gives (`data.name`).
EMBEDDED = {"digits": digits_dataset, "stdlib": stdlib_text_dataset}
