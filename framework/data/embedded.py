"""Real data sets that need no network, as ordinary `datasets.Dataset` objects."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import datasets
import numpy as np
from PIL import Image


def digits_dataset() -> datasets.Dataset:
    """scikit-learn's bundled handwritten digits: 1,797 real 8×8 grayscale scans of 0-9 (UCI optdigits test set).

    Pixel values 0-16 are scaled to 0-255 and stored as PIL images, so the same image pipeline serves any image
    data set.
    """
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
