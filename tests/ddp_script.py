"""Run by test_ddp.py: 2-process CPU DDP (gloo) QAT through the real Trainer; each rank saves what
it holds after every run. ``python ddp_script.py OUT PART [PART ...]``; parts:

* ``learned``: learned ranges + annealing whose window ends (and freezes the ranges) mid-run, a
  checkpoint after every epoch; then ``resumed``: the same run resumed from its step-4 checkpoint.
* ``fixed``: the same with fixed (calibrated and annealed, not learned) ranges.
* ``simulated``: ``bn_folding="simulated"`` with ``freeze_bn_step``, learned ranges (no SyncBatchNorm on CPU).
* ``bf16``, ``fp16``: learned ranges under bf16-mixed, and fp16 with the CPU GradScaler plugin.
* ``empty``: ``all_reduce_observer`` with a rank that saw no data.
* ``ptq``: AdaRound + bias correction (``PTQConfig.apply``), each rank on its own data (after a
  fit part, which starts the process group).

Rank r trains on its own contiguous shard (``use_distributed_sampler=False``), so that the
single-process reference in test_ddp.py can be built from the same batches.
"""
import os
import sys
import warnings

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.dirname(__file__))
from lightning_helpers import DigitsModule, encodings, shard_loader  # noqa: E402

from qat_plugin.calibration import HistogramObserver, MinMaxObserver  # noqa: E402
from qat_plugin.calibration.observers import all_reduce_observer  # noqa: E402
from qat_plugin.callbacks import QuantizationAwareTraining  # noqa: E402
from qat_plugin.precision import fp16_mixed_precision  # noqa: E402

BATCH, BATCHES, EPOCHS = 16, 4, 3  # per rank: 4 batches of 16 per epoch, 12 steps
QAT = dict(quant_scheme="tf", calibration_batches=2, learn_ranges=True,
           annealing=dict(start_step=0, end_step=6, every_n_steps=2, stat_batches=2, alpha0=0.5))
PARTS = ("learned", "resumed", "fixed", "simulated", "bf16", "fp16", "empty", "ptq")


def run_config(part):
    """(callback arguments, extra Trainer arguments) of a part, fresh objects on every call."""
    extra_qat, extra_trainer = {
        "learned": ({}, {}),
        "resumed": ({}, {}),
        "fixed": (dict(learn_ranges=False), {}),
        "simulated": (dict(bn_folding="simulated", freeze_bn_step=5), {}),
        "bf16": ({}, dict(precision="bf16-mixed")),
        "fp16": ({}, dict(plugins=[fp16_mixed_precision("cpu", init_scale=2.0**10)])),
    }[part]
    return {**QAT, **extra_qat}, extra_trainer


#: optimizer steps after which the model's state is kept: learned-range QAT is chaotic in float
#: rounding (see test_ddp.py), so a single-process run on the concatenated batches is compared
#: step by step before the first rounding flip, and only loosely at the end.
EARLY_STEPS = (1, 2, 3)


class EarlyStates(pl.Callback):
    """The module's state after each of ``EARLY_STEPS`` optimizer steps."""

    def __init__(self):
        self.states = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in EARLY_STEPS and step not in self.states:
            self.states[step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class Recorder(EarlyStates):
    """Encodings after calibration and after every annealing update, the inputs seen, and the
    early states."""

    def __init__(self, qat):
        super().__init__()
        self.qat, self.records = qat, {"updates": {}}

    def on_train_start(self, trainer, pl_module):
        self.records["calibrated"] = encodings(self.qat.sim)
        self.records["local_input_mean"] = float(next(iter(trainer.train_dataloader))[0].mean())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        ann = self.qat.annealer
        if ann.updates and ann.updates not in self.records["updates"]:
            self.records["updates"][ann.updates] = encodings(self.qat.sim)


def fit(part, out, rank, ckpt_path=None, save=False):
    qat_kwargs, extra_trainer = run_config(part)
    torch.manual_seed(0)
    qat = QuantizationAwareTraining(**qat_kwargs)
    rec = Recorder(qat)
    callbacks = [qat, rec]
    if save:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_top_k=-1,
                                                      every_n_epochs=1, filename="{step}"))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS, logger=False,
                         enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                         deterministic=True, callbacks=callbacks, **extra_trainer)
    module = DigitsModule(lr=0.05)
    trainer.fit(module, shard_loader(rank, BATCH, BATCHES), ckpt_path=ckpt_path)
    rec.records.update(state=module.state_dict(), callback=qat.state_dict(), applied_steps=qat.applied_steps,
                       requires_grad={k: q.scale.requires_grad for k, q in qat.sim.quantizers().items()},
                       early=rec.states)
    torch.save(rec.records, os.path.join(out, f"{part}_rank{rank}.pt"))


def empty_rank(out, rank):
    """Rank 1 saw nothing: it must take part with empty statistics (no hang, no error)."""
    got = {}
    for make in (lambda: MinMaxObserver(name="x"), lambda: HistogramObserver(num_bins=8, name="x")):
        obs = make()
        if rank == 0:
            obs.observe(torch.tensor([-1.0, 0.5, 3.0]))
        all_reduce_observer(obs)
        got[type(obs).__name__] = obs.state_dict()
    none = HistogramObserver(num_bins=8, name="none")  # no rank saw data
    all_reduce_observer(none)
    got["none_has_data"] = none.has_data()
    torch.save(got, os.path.join(out, f"empty_rank{rank}.pt"))


def ptq_rank(out, rank):
    """The PTQ steps with different data on each rank: every rank must end with the same learned
    integers, corrected biases and encodings."""
    import torch.distributed as dist
    from torch import nn

    from qat_plugin import QuantSimModel
    from qat_plugin.ptq import PTQConfig

    assert dist.is_initialized() and dist.get_world_size() == 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    data = [torch.randn(8, 3, 1, 1, generator=g) + 0.3 * torch.randn(8, 3, 6, 6, generator=g) for _ in range(2)]
    sim = QuantSimModel(model, data[0], default_param_bw=4, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: [m(x) for x in data])
    report = PTQConfig(adaround={"num_iterations": 30, "progress": False},
                       bias_correction={"progress": False}).apply(sim, data)
    torch.save({"state": sim.model.state_dict(), "encodings": encodings(sim), "bias": report["bias_correction"],
                "adaround": [(l.name, l.mse_adaround) for l in report["adaround"].layers]},
               os.path.join(out, f"ptq_rank{rank}.pt"))


def main(out, parts):
    warnings.filterwarnings("ignore")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    rank = int(os.environ.get("LOCAL_RANK", 0))
    for part in parts:
        if part == "empty":
            empty_rank(out, rank)
        elif part == "ptq":
            ptq_rank(out, rank)
        elif part == "resumed":
            fit(part, out, rank, ckpt_path=os.path.join(out, "ckpt", f"step={BATCHES}.ckpt"))
        else:
            fit(part, out, rank, save=part == "learned")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
