"""ImageClassifier: a LightningModule around any torchvision model (by name) or class path."""
from __future__ import annotations

import importlib
from typing import Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from .distillation import Distiller
from .errors import QuantConfigError, did_you_mean


def build_network(model: str, num_classes: int) -> nn.Module:
    """``"mobilenet_v2"`` (a torchvision builder, random weights) or ``"package.module.Class"``."""
    import torchvision

    if "." in model:
        module_name, _, attr = model.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise QuantConfigError(f"cannot import model class '{model}': {e}") from None
        return cls(num_classes=num_classes)
    names = torchvision.models.list_models(module=torchvision.models)
    if model not in names:
        raise QuantConfigError(f"unknown torchvision model '{model}'." + did_you_mean(model, names))
    return torchvision.models.get_model(model, weights=None, num_classes=num_classes)


def _split_batch(batch):
    """``(x, y)`` from ``x``, ``(x,)`` or ``(x, y)``; ``y`` is None without labels."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if len(batch) == 1:
        return batch[0], None
    return batch[0], batch[1]


def load_fp32_checkpoint(network: nn.Module, path: str) -> None:
    """Load a plain ``state_dict`` file or a Lightning checkpoint (its ``model.`` entries)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise QuantConfigError(f"fp32_checkpoint '{path}' does not fit the network: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")


class ImageClassifier(pl.LightningModule):
    """Image classification with a torchvision network.

    Args:
        model: torchvision builder name (``mobilenet_v2``, ``resnet18``, ...) or a class path.
        num_classes: output classes.
        lr: learning rate of the (QAT) fit.
        optimizer: ``sgd`` (momentum 0.9, cosine schedule) or ``adamw``.
        weight_decay: weight decay.
        fp32_warmup_epochs: epochs of plain FP32 training that ``qat-plugin fit`` runs before
            quantizing (the embedded demo has no pretrained weights to download).
        fp32_lr: learning rate of the warm-up (AdamW, one-cycle).
        fp32_checkpoint: start from these FP32 weights (state_dict file or Lightning checkpoint).
        distillation: train on the distillation loss of a frozen FP32 teacher instead of the
            labels: ``{"temperature": 4.0, "task_weight": 0.0}`` (see
            :class:`qat_plugin.distillation.Distiller`). The teacher is a copy of the network at
            the start of fit (after any FP32 warm-up; quantizers bypassed), so training batches
            may hold images only. With ``task_weight > 0`` labelled batches add the task loss.

    Label-free QAT (a batch is ``x``, ``(x,)`` or ``(x, y)``; labels are not read when
    ``task_weight`` is 0):

    >>> clf = ImageClassifier("resnet18", num_classes=10, distillation={"temperature": 4.0})
    >>> clf.hparams.distillation
    {'temperature': 4.0}
    """

    def __init__(self, model: str = "mobilenet_v2", num_classes: int = 10, lr: float = 0.01,
                 optimizer: str = "sgd", weight_decay: float = 1e-5, fp32_warmup_epochs: int = 0,
                 fp32_lr: float = 2e-3, fp32_checkpoint: Optional[str] = None,
                 distillation: Optional[dict] = None):
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise QuantConfigError(f"unknown optimizer '{optimizer}'." + did_you_mean(optimizer, ["sgd", "adamw"]))
        if distillation is not None:
            allowed = ("temperature", "task_weight")
            for key in distillation:
                if key not in allowed:
                    raise QuantConfigError(f"unknown distillation option '{key}'." + did_you_mean(key, allowed))
            Distiller(nn.Identity(), **distillation)  # validates the values
        self.save_hyperparameters()
        self.model = build_network(model, num_classes)
        if fp32_checkpoint:
            load_fp32_checkpoint(self.model, fp32_checkpoint)
        self.warmup = False  # True while `qat-plugin fit` runs the FP32 warm-up
        self.distiller: Optional[Distiller] = None

    def forward(self, x):
        return self.model(x)

    def on_fit_start(self) -> None:
        if self.hparams.get("distillation") is not None and not self.warmup:
            self.distiller = Distiller(self.model, **self.hparams.distillation)

    def training_step(self, batch, batch_idx):
        x, y = _split_batch(batch)
        logits = self(x)
        if self.distiller is not None and not self.warmup:
            loss = self.distiller.loss(logits, x, targets=y)
            self.log("train_kd_loss", loss, prog_bar=True)
            return loss
        if y is None:
            raise QuantConfigError("the training batch has no labels: give ImageClassifier distillation={...} "
                                   "to train without labels, or use a labelled data module")
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    test_step = validation_step

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        hp = self.hparams
        if self.warmup:
            opt = torch.optim.AdamW(params, lr=hp.fp32_lr, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.fp32_lr, total_steps=steps)
        elif hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
