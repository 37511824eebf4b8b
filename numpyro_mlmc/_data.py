"""Data sets we can ship: scikit-learn digits (8x8), on the [-1, 1] scale."""

from __future__ import annotations

import numpy as np

__all__ = ["load_digits_images", "load_patch_images", "load_patches16", "sample_patches"]


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


# ----- 16x16 natural-image patches (scikit-image's bundled images) ---------------------------

# Images that ship inside scikit-image (no download). Grayscale conversion by luminance
# (ITU-R 601 weights, `skimage.color.rgb2gray`). "retina" and "hubble_deep_field" are left out:
# they are mostly black background, which would fill the set with empty patches.
PATCH_TRAIN_IMAGES = (
    "camera",
    "astronaut",
    "coffee",
    "brick",
    "grass",
    "gravel",
    "moon",
    "page",
    "rocket",
    "text",
    "cell",
)
# Held out for evaluation: never seen in training (a cat photograph and a coin tray).
PATCH_TEST_IMAGES = ("chelsea", "coins")


def _grayscale_image(name: str) -> np.ndarray:
    import skimage.data
    from skimage.color import rgb2gray, rgba2rgb
    from skimage.util import img_as_float

    if not hasattr(skimage.data, name):
        raise ValueError(f"scikit-image has no bundled image {name!r}.")
    image = img_as_float(getattr(skimage.data, name)())
    if image.ndim == 3:
        if image.shape[-1] == 4:
            image = rgba2rgb(image)
        image = rgb2gray(image)
    return image.astype(np.float32)


def load_patch_images(split: str = "train") -> dict[str, np.ndarray]:
    """The source images of the patches16 set: `{name: (H, W) float32 on [-1, 1]}`.

    `split="train"` gives `PATCH_TRAIN_IMAGES`, `"test"` the held-out `PATCH_TEST_IMAGES`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    names = PATCH_TRAIN_IMAGES if split == "train" else PATCH_TEST_IMAGES
    return {name: 2.0 * _grayscale_image(name) - 1.0 for name in names}


def sample_patches(images, num_patches: int, *, size: int = 16, seed=0, flips: bool = True):
    """`num_patches` random `size x size` patches, shape `(n, size, size)` float32.

    Each patch picks an image with probability proportional to its number of valid patch
    positions, then a uniform position; with `flips`, a horizontal and a vertical flip are each
    applied with probability 1/2 (both leave the statistics of natural images unchanged).
    `seed` is anything `numpy.random.default_rng` accepts, e.g. `[seed, step]`.
    """
    images = list(images.values()) if isinstance(images, dict) else list(images)
    rng = np.random.default_rng(seed)
    counts = np.array([(h - size + 1) * (w - size + 1) for h, w in (im.shape for im in images)])
    which = rng.choice(len(images), size=num_patches, p=counts / counts.sum())
    out = np.empty((num_patches, size, size), np.float32)
    for i, k in enumerate(which):
        h, w = images[k].shape
        r, c = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        out[i] = images[k][r : r + size, c : c + size]
    if flips:
        hflip = rng.random(num_patches) < 0.5
        vflip = rng.random(num_patches) < 0.5
        out[hflip] = out[hflip, :, ::-1]
        out[vflip] = out[vflip, ::-1, :]
    return out


def load_patches16(*, split: str = "train", num_patches: int = 50_000, seed: int = 0):
    """A fixed set of 16x16 grayscale patches on `[-1, 1]`, shape `(num_patches, 16, 16)`.

    `split="train"` draws from `PATCH_TRAIN_IMAGES` with random flips; `split="test"` from the
    held-out `PATCH_TEST_IMAGES` without flips. Deterministic given `seed`.
    """
    images = load_patch_images(split)
    return sample_patches(
        images,
        num_patches,
        size=16,
        seed=[seed, 0 if split == "train" else 1],
        flips=split == "train",
    )
