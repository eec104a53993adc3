"""Add QAT to an existing Lightning training script: one callback.

    python examples/lightning_callback.py [--max-steps 100]
"""
from __future__ import annotations

import argparse
import tempfile

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from qat_plugin.callbacks import QuantizationAwareTraining
from qat_plugin.data import digits_tensors


class Classifier(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about quantization."""

    def __init__(self, lr: float = 1e-3):
        super().__init__()
        self.model = torchvision.models.resnet18(num_classes=10)
        self.lr = lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--out", default=None, help="where logs and the INT8 export go (default: a temp dir)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x, y, xv, yv = digits_tensors(image_size=32)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=256)
    out = args.out or tempfile.mkdtemp()

    qat = QuantizationAwareTraining(
        quant_scheme="tf_enhanced", default_param_bw=8, default_output_bw=8, config_file="default",
        dummy_input=x[:2], calibration_batches=4,
        annealing=dict(end_step=args.max_steps, every_n_steps=10),
        export_dir=out, export_prefix="classifier")
    trainer = pl.Trainer(accelerator="cpu", max_steps=args.max_steps, callbacks=[qat], default_root_dir=out,
                         val_check_interval=min(50, args.max_steps), check_val_every_n_epoch=None,
                         enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10)
    trainer.fit(Classifier(), train, val)
    print(qat.sim)
    print(f"INT8 export: {out}/classifier.onnx")
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


if __name__ == "__main__":
    main()
