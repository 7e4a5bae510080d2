"""The UCI handwritten digits (8x8, values 0..16), shipped as a committed extract.

`digits.npz` was made once from `sklearn.datasets.load_digits()` (images as uint8, labels as
uint8); see LICENSE-digits.txt. Loading it needs numpy only.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .scenes import COLOURS, check_split

DIGITS_PATH = Path(__file__).with_name("digits.npz")
N_DIGITS = 1797
_SPLIT_SEED = 20240607  # fixes the permutation; changing it reshuffles every split


@lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """-> (images uint8 [1797, 8, 8] in 0..16, labels uint8 [1797])."""
    with np.load(DIGITS_PATH, allow_pickle=False) as f:
        images, labels = f["images"], f["labels"]
    if images.shape != (N_DIGITS, 8, 8):
        raise RuntimeError(f"{DIGITS_PATH} is damaged (images {images.shape}); restore it from the repository")
    return images, labels


@lru_cache(maxsize=None)
def digit_split_indices(split: str) -> np.ndarray:
    """Indices of the digits in `split`: a fixed permutation cut 80/10/10."""
    check_split(split)
    perm = np.random.default_rng(_SPLIT_SEED).permutation(N_DIGITS)
    n_train, n_val = int(0.8 * N_DIGITS), int(0.1 * N_DIGITS)
    cuts = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
    return np.sort(cuts[split])


def digit_label(index: int) -> int:
    return int(load_digits()[1][index])


def digit_image(index: int, size: int = 32, colour: str = "white") -> np.ndarray:
    """Digit `index` (0..1796) upscaled bilinearly to [size, size, 3] uint8, ink on black."""
    images, _ = load_digits()
    if not 0 <= index < N_DIGITS:
        raise IndexError(f"digit index {index} out of range 0..{N_DIGITS - 1}")
    ink = np.array((255, 255, 255) if colour == "white" else COLOURS[colour], dtype=np.float32)
    grey = Image.fromarray((images[index].astype(np.float32) * (255 / 16)).round().astype(np.uint8), "L")
    grey = np.asarray(grey.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    return (grey[..., None] * ink).round().astype(np.uint8)


__all__ = ["load_digits", "digit_split_indices", "digit_label", "digit_image"]
