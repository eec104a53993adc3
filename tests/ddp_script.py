"""Run by test_ddp.py: 2-process CPU DDP (gloo) QAT; each rank saves what it holds."""
import os
import sys
import warnings

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.dirname(__file__))
from lightning_helpers import DigitsModule, loaders  # noqa: E402

from qat_plugin.callbacks import QuantizationAwareTraining  # noqa: E402

warnings.filterwarnings("ignore")


class Recorder(pl.Callback):
    def __init__(self, qat, out):
        self.qat, self.out, self.records = qat, out, {}

    def _snap(self):
        return {k: (q.scale.detach().clone(), q.offset.detach().clone()) for k, q in self.qat.sim.quantizers().items()}

    def on_train_start(self, trainer, pl_module):
        self.records["calibrated"] = self._snap()
        batch = next(iter(trainer.train_dataloader))[0]
        self.records["local_input_mean"] = float(batch.mean())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ann = self.qat.annealer
        if ann.updates and ann.updates not in self.records.setdefault("updates", {}):
            self.records["updates"][ann.updates] = self._snap()

    def on_fit_end(self, trainer, pl_module):
        torch.save(self.records, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main(out):
    torch.manual_seed(0)
    train, val = loaders(batch_size=32)
    qat = QuantizationAwareTraining(quant_scheme="tf_enhanced", calibration_batches=3,
                                    annealing=dict(start_step=0, end_step=6, every_n_steps=2, stat_batches=2))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[qat, Recorder(qat, out)])
    trainer.fit(DigitsModule(), train)


if __name__ == "__main__":
    main(sys.argv[1])
