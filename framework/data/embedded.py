"""Real data sets that need no network, as ordinary `datasets.Dataset` objects."""

from __future__ import annotations

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
