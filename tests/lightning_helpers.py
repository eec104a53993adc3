"""A tiny LightningModule on the bundled digits, for callback tests and the DDP script."""
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat_plugin.data import digits_tensors


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(y + self.bn2(self.conv2(y)))
        y = F.max_pool2d(y, 2)
        return self.fc(torch.flatten(y, 1))


class DigitsModule(pl.LightningModule):
    def __init__(self, lr=0.05, inf_at_step=None):
        super().__init__()
        self.net = SmallNet()
        self.lr = lr
        self.inf_at_step = inf_at_step
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.inf_at_step is not None and self.global_step == self.inf_at_step:
            loss = loss * float("inf")  # forces inf gradients: the GradScaler must skip this step
        self.log("train_loss", loss.detach().float(), prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self(x).argmax(1) == y).float().mean()
        self.log("val_acc", acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loaders(batch_size=64, seed=0):
    x, y, xv, yv = digits_tensors(image_size=8, channels=1, seed=seed)
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(xv, yv), batch_size=256)
    return train, val


def ordered_loaders(n_batches=2, batch_size=16):
    """A training loader of ``n_batches`` fixed batches in a fixed order (no shuffling, so that a
    run resumed at an epoch boundary sees the batches an uninterrupted run sees), and a val loader."""
    x, y, xv, yv = digits_tensors(image_size=8, channels=1, seed=0)
    n = n_batches * batch_size
    return (DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size),
            DataLoader(TensorDataset(xv[:64], yv[:64]), batch_size=64))


def shard_loader(rank, batch_size, n_batches):
    """Rank ``rank``'s contiguous shard of the training digits, in order (for 2-rank DDP)."""
    x, y, _, _ = digits_tensors(image_size=8, channels=1, seed=0)
    n = batch_size * n_batches
    return DataLoader(TensorDataset(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]), batch_size=batch_size)


def concatenated_loader(batch_size, n_batches, ranks=2, micro_batches=False):
    """The batches the ranks of :func:`shard_loader` see together: step i is rank 0's batch i
    followed by rank 1's. ``micro_batches=True``: as ``ranks`` loader batches per step (for
    ``accumulate_grad_batches=ranks``), otherwise one concatenated batch per step."""
    x, y, _, _ = digits_tensors(image_size=8, channels=1, seed=0)
    n = batch_size * n_batches
    idx = torch.cat([torch.arange(r * n + i * batch_size, r * n + (i + 1) * batch_size)
                     for i in range(n_batches) for r in range(ranks)])
    return DataLoader(TensorDataset(x[idx], y[idx]), batch_size=batch_size if micro_batches else batch_size * ranks)


def encodings(sim):
    """``{site: (scale, offset)}`` copies of every quantizer's live parameters."""
    return {k: (q.scale.detach().clone(), q.offset.detach().clone()) for k, q in sim.quantizers().items()}


def same_encodings(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


def trainer(tmp_path, max_steps, callbacks, **kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, max_steps=max_steps,
                      callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=1.0,
                      deterministic=True, **kwargs)
