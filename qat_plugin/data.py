"""Data that needs no download: scikit-learn's bundled digits, resized for torchvision models."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def digits_tensors(image_size: int = 32, channels: int = 3, val_fraction: float = 0.2, seed: int = 0):
    """``(x_train, y_train, x_val, y_val)`` from ``sklearn.datasets.load_digits``.

    The 8x8 images (values 0..16) are scaled to [0, 1], resized bilinearly to
    ``image_size``, standardized, and repeated to ``channels``. The split is a fixed,
    seeded permutation (1797 images: 1438 train / 359 val at the default fraction,
    ``round(1797 * 0.2) = 359``).
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


import pytorch_lightning as pl  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's bundled digits (no download): 1438 training and 359 validation images,
    resized to ``image_size`` with ``channels`` channels (3 for torchvision models).

    Args:
        image_size: side of the resized images.
        channels: 1 or 3 (the grey image repeated).
        batch_size: training batch size (validation uses 256).
        val_fraction: share held out for validation (seeded split).
        seed: split and shuffling seed.
        labels: ``False`` makes training batches images only (``(x,)``), for label-free QAT by
            distillation; validation keeps its labels for accuracy.
    """

    def __init__(self, image_size: int = 32, channels: int = 3, batch_size: int = 64, val_fraction: float = 0.2,
                 seed: int = 0, labels: bool = True):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.labels = labels
        self.image_size, self.channels, self.batch_size = image_size, channels, batch_size
        self.val_fraction, self.seed = val_fraction, seed
        self.num_classes = 10
        self._data = None

    def setup(self, stage: str = None) -> None:
        if self._data is None:
            self._data = digits_tensors(self.image_size, self.channels, self.val_fraction, self.seed)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        x, y = self._data[0], self._data[1]
        return DataLoader(TensorDataset(x, y) if self.labels else TensorDataset(x), batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(TensorDataset(self._data[2], self._data[3]), batch_size=256)

    test_dataloader = val_dataloader


class UnlabeledImages(torch.utils.data.Dataset):
    """Every image file under ``root`` (any depth, sorted; class folders optional and ignored),
    transformed; items are ``(image,)`` tuples."""

    def __init__(self, root: str, transform=None):
        import os

        from torchvision.datasets.folder import IMG_EXTENSIONS

        self.root, self.transform = root, transform
        self.files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                            if f.lower().endswith(IMG_EXTENSIONS))
        if not self.files:
            raise FileNotFoundError(f"UnlabeledImages: no image files ({', '.join(IMG_EXTENSIONS)}) under '{root}'")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
        return (self.transform(im) if self.transform is not None else im,)


class ImageFolderDataModule(pl.LightningDataModule):
    """Your own images in torchvision's ImageFolder layout: ``train_dir/<class>/<image>`` and
    ``val_dir/<class>/<image>`` (without ``val_dir``, a seeded ``val_fraction`` of train_dir).

    Images are resized to ``image_size`` (square), converted to ``channels`` channels and
    normalized with ImageNet's mean and standard deviation.

    ``unlabeled=True``: ``train_dir`` is any folder of images (class folders optional and
    ignored) and training batches are ``(x,)``, for label-free QAT by distillation; validation
    needs a labelled ``val_dir`` (without one there is no validation).
    """

    def __init__(self, train_dir: str, val_dir: str = None, image_size: int = 224, channels: int = 3,
                 batch_size: int = 32, val_fraction: float = 0.2, num_workers: int = 0, seed: int = 0,
                 unlabeled: bool = False):
        super().__init__()
        import os

        self.unlabeled = unlabeled
        for d in (train_dir, val_dir):
            if d is not None and not os.path.isdir(d):
                raise FileNotFoundError(f"ImageFolderDataModule: no directory '{d}'")
        self.train_dir, self.val_dir = train_dir, val_dir
        self.image_size, self.channels, self.batch_size = image_size, channels, batch_size
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        self._train = self._val = None

    def _transform(self):
        from torchvision import transforms

        mean, std = [0.485, 0.456, 0.406][: self.channels], [0.229, 0.224, 0.225][: self.channels]
        return transforms.Compose([
            transforms.Grayscale(self.channels) if self.channels == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize((self.image_size, self.image_size)), transforms.ToTensor(),
            transforms.Normalize(mean, std)])

    def setup(self, stage: str = None) -> None:
        if self._train is not None:
            return
        from torchvision.datasets import ImageFolder

        if self.unlabeled:
            self._train = UnlabeledImages(self.train_dir, transform=self._transform())
            self._val = ImageFolder(self.val_dir, transform=self._transform()) if self.val_dir is not None else []
            if self.val_dir is not None:
                self.num_classes = len(self._val.classes)
            return
        full = ImageFolder(self.train_dir, transform=self._transform())
        self.num_classes = len(full.classes)
        if self.val_dir is not None:
            self._train, self._val = full, ImageFolder(self.val_dir, transform=self._transform())
        else:
            n_val = max(1, int(round(len(full) * self.val_fraction)))
            self._train, self._val = torch.utils.data.random_split(
                full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._val, batch_size=self.batch_size, num_workers=self.num_workers)

    test_dataloader = val_dataloader
