"""EncodingAnnealer and the observers it uses, without Lightning: statistics from training-mode
passes only, non-finite activations counted (one warning), a window's statistics in the state
dict, observer state round trips, and the run-length default window."""
import warnings

import pytest
import torch

from qat_plugin import QuantSimModel
from qat_plugin.annealing import AnnealingConfig, EncodingAnnealer
from qat_plugin.calibration import HistogramObserver, MinMaxObserver
from qat_plugin.calibration.observers import all_reduce_observer
from qat_plugin.errors import CalibrationError, QuantConfigError

from helpers import ConvFc

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")


def _sim():
    torch.manual_seed(0)
    model = ConvFc()
    x = torch.randn(8, 1, 4, 4)
    sim = QuantSimModel(model, x[:2], quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x))
    return sim, x


def _window(sim, batches, cfg=AnnealingConfig(start_step=0, end_step=4, every_n_steps=2, stat_batches=2, alpha0=1.0)):
    """Run one statistics window (2 steps) of ``batches``: ``[(tensor, training), ...]`` per step."""
    annealer = EncodingAnnealer(sim, cfg)
    metrics = {}
    for step in batches:
        annealer.before_batch()
        for x, training in step:
            sim.model.train(training)
            with torch.no_grad():
                sim.model(x)
        sim.model.train()
        metrics = annealer.after_step(True)
    return annealer, metrics, {k: q.encoding.scale.clone() for k, q in sim.quantizers().items()}


def test_validation_passes_do_not_feed_the_statistics():
    sim_a, x = _sim()
    sim_b, _ = _sim()
    _, _, plain = _window(sim_a, [[(x, True)], [(x * 0.5, True)]])
    _, _, with_eval = _window(sim_b, [[(x, True), (x * 100, False)], [(x * 0.5, True)]])
    assert plain.keys() == with_eval.keys()
    assert all(torch.equal(plain[k], with_eval[k]) for k in plain)
    _, _, polluted = _window(_sim()[0], [[(x, True), (x * 100, True)], [(x * 0.5, True)]])
    assert not torch.equal(polluted["x_input"], plain["x_input"])  # the same pass in train mode does count


def test_non_finite_activations_are_counted_and_warned_once():
    sim, x = _sim()
    bad = x.clone()
    bad[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    cfg = AnnealingConfig(start_step=0, end_step=8, every_n_steps=2, stat_batches=2, alpha0=0.5)
    annealer = EncodingAnnealer(sim, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):  # two windows, each with one bad batch
            annealer.before_batch()
            sim.model(bad if step % 2 == 0 else x)
            metrics = annealer.after_step(True)
    nan_warnings = [w for w in caught if "NaN/Inf activations" in str(w.message)]
    assert len(nan_warnings) == 1 and "x_input" in str(nan_warnings[0].message)
    assert annealer.nonfinite["x_input"] == 6 and 2 * metrics["nonfinite"] == sum(annealer.nonfinite.values())
    assert all(torch.isfinite(q.encoding.scale).all() for q in sim.quantizers().values())
    assert annealer.updates == 2 and annealer.state_dict()["nonfinite"] == annealer.nonfinite
    with pytest.raises(CalibrationError, match="x_input"):  # calibration still refuses NaN
        sim.compute_encodings(lambda m, _: m(bad))


def test_state_dict_carries_an_unfinished_window():
    """A checkpoint taken inside a statistics window resumes with that window's statistics."""
    cfg = AnnealingConfig(start_step=0, end_step=4, every_n_steps=2, stat_batches=2, alpha0=1.0)
    sim_a, x = _sim()
    straight, _, enc_a = _window(sim_a, [[(x, True)], [(x * 0.5, True)]], cfg)
    sim_b, _ = _sim()
    first = EncodingAnnealer(sim_b, cfg)
    first.before_batch()
    sim_b.model(x)
    first.after_step(True)
    state = first.state_dict()
    assert state["window"]["x_input"]["counts"].sum() == x.numel()
    second = EncodingAnnealer(sim_b, cfg)
    first._stop_monitors()
    second.load_state_dict(state)
    second.before_batch()
    sim_b.model(x * 0.5)
    second.after_step(True)
    assert second.updates == straight.updates == 1
    assert all(torch.equal(enc_a[k], q.encoding.scale) for k, q in sim_b.quantizers().items())


@pytest.mark.parametrize("make", [lambda: MinMaxObserver(axis=0, name="m"),
                                  lambda: HistogramObserver(num_bins=16, axis=0, name="h")])
def test_observer_state_round_trip_and_single_process_all_reduce(make):
    a, b = make(), make()
    a.observe(torch.randn(3, 10))
    b.load_state_dict(a.state_dict())
    a.observe(torch.randn(3, 10) * 2)
    b2 = make()
    b2.load_state_dict(b.state_dict())
    all_reduce_observer(b2)  # no process group: a no-op
    assert {k: v.tolist() if torch.is_tensor(v) else v for k, v in b2.state_dict().items()} == \
        {k: v.tolist() if torch.is_tensor(v) else v for k, v in b.state_dict().items()}


def test_for_run_window():
    assert AnnealingConfig.for_run(92) == AnnealingConfig(start_step=0, end_step=92, every_n_steps=5, stat_batches=2)
    assert AnnealingConfig.for_run(400).every_n_steps == 20
    assert AnnealingConfig.for_run(5, alpha0=0.3).alpha0 == 0.3
    with pytest.raises(QuantConfigError, match="total_steps"):
        AnnealingConfig.for_run(0)
