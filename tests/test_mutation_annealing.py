"""Annealing behaviour that the mutation run of ``annealing.py`` found unpinned: the config's
defaults and bounds, the schedule's numbers, which steps update and which feed statistics, the
blend toward the SQNR-optimal range (against a reference built from the same activations), weight
annealing, freezing, skipped steps and the checkpoint fields."""
import math

import pytest
import torch

from qat_plugin import QuantSimModel
from qat_plugin.annealing import SCHEDULES, AnnealingConfig, EncodingAnnealer
from qat_plugin.calibration import HistogramObserver
from qat_plugin.calibration.range_setting import encoding_sqnr, sqnr_search
from qat_plugin.encoding import Encoding
from qat_plugin.errors import QuantConfigError

from helpers import ConvFc

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")


def _sim(learnable=False):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 4, 4)
    sim = QuantSimModel(ConvFc(), x[:2], quant_scheme="tf", learnable=learnable)
    sim.compute_encodings(lambda m, _: m(x))
    return sim, x


def _steps(annealer, sim, batches, applied=True):
    metrics = []
    for x in batches:
        annealer.before_batch()
        sim.model(x)
        metrics.append(annealer.after_step(applied))
    return metrics


def _blended(enc, hist, alpha):
    """The documented update, from the reference histogram: (1 - a) * range + a * SQNR range (the
    quantizer then stores the scale in float32)."""
    best = sqnr_search(hist, enc.bitwidth, enc.symmetric)
    target = Encoding.from_min_max(best.min.reshape(enc.scale.shape), best.max.reshape(enc.scale.shape),
                                   enc.bitwidth, enc.symmetric, enc.axis)
    (lo, hi), (tlo, thi) = enc.range(), target.range()
    return Encoding.from_min_max((1 - alpha) * lo + alpha * tlo, (1 - alpha) * hi + alpha * thi,
                                 enc.bitwidth, enc.symmetric, enc.axis)


# ---- the config ------------------------------------------------------------------------------
def test_config_defaults():
    cfg = AnnealingConfig()
    assert (cfg.start_step, cfg.end_step, cfg.every_n_steps, cfg.alpha0, cfg.schedule, cfg.stat_batches,
            cfg.include_weights, cfg.freeze_ranges) == (0, 200, 10, 0.1, "cosine", 2, False, True)
    assert SCHEDULES == ("cosine", "linear")


@pytest.mark.parametrize("fields", [dict(alpha0=1.0), dict(start_step=0, end_step=1), dict(every_n_steps=1, stat_batches=1),
                                    dict(every_n_steps=3, stat_batches=3), dict(schedule="linear")])
def test_config_accepts_the_bounds(fields):
    AnnealingConfig(**fields)


@pytest.mark.parametrize("fields, message", [
    (dict(schedule="cosin"), "unknown annealing schedule 'cosin'. Did you mean 'cosine'"),
    (dict(alpha0=0.0), r"alpha0 must be in \(0, 1\], got 0.0"), (dict(alpha0=1.01), "alpha0 must be in"),
    (dict(start_step=-1, end_step=5), r"need 0 <= start_step < end_step, got -1, 5"),
    (dict(start_step=5, end_step=5), "got 5, 5"),
    (dict(every_n_steps=0, stat_batches=0), r"need every_n_steps >= 1 and 1 <= stat_batches <= every_n_steps, got 0, 0"),
    (dict(every_n_steps=4, stat_batches=0), "got 4, 0"), (dict(every_n_steps=2, stat_batches=3), "got 2, 3")])
def test_config_rejects(fields, message):
    with pytest.raises(QuantConfigError, match=message):
        AnnealingConfig(**fields)


def test_for_run():
    assert AnnealingConfig.for_run(92) == AnnealingConfig(start_step=0, end_step=92, every_n_steps=5, stat_batches=2)
    assert AnnealingConfig.for_run(3) == AnnealingConfig(start_step=0, end_step=3, every_n_steps=1, stat_batches=1)
    assert AnnealingConfig.for_run(30, updates=4).every_n_steps == 8  # round(7.5) = 8
    assert AnnealingConfig.for_run(1, updates=1).end_step == 1
    assert AnnealingConfig.for_run(50, start_step=10, schedule="linear") == \
        AnnealingConfig(start_step=10, end_step=50, every_n_steps=2, stat_batches=2, schedule="linear")
    for bad in (dict(total_steps=0), dict(total_steps=5, updates=0)):
        with pytest.raises(QuantConfigError, match=r"need total_steps >= 1 and updates >= 1, got"):
            AnnealingConfig.for_run(**bad)


@pytest.mark.parametrize("schedule, expected", [
    ("cosine", [0.4, 0.4, 0.4 * (1 + math.cos(math.pi / 4)) / 2, 0.2, 0.4 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0, 0.0]),
    ("linear", [0.4, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0])])
def test_alpha_schedule(schedule, expected):
    cfg = AnnealingConfig(start_step=4, end_step=12, every_n_steps=2, alpha0=0.4, schedule=schedule)
    got = [cfg.alpha(t) for t in (0, 4, 6, 8, 10, 12, 20)]  # clamped before and after the window
    assert got == pytest.approx(expected, abs=1e-15)


def test_update_and_monitored_steps():
    cfg = AnnealingConfig(start_step=2, end_step=10, every_n_steps=3, stat_batches=2)
    assert [t for t in range(15) if cfg.is_update_step(t)] == [5, 8]
    assert [t for t in range(15) if cfg.is_monitored_step(t)] == [4, 5, 7, 8, 10]
    one = AnnealingConfig(start_step=0, end_step=4, every_n_steps=2, stat_batches=1)
    assert [t for t in range(8) if one.is_update_step(t)] == [2, 4]
    assert [t for t in range(8) if one.is_monitored_step(t)] == [2, 4]


# ---- the annealer --------------------------------------------------------------------------------
def test_update_blends_toward_the_sqnr_range():
    """alpha0 = 0.5, linear, update after step 2 (alpha 0.5 * (1 - 2/4) = 0.25) from the two batches'
    histogram; the x_input site sees the batches themselves, so the reference histogram is exact."""
    sim, x = _sim()
    cfg = AnnealingConfig(start_step=0, end_step=4, every_n_steps=2, stat_batches=2, alpha0=0.5, schedule="linear")
    annealer = EncodingAnnealer(sim, cfg)
    q = sim.quantizers()["x_input"]
    before = {k: qq.encoding for k, qq in sim.quantizers().items()}
    batches = [x * 3, x + 1]
    metrics = _steps(annealer, sim, batches)
    assert metrics[0] == {} and annealer.step == 2 and annealer.updates == 1
    ref = HistogramObserver(num_bins=512)
    for b in batches:
        ref.observe(b)
    want = _blended(before["x_input"], ref.hist, 0.25)
    assert torch.equal(q.encoding.scale, want.scale.float().double()) and torch.equal(q.encoding.offset, want.offset)
    assert not torch.equal(want.scale, before["x_input"].scale)
    m = metrics[1]
    assert m["alpha"] == 0.25
    assert m["sqnr_db/x_input"] == pytest.approx(float(encoding_sqnr(ref.hist, want).mean()), rel=1e-12)
    site_keys = {k for k in m if k.startswith("sqnr_db/")}
    activations = {k for k in sim.quantizers() if sim.plan.site(k).kind != "param"}
    assert site_keys == {f"sqnr_db/{k}" for k in activations}
    assert m["sqnr_db_min"] == min(m[k] for k in site_keys) and "nonfinite" not in m
    # weights are left alone without include_weights
    for k in sim.quantizers():
        if sim.plan.site(k).kind == "param":
            assert torch.equal(sim.quantizers()[k].encoding.scale, before[k].scale)


def test_include_weights_anneals_weight_encodings_per_channel():
    sim, x = _sim()
    cfg = AnnealingConfig(start_step=0, end_step=4, every_n_steps=1, stat_batches=1, alpha0=1.0, include_weights=True)
    annealer = EncodingAnnealer(sim, cfg)
    w = sim.quantizers()["conv.weight"]
    before = w.encoding
    metrics = _steps(annealer, sim, [x])[0]  # alpha(1) = 0.5 * (1 + cos(pi / 4))
    alpha = 0.5 * (1 + math.cos(math.pi / 4))
    ref = HistogramObserver(num_bins=256, axis=w.axis)
    ref.observe(sim.weight_of("conv.weight"))
    want = _blended(before, ref.hist, alpha)
    assert w.encoding.axis == before.axis and w.encoding.scale.shape == before.scale.shape
    assert torch.equal(w.encoding.scale, want.scale.float().double()) and torch.equal(w.encoding.offset, want.offset)
    assert metrics["sqnr_db/conv.weight"] == pytest.approx(float(encoding_sqnr(ref.hist, want).mean()), rel=1e-12)
    assert "sqnr_db/fc.weight" in metrics


def test_skipped_steps_move_nothing():
    sim, x = _sim()
    annealer = EncodingAnnealer(sim, AnnealingConfig(start_step=0, end_step=2, every_n_steps=1, stat_batches=1))
    before = {k: q.encoding.scale.clone() for k, q in sim.quantizers().items()}
    assert _steps(annealer, sim, [x, x], applied=False) == [{}, {}]
    assert annealer.step == 0 and annealer.updates == 0 and not annealer.frozen
    assert all(torch.equal(before[k], q.encoding.scale) for k, q in sim.quantizers().items())


@pytest.mark.parametrize("freeze_ranges", [True, False])
def test_freeze_at_the_window_end(freeze_ranges):
    sim, x = _sim(learnable=True)
    cfg = AnnealingConfig(start_step=0, end_step=3, every_n_steps=1, stat_batches=1, alpha0=0.5,
                          freeze_ranges=freeze_ranges)
    annealer = EncodingAnnealer(sim, cfg)
    metrics = _steps(annealer, sim, [x, x, x])
    assert annealer.frozen and annealer.updates == 3 and metrics[2]["alpha"] == pytest.approx(0.0, abs=1e-17)
    assert all(q.learnable != freeze_ranges for q in sim.quantizers().values())
    after = {k: q.encoding.scale.clone() for k, q in sim.quantizers().items()}
    assert _steps(annealer, sim, [x * 5, x * 5]) == [{}, {}] and annealer.updates == 3  # no update after the end
    assert all(torch.equal(after[k], q.encoding.scale) for k, q in sim.quantizers().items())
    assert annealer.state_dict()["window"] is None


def test_custom_freeze_function_and_alpha_zero_leaves_the_encoding():
    sim, x = _sim(learnable=True)
    calls = []
    cfg = AnnealingConfig(start_step=0, end_step=2, every_n_steps=2, stat_batches=1, alpha0=0.5)
    annealer = EncodingAnnealer(sim, cfg, freeze_ranges_fn=lambda: calls.append(annealer.step))
    before = {k: q.encoding.scale.clone() for k, q in sim.quantizers().items()}
    metrics = _steps(annealer, sim, [x, x * 4])
    assert calls == [2] and all(q.learnable for q in sim.quantizers().values())
    assert metrics[1]["alpha"] == 0.0 and "sqnr_db/x_input" in metrics[1]  # measured, not moved
    assert all(torch.equal(before[k], q.encoding.scale) for k, q in sim.quantizers().items())


def test_default_config_and_monitors_only_on_statistics_steps():
    sim, x = _sim()
    annealer = EncodingAnnealer(sim)
    assert annealer.config == AnnealingConfig() and annealer.step == 0 and annealer.nonfinite == {}
    activations = {k for k in sim.quantizers() if sim.plan.site(k).kind != "param"}
    windows = []
    for _ in range(11):
        annealer.before_batch()
        windows.append(annealer.state_dict()["window"])
        sim.model(x)
        annealer.after_step()
    assert [t for t, w in enumerate(windows, 1) if w] == [9, 10]  # the 2 batches before the update at 10
    assert set(windows[8]) == activations
    assert annealer.updates == 1


def test_disabled_quantizers_are_not_annealed():
    sim, x = _sim()
    sim.quantizers()["x_input"].enabled = False
    annealer = EncodingAnnealer(sim, AnnealingConfig(start_step=0, end_step=2, every_n_steps=1, stat_batches=1,
                                                     include_weights=True))
    metrics = _steps(annealer, sim, [x])[0]
    assert "sqnr_db/x_input" not in metrics and "sqnr_db/conv.weight" in metrics


def test_state_dict_fields_and_frozen_restore():
    sim, x = _sim(learnable=True)
    cfg = AnnealingConfig(start_step=0, end_step=2, every_n_steps=1, stat_batches=1, alpha0=0.5)
    a = EncodingAnnealer(sim, cfg)
    _steps(a, sim, [x, x])
    state = a.state_dict()
    assert state == {"step": 2, "updates": 2, "frozen": True, "config": dict(
        start_step=0, end_step=2, every_n_steps=1, alpha0=0.5, schedule="cosine", stat_batches=1,
        include_weights=False, freeze_ranges=True), "nonfinite": {}, "window": None}
    sim_b, _ = _sim(learnable=True)
    b = EncodingAnnealer(sim_b, cfg)
    b.load_state_dict(dict(state, nonfinite={"x_input": 3}))
    assert (b.step, b.updates, b.frozen, b.nonfinite) == (2, 2, True, {"x_input": 3})
    assert not any(q.learnable for q in sim_b.quantizers().values())  # frozen on load
    c = EncodingAnnealer(_sim()[0], cfg)
    c.load_state_dict({k: v for k, v in state.items() if k != "nonfinite"} | {"frozen": False})
    assert not c.frozen and c.nonfinite == {}


def test_a_fresh_annealer_checkpoints_plain_defaults():
    sim, _ = _sim()
    state = EncodingAnnealer(sim).state_dict()
    assert state == {"step": 0, "updates": 0, "frozen": False, "config": dict(
        start_step=0, end_step=200, every_n_steps=10, alpha0=0.1, schedule="cosine", stat_batches=2,
        include_weights=False, freeze_ranges=True), "nonfinite": {}, "window": None}
    assert state["frozen"] is False
