"""Data sets we can ship: scikit-learn digits (8x8), on the [-1, 1] scale."""

from __future__ import annotations

import numpy as np

__all__ = ["load_digits_images"]


def load_digits_images(*, split: str = "all", holdout_fraction: float = 0.2, seed: int = 0):
    """The 1,797 scikit-learn digits as `(n, 8, 8)` float32 images on `[-1, 1]`.

    `split` is `"all"`, `"train"` or `"test"` (a fixed random hold-out of `holdout_fraction`).
    Returns `(images, labels)`.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 2.0 - 1.0).astype(np.float32)
    labels = digits.target
    if split == "all":
        return images, labels
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}.")
    order = np.random.default_rng(seed).permutation(images.shape[0])
    n_test = int(round(holdout_fraction * images.shape[0]))
    idx = order[:n_test] if split == "test" else order[n_test:]
    return images[idx], labels[idx]
