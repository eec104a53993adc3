"""A fit stopped at an epoch boundary and resumed from its checkpoint ends bit-identical to one that
runs straight through: weights, encodings, BatchNorm statistics, optimizer and callback state.

The annealing window is placed so that the checkpoints (every 2 steps) fall before the window,
inside a statistics window, between windows, on an update step, on the freeze step and after it.
"""
import glob

import pytest
import pytorch_lightning as pl
import torch

from qat_plugin.callbacks import QuantizationAwareTraining
from lightning_helpers import DigitsModule, ordered_loaders

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
              pytest.mark.filterwarnings("ignore:.*bf16.*")]

EPOCH = 2  # batches per epoch: a checkpoint after every 2 applied steps
EPOCHS = 7
# window (2, 10], updates after steps 5 and 8, statistics from steps 4-5 and 7-8, freeze at 10
ANNEALING = dict(start_step=2, end_step=10, every_n_steps=3, stat_batches=2, alpha0=0.5)
STOPS = {"before the window": 2, "inside a statistics window": 4, "between windows": 6,
         "on an update step": 8, "on the freeze step": 10, "after the freeze": 12}


def _fit(tmp_path, name, qat_kwargs, precision, ckpt_path=None, save=False):
    torch.manual_seed(0)
    train, val = ordered_loaders(EPOCH)
    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2, **qat_kwargs)
    callbacks = [qat]
    if save:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / name), save_top_k=-1, every_n_epochs=1,
                                                      filename="{step}"))
    t = pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, max_epochs=EPOCHS,
                   callbacks=callbacks, logger=False, enable_checkpointing=save, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, deterministic=True,
                   precision=precision)
    module = DigitsModule(lr=0.05)
    t.fit(module, train, val, ckpt_path=ckpt_path)
    return module, qat, t


def _checkpoints(tmp_path, name):
    return {int(p.split("step=")[1].split(".")[0]): p for p in glob.glob(str(tmp_path / name / "*.ckpt"))}


def _assert_identical(a, b):
    (ma, qa, ta), (mb, qb, tb) = a, b
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    diff = {k: float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if not torch.equal(sa[k], sb[k])}
    assert not diff, diff
    assert qa.state_dict() == qb.state_dict()
    oa, ob = ta.optimizers[0].state_dict()["state"], tb.optimizers[0].state_dict()["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[i]["momentum_buffer"], ob[i]["momentum_buffer"]) for i in oa)


CASES = {
    # (learn_ranges, precision, extra callback arguments, stops resumed from)
    "fp32 learned ranges": (True, "32-true", {}, sorted(STOPS.values())),
    "bf16 fixed ranges": (False, "bf16-mixed", {}, [STOPS["inside a statistics window"], STOPS["on an update step"]]),
    "simulated BN frozen at step 7": (True, "32-true", dict(bn_folding="simulated", freeze_bn_step=7),
                                      [STOPS["inside a statistics window"], STOPS["on an update step"]]),
}


@pytest.mark.parametrize("case", CASES)
def test_resume_equals_uninterrupted(tmp_path, case):
    learn, precision, extra, stops = CASES[case]
    kwargs = dict(annealing=ANNEALING, learn_ranges=learn, **extra)
    straight = _fit(tmp_path, "straight", kwargs, precision, save=True)
    ckpts = _checkpoints(tmp_path, "straight")
    assert sorted(ckpts) == [EPOCH * (e + 1) for e in range(EPOCHS)]
    assert straight[1].annealer.updates == 2 and straight[1].annealer.frozen
    for stop in stops:
        resumed = _fit(tmp_path, f"resumed{stop}", kwargs, precision, ckpt_path=ckpts[stop])
        _assert_identical(straight, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("learn", [False, True])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("bn", [{}, dict(bn_folding="simulated", freeze_bn_step=7)])
def test_resume_equals_uninterrupted_everywhere(tmp_path, learn, precision, bn):
    """The whole matrix: every stop point, learned and fixed ranges, fp32 and bf16, BN folding."""
    kwargs = dict(annealing=ANNEALING, learn_ranges=learn, **bn)
    straight = _fit(tmp_path, "straight", kwargs, precision, save=True)
    ckpts = _checkpoints(tmp_path, "straight")
    for stop in sorted(STOPS.values()):
        _assert_identical(straight, _fit(tmp_path, f"resumed{stop}", kwargs, precision, ckpt_path=ckpts[stop]))
