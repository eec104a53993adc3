"""Data that needs no download: scikit-learn's bundled digits, resized for torchvision models."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def digits_tensors(image_size: int = 32, channels: int = 3, val_fraction: float = 0.2, seed: int = 0):
    """``(x_train, y_train, x_val, y_val)`` from ``sklearn.datasets.load_digits``.

    The 8x8 images (values 0..16) are scaled to [0, 1], resized bilinearly to
    ``image_size``, standardized, and repeated to ``channels``. The split is a fixed,
    seeded permutation (1797 images: 1437 train / 360 val at the default fraction).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    x = x.repeat(1, channels, 1, 1)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(y) * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]
