"""The Lightning callback: fit, annealing, resume, AMP with loss scaling, logging, defaults, errors."""
import glob

import pytest
import pytorch_lightning as pl
import torch

from qat_plugin import QuantizeDequantize
from qat_plugin.annealing import AnnealingConfig
from qat_plugin.callbacks import QuantizationAwareTraining
from qat_plugin.errors import QuantConfigError
from qat_plugin.precision import fp16_mixed_precision
from lightning_helpers import DigitsModule, encodings, loaders, trainer
from lightning_helpers import same_encodings as same

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec.*")]


class Probe(pl.Callback):
    """Records encodings and the annealing step after every training batch."""

    def __init__(self, qat):
        self.qat, self.history = qat, []

    def on_train_start(self, trainer, pl_module):
        self.at_start = encodings(self.qat.sim)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ann = self.qat.annealer
        self.history.append((trainer.global_step, encodings(self.qat.sim), ann.step if ann else None,
                             ann.updates if ann else None))


def test_fit_quantizes_calibrates_and_validates_through_the_simulation(tmp_path):
    train, val = loaders()
    module = DigitsModule()
    qat = QuantizationAwareTraining(quant_scheme="tf", param_quant_scheme="tf_enhanced", calibration_batches=4)
    t = trainer(tmp_path, 30, [qat])
    t.fit(module, train, val)
    assert module.net is qat.sim.model
    assert (qat.sim.quant_scheme, qat.sim.param_quant_scheme) == ("tf", "tf_enhanced")
    assert any(isinstance(m, QuantizeDequantize) for m in module.net.modules())
    assert all(q.is_initialized() for q in qat.sim.quantizers().values())
    assert qat.applied_steps == 30
    assert t.callback_metrics["val_acc"] > 0.5


def test_optimizer_holds_learnable_ranges(tmp_path):
    train, val = loaders()
    module = DigitsModule()
    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2, learn_ranges=True, freeze_ranges_step=5,
                                    annealing=False)
    t = trainer(tmp_path, 8, [qat])
    probe = Probe(qat)
    t.callbacks.append(probe)
    t.fit(module, train, val)
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    q = qat.sim.quantizers()["x_input"]
    assert id(q.scale) in opt_params
    moved = [not torch.equal(probe.history[i][1]["x_input"][0], probe.history[i + 1][1]["x_input"][0]) for i in range(7)]
    assert any(moved[:4]) and not any(moved[5:])  # learned until step 5, frozen after
    assert qat.ranges_frozen and not q.scale.requires_grad


def test_annealing_moves_encodings_on_schedule_then_freezes(tmp_path):
    train, val = loaders()
    cfg = AnnealingConfig(start_step=0, end_step=12, every_n_steps=4, alpha0=0.8, stat_batches=2)
    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2, annealing=cfg)
    probe = Probe(qat)
    t = trainer(tmp_path, 20, [qat, probe])
    t.fit(DigitsModule(), train, val)
    hist = probe.history
    changed = [i + 1 for i in range(len(hist) - 1) if not same(hist[i][1], hist[i + 1][1])]
    # updates after applied steps 4 and 8; at step 12 alpha is 0 (cosine) so nothing moves
    assert changed == [3, 7]  # history index i is applied step i+1
    assert qat.annealer.updates == 3 and qat.annealer.frozen
    assert same(hist[11][1], hist[-1][1])  # frozen after the window


def test_resume_mid_qat_restores_encodings_and_continues_the_schedule(tmp_path):
    cfg = dict(start_step=0, end_step=16, every_n_steps=4, alpha0=0.5, stat_batches=1)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=6, save_top_k=-1)
    train, val = loaders()
    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2, annealing=cfg, learn_ranges=True)
    t = trainer(tmp_path, 6, [qat, ckpt_cb], enable_checkpointing=True)
    t.fit(DigitsModule(), train, val)
    saved = encodings(qat.sim)
    (path,) = glob.glob(str(tmp_path / "ckpt" / "*.ckpt"))
    ckpt = torch.load(path, weights_only=True)  # the callback's state is plain values
    state = ckpt["callbacks"][qat.state_key]
    assert state["applied_steps"] == 6 and state["annealer"]["step"] == 6 and state["annealer"]["updates"] == 1

    qat2 = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2, annealing=cfg, learn_ranges=True)
    probe = Probe(qat2)
    t2 = trainer(tmp_path, 20, [qat2, probe])
    t2.fit(DigitsModule(), train, val, ckpt_path=path)
    assert same(probe.at_start, saved)  # identical encodings, no re-calibration
    assert qat2.applied_steps == 20 and qat2.annealer.step == 20
    assert qat2.annealer.updates == 4 and qat2.annealer.frozen  # steps 4 (before), 8, 12, 16


def test_fp16_overflow_step_moves_nothing(tmp_path):
    train, val = loaders()
    cfg = AnnealingConfig(start_step=0, end_step=50, every_n_steps=1, alpha0=0.5, stat_batches=1)
    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2, annealing=cfg, learn_ranges=True)
    probe = Probe(qat)
    module = DigitsModule(lr=0.01, inf_at_step=3)
    t = trainer(tmp_path, 6, [qat, probe], plugins=[fp16_mixed_precision("cpu", init_scale=2.0**8)])
    t.fit(module, train, val)
    steps = [h[0] for h in probe.history]
    # global_step counts the skipped step too; the schedule (annealer.step) does not
    skipped = [i for i in range(1, len(probe.history)) if probe.history[i][2] == probe.history[i - 1][2]]
    assert skipped == [3], steps
    assert same(probe.history[2][1], probe.history[3][1])  # encodings and learned ranges unchanged
    assert not same(probe.history[3][1], probe.history[4][1])  # and they move again after
    assert t.precision_plugin.scaler.get_scale() < 2.0**8


def test_quantizer_outputs_stay_fp32_math_under_fp16(tmp_path):
    train, val = loaders()
    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2, default_output_bw=16)
    t = trainer(tmp_path, 3, [qat], plugins=[fp16_mixed_precision("cpu")])
    t.fit(DigitsModule(lr=0.01), train, val)
    x = next(iter(train))[0]
    q = qat.sim.quantizers()["x_input"]
    with torch.autocast("cpu", dtype=torch.float16):
        out = q(x.half())
    assert out.dtype == torch.float32  # 16-bit grid never passes through fp16


def test_bf16_mixed_run(tmp_path):
    train, val = loaders()
    qat = QuantizationAwareTraining(quant_scheme="tf_enhanced", calibration_batches=2, annealing=dict(end_step=8, every_n_steps=2, stat_batches=1))
    t = trainer(tmp_path, 10, [qat], precision="bf16-mixed")
    t.fit(DigitsModule(), train, val)
    assert qat.annealer.updates == 4 and qat.annealer.frozen
    assert torch.isfinite(t.callback_metrics["train_loss"])


def test_tensorboard_holds_annealing_and_sqnr_tags(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, val = loaders()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2, log_every_n_steps=2,
                                    annealing=dict(end_step=8, every_n_steps=2, stat_batches=1, include_weights=True))
    t = trainer(tmp_path, 8, [qat], logger=logger, plugins=[fp16_mixed_precision("cpu")], log_every_n_steps=1)
    t.fit(DigitsModule(lr=0.01), train, val)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"qat/alpha", "qat/sqnr_db_min", "qat/loss_scale", "qat/sqnr_db/x_input", "qat/scale/x_input",
            "qat/offset/x_input", "qat/sqnr_db/fc.weight"} <= tags
    assert [round(e.value, 4) for e in acc.Scalars("qat/alpha")] == [round(AnnealingConfig(end_step=8, every_n_steps=2).alpha(s), 4) for s in (2, 4, 6, 8)]
    assert any("worst_sqnr" in t for t in acc.Tags()["tensors"])


def test_validate_from_checkpoint_rebuilds_structure(tmp_path):
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "c"), save_last=True)
    train, val = loaders()
    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2)
    t = trainer(tmp_path, 5, [qat, ckpt_cb], enable_checkpointing=True)
    t.fit(DigitsModule(), train, val)
    expected = t.validate(t.lightning_module, val, verbose=False)[0]["val_acc"]
    qat2 = QuantizationAwareTraining(quant_scheme="tf")
    t2 = trainer(tmp_path, 5, [qat2])
    got = t2.validate(DigitsModule(), val, ckpt_path=str(tmp_path / "c" / "last.ckpt"), verbose=False)[0]["val_acc"]
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("kwargs, match", [
    ({"quant_scheme": "minmax"}, "Valid choices|Did you mean"),
    ({"annealing": {"alpha": 0.3}}, "Did you mean 'alpha0'"),
    ({"annealing": {"schedule": "cosin"}}, "Did you mean 'cosine'"),
    ({"annealing": 3}, "annealing must be"),
    ({"calibration_batches": 0}, "calibration_batches"),
    ({"default_param_bw": 1}, "default_param_bw"),
    ({"bn_folding": "simulate"}, "Did you mean 'simulated'"),
    ({"param_quant_scheme": "percentile"}, "weights take tf or tf_enhanced"),
    ({"log_every_n_steps": 0}, "log_every_n_steps must be an int >= 1"),
    ({"log_every_n_steps": 2.5}, "log_every_n_steps must be an int >= 1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(QuantConfigError, match=match):
        QuantizationAwareTraining(**kwargs)


def test_unknown_module_name(tmp_path):
    train, val = loaders()
    qat = QuantizationAwareTraining(module_name="nett")
    with pytest.raises(QuantConfigError, match="Did you mean 'net'"):
        trainer(tmp_path, 1, [qat]).fit(DigitsModule(), train, val)


def test_sanity_check_does_not_need_calibration(tmp_path):
    """Lightning's sanity-check validation runs before training: it must not fail."""
    train, val = loaders()
    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2)
    t = pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_steps=2, callbacks=[qat], logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=1)
    t.fit(DigitsModule(), train, val)
    assert all(q.enabled and q.is_initialized() for q in qat.sim.quantizers().values())


def test_calibration_dataloader_calibrates_before_the_sanity_check(tmp_path):
    train, val = loaders()
    seen = {}

    class Spy(pl.Callback):
        def on_sanity_check_end(self, trainer, pl_module):
            seen["calibrated"] = all(q.is_initialized() and q.enabled for q in qat.sim.quantizers().values())

    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2, calibration_dataloader=train)
    t = pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_steps=1, callbacks=[qat, Spy()],
                   logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=1)
    t.fit(DigitsModule(), train, val)
    assert seen == {"calibrated": True}


def test_validate_without_encodings_is_a_clear_error(tmp_path):
    _, val = loaders()
    from qat_plugin import NotCalibratedError
    with pytest.raises(NotCalibratedError, match="ckpt_path"):
        trainer(tmp_path, 1, [QuantizationAwareTraining()]).validate(DigitsModule(), val, verbose=False)


def test_freeze_bn_step_stops_statistics(tmp_path):
    train, val = loaders()
    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2, bn_folding="simulated", freeze_bn_step=4)
    means = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            means.append(pl_module.net.get_submodule("conv1").bn.running_mean.clone())

    t = trainer(tmp_path, 8, [qat, Spy()])
    t.fit(DigitsModule(lr=0.01), train, val)
    moved = [not torch.equal(means[i], means[i + 1]) for i in range(len(means) - 1)]
    assert all(moved[:3]) and not any(moved[3:])
    assert qat.bn_frozen and qat.state_dict()["bn_frozen"] is True
    with pytest.raises(QuantConfigError, match="bn_folding='simulated'"):
        QuantizationAwareTraining(freeze_bn_step=3)


def test_plain_dataloaders_need_no_example_input(tmp_path):
    """Given a module without example_input_array and plain loaders passed to fit, the callback
    traces with the first training samples, and reading them moves no random number generator:
    the shuffled training order is the one the same loader gives without the callback."""
    seen = {}

    class FirstBatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(trainer.lightning_module, batch[0].clone())

    def fit(callbacks, **kwargs):
        train, val = loaders(batch_size=32)
        module = DigitsModule()
        module.example_input_array = None
        trainer(tmp_path, 2, callbacks + [FirstBatch()], **kwargs).fit(module, train, val)
        return module

    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2, annealing=False)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "c"), save_last=True)
    with_qat, without = fit([qat, ckpt], enable_checkpointing=True), fit([])
    assert with_qat.net is qat.sim.model and all(q.is_initialized() for q in qat.sim.quantizers().values())
    assert torch.equal(seen[with_qat], seen[without])
    # validate with a plain loader too: the structure is traced from the validation samples
    module = DigitsModule()
    module.example_input_array = None
    expected = trainer(tmp_path, 2, [qat]).validate(with_qat, loaders()[1], verbose=False)[0]["val_acc"]
    got = trainer(tmp_path, 2, [QuantizationAwareTraining(quant_scheme="tf", annealing=False)]).validate(
        module, loaders()[1], ckpt_path=str(tmp_path / "c" / "last.ckpt"), verbose=False)[0]["val_acc"]
    assert got == expected


class _Metrics(pl.loggers.Logger):
    """Keeps every logged metric as (step, value) lists."""

    def __init__(self):
        super().__init__()
        self.metrics = {}

    name, version = "metrics", 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))


def test_default_anneals_over_the_run_logs_sqnr_and_resume_keeps_the_window(tmp_path):
    """QuantizationAwareTraining() anneals over the whole run (AnnealingConfig.for_run) and logs
    qat/alpha and per-site SQNR; a resumed, longer run keeps the window its checkpoint holds."""
    train, val = loaders()
    log = _Metrics()
    qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "c"), save_last=True)
    trainer(tmp_path, 10, [qat, ckpt], logger=log, enable_checkpointing=True).fit(DigitsModule(), train, val)
    cfg = AnnealingConfig.for_run(10)
    assert qat.annealer.config == cfg and (cfg.end_step, cfg.every_n_steps) == (10, 1)
    assert qat.annealer.updates == 10 and qat.annealer.frozen
    assert [v for _, v in log.metrics["qat/alpha"]] == pytest.approx([cfg.alpha(t) for t in range(1, 11)])
    sites = {k for k in log.metrics if k.startswith("qat/sqnr_db/")}
    assert "qat/sqnr_db/x_input" in sites and len(sites) == len(qat.annealer._activation_quantizers())

    qat2 = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2)
    trainer(tmp_path, 14, [qat2]).fit(DigitsModule(), train, val, ckpt_path=str(tmp_path / "c" / "last.ckpt"))
    assert qat2.annealer.config == cfg and qat2.annealer.updates == 10 and qat2.applied_steps == 14
