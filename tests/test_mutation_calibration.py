"""Calibration behaviour that the mutation run of ``calibration/`` found unpinned: the scheme ->
observer -> encoding plumbing, per-channel histogram counts, percentile bounds, the SQNR of a
given encoding, non-finite handling, state round trips, and the DDP merge (ranks run as threads
over a stand-in for ``torch.distributed``). References are numpy / float64 loops or exact counts."""
import math
import threading

import numpy as np
import pytest
import torch

from qat_plugin.calibration import (PARAM_QUANT_SCHEMES, QUANT_SCHEMES, HistogramObserver, MinMaxObserver,
                                    check_quant_scheme, encoding_from_observer, make_observer, param_scheme_for,
                                    percentile_range, sqnr_search)
from qat_plugin.calibration import observers
from qat_plugin.calibration.observers import Histogram, all_reduce_observer, rebin
from qat_plugin.calibration.range_setting import (SQNR_CLIP_WEIGHT, encoding_sqnr, expected_noise, grid_noise, grid_of,
                                                   sqnr_candidates)
from qat_plugin.encoding import Encoding
from qat_plugin.errors import CalibrationError, QuantConfigError


# ---- scheme names ----------------------------------------------------------------------------
def test_scheme_names_and_suggestions():
    assert QUANT_SCHEMES == ("tf", "tf_enhanced", "percentile") and PARAM_QUANT_SCHEMES == ("tf", "tf_enhanced")
    assert [check_quant_scheme(s) for s in QUANT_SCHEMES] == list(QUANT_SCHEMES)
    with pytest.raises(QuantConfigError, match="unknown quant_scheme 'tf_enhancd'. Did you mean 'tf_enhanced'"):
        check_quant_scheme("tf_enhancd")


@pytest.mark.parametrize("scheme, param_scheme, expected", [
    ("tf", None, "tf"), ("tf_enhanced", None, "tf_enhanced"), ("percentile", None, "tf"),
    ("percentile", "tf_enhanced", "tf_enhanced"), ("tf_enhanced", "tf", "tf"), ("tf", "tf_enhanced", "tf_enhanced")])
def test_param_scheme_for(scheme, param_scheme, expected):
    assert param_scheme_for(scheme, param_scheme) == expected


def test_param_scheme_for_rejects_percentile_weights_and_bad_names():
    with pytest.raises(QuantConfigError, match=r"unknown param_quant_scheme 'percentile' \(weights take tf or "
                                               r"tf_enhanced\)\."):
        param_scheme_for("tf", "percentile")
    with pytest.raises(QuantConfigError, match="unknown quant_scheme 'minmax'"):
        param_scheme_for("minmax", "tf")


@pytest.mark.parametrize("scheme, axis, kind, bins", [
    ("tf", None, MinMaxObserver, None), ("tf", 1, MinMaxObserver, None),
    ("tf_enhanced", None, HistogramObserver, 512), ("tf_enhanced", 0, HistogramObserver, 256),
    ("percentile", None, HistogramObserver, 2048), ("percentile", 0, HistogramObserver, 2048)])
def test_make_observer(scheme, axis, kind, bins):
    obs = make_observer(scheme, axis=axis, name="site")
    assert type(obs) is kind and obs.axis == axis and obs.name == "site" and not obs.count_nonfinite
    assert getattr(obs, "num_bins", None) == bins and not obs.has_data()


def test_make_observer_rejects_unknown_scheme():
    assert make_observer("tf").name == make_observer("percentile").name == ""
    with pytest.raises(QuantConfigError, match="Did you mean 'percentile'"):
        make_observer("percentil")


def test_observer_defaults():
    m, h = MinMaxObserver(), HistogramObserver()
    assert (m.axis, m.name, m.count_nonfinite, m.nonfinite, m.min, m.max) == (None, "", False, 0, None, None)
    assert (h.num_bins, h.axis, h.name, h.count_nonfinite, h.nonfinite, h.hist) == (512, None, "", False, 0, None)


# ---- observers ---------------------------------------------------------------------------------
def test_per_channel_histogram_counts_are_exact():
    """Channels along axis 1; values at bin centers, each channel's ends set by one value at its min
    and one at its max (the max lands in the last bin). Reference: bincount of the bin indices."""
    g = torch.Generator().manual_seed(0)
    bins, lows, widths = 8, [-3.0, 0.0, 10.0], [0.5, 0.25, 2.0]
    idx = torch.randint(0, bins, (3, 40), generator=g)
    rows = [torch.cat([torch.tensor([lo, lo + w * bins]), lo + (i.double() + 0.5) * w])
            for lo, w, i in zip(lows, widths, idx)]
    x = torch.stack(rows).float().T.reshape(2, 21, 3)  # (N..., C) with C on axis 2
    obs = HistogramObserver(num_bins=bins, axis=2)
    obs.observe(x)
    expected = [np.bincount(i.numpy(), minlength=bins) + np.eye(bins)[0] + np.eye(bins)[-1] for i in idx]
    assert obs.hist.counts.tolist() == np.stack(expected).tolist()
    assert obs.hist.lo.tolist() == lows and obs.hist.hi.tolist() == [lo + w * bins for lo, w in zip(lows, widths)]
    # the per-tensor path (torch.histc) gives the same counts for one channel
    one = HistogramObserver(num_bins=bins)
    one.observe(x[..., 1])
    assert one.hist.counts.tolist() == obs.hist.counts[1:2].tolist()


def test_per_channel_histogram_grows_per_channel():
    obs = HistogramObserver(num_bins=4, axis=0)
    obs.observe(torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.5, 4.0], [0.0, 1.0, 3.0, 5.0, 7.0, 8.0]]))
    obs.observe(torch.tensor([[1.0, 8.0], [1.0, 7.0]]))  # channel 0 grows to [0, 8], channel 1 stays
    assert obs.hist.lo.tolist() == [0.0, 0.0] and obs.hist.hi.tolist() == [8.0, 8.0]
    assert obs.hist.counts.tolist() == [[4.0, 3.0, 0.0, 1.0], [3.0, 1.0, 1.0, 3.0]]


def test_constant_input_gets_a_tiny_nonempty_range():
    obs = HistogramObserver(num_bins=16)
    obs.observe(torch.full((10,), 5.0))
    assert float(obs.hist.lo) == 5.0 and float(obs.hist.hi) == pytest.approx(5.0 + 5e-12, rel=0, abs=1e-14)
    obs.observe(torch.full((3,), 5.0))  # the same range: no re-binning
    assert float(obs.hist.counts.sum()) == 13.0 and float(obs.hist.hi) == pytest.approx(5.0 + 5e-12, rel=0, abs=1e-14)
    zero = HistogramObserver(num_bins=16)
    zero.observe(torch.zeros(4))
    assert float(zero.hist.hi) == pytest.approx(1e-12, rel=1e-9, abs=0)  # at least 1e-12 wide for |lo| < 1


@pytest.mark.parametrize("make", [MinMaxObserver, lambda **kw: HistogramObserver(num_bins=8, **kw)])
def test_non_finite_columns_are_dropped_in_every_channel(make):
    obs = make(axis=0, count_nonfinite=True, name="s")
    x = torch.tensor([[1.0, float("nan"), -2.0, 3.0], [0.5, 100.0, 0.25, float("inf")]])
    obs.observe(x)
    assert obs.nonfinite == 2
    ref = MinMaxObserver(axis=0)
    ref.observe(x[:, [0, 2]])  # the columns finite in every channel
    lo, hi = (obs.min, obs.max) if isinstance(obs, MinMaxObserver) else (obs.hist.lo, obs.hist.hi)
    assert lo.tolist() == ref.min.tolist() and hi.tolist() == ref.max.tolist()
    obs.observe(torch.full((2, 3), float("nan")))  # nothing finite: counted, statistics unchanged
    assert obs.nonfinite == 8
    empty = make(count_nonfinite=True)
    empty.observe(torch.tensor([float("nan"), float("-inf")]))
    assert empty.nonfinite == 2 and not empty.has_data()


def test_non_finite_error_counts_the_values():
    with pytest.raises(CalibrationError, match=r"quantizer site 'a.b' saw 2 NaN/Inf value\(s\) during calibration"):
        MinMaxObserver(name="a.b").observe(torch.tensor([1.0, float("nan"), float("inf")]))


@pytest.mark.parametrize("make", [lambda: MinMaxObserver(axis=1, name="m", count_nonfinite=True),
                                  lambda: HistogramObserver(num_bins=8, axis=1, name="h", count_nonfinite=True)])
def test_state_round_trip_continues_identically(make):
    a, b = make(), make()
    a.observe(torch.tensor([[1.0, float("nan")], [-3.0, 2.0]]))
    state = a.state_dict()
    b.load_state_dict({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
    assert b.has_data() and b.nonfinite == 1 and isinstance(b.nonfinite, int)
    for o in (a, b):
        o.observe(torch.tensor([[5.0, -1.0], [0.0, 7.0]]))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]
                                          for k in sa)
    fresh = make()
    fresh.load_state_dict(make().state_dict())  # an empty observer's state is empty again
    assert not fresh.has_data() and fresh.nonfinite == 0


def test_histogram_state_is_plain_tensors():
    obs = HistogramObserver(num_bins=4)
    assert obs.state_dict() == {"counts": None, "lo": None, "hi": None, "nonfinite": 0}
    obs.observe(torch.tensor([0.0, 1.0, 3.0, 4.0]))
    s = obs.state_dict()
    assert s["counts"].tolist() == [[1.0, 1.0, 0.0, 2.0]] and s["lo"].tolist() == [0.0] and s["hi"].tolist() == [4.0]


# ---- range setting ---------------------------------------------------------------------------
def test_percentile_bounds():
    obs = HistogramObserver(num_bins=64)
    obs.observe(torch.linspace(-1, 3, 1000))
    lo, hi = percentile_range(obs.hist, 100.0)  # 100 is allowed: the observed ends
    assert float(lo) == -1.0 and float(hi) == pytest.approx(3.0, abs=1e-12)
    for bad in (50.0, 100.5, 10.0):
        with pytest.raises(ValueError, match=r"percentile must be in \(50, 100\], got"):
            percentile_range(obs.hist, bad)


def test_percentile_interpolates_linearly_inside_a_bin():
    """Counts [2, 4, 2, 0] over [0, 4]: the CDF at the edges is [0, .25, .75, 1, 1]; by hand,
    p = 0.9 lies 0.6 of the way into bin 2, p = 0.1 0.4 of the way into bin 0, p = 0.495 at 1.49."""
    h = Histogram(torch.tensor([[2.0, 4.0, 2.0, 0.0]], dtype=torch.float64),
                  torch.tensor([0.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64))
    lo, hi = percentile_range(h, 90.0)
    assert float(lo) == pytest.approx(0.4, rel=1e-12) and float(hi) == pytest.approx(2.6, rel=1e-12)
    lo, hi = percentile_range(h, 50.5)  # just above the lower bound of (50, 100]
    assert float(lo) == pytest.approx(1.49, rel=1e-12) and float(hi) == pytest.approx(1.51, rel=1e-12)


def test_rebin_spreads_mass_uniformly_inside_old_bins():
    h = Histogram(torch.tensor([[2.0, 4.0, 2.0, 0.0]], dtype=torch.float64),
                  torch.tensor([0.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64))
    r = rebin(h, torch.tensor([0.0], dtype=torch.float64), torch.tensor([6.0], dtype=torch.float64))
    # new edges 0, 1.5, 3, 4.5, 6: [0, 1.5] holds bin 0 and half of bin 1, [1.5, 3] the rest
    assert r.counts.tolist() == [[4.0, 4.0, 0.0, 0.0]]
    r = rebin(h, torch.tensor([-1.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64))
    assert r.counts[0].tolist() == pytest.approx([1.0, 5.0, 2.0, 0.0], abs=1e-12)  # edges -1, 0.5, 2, 3.5, 5


def test_percentile_per_channel_matches_numpy():
    x = torch.stack([torch.randn(20_000), torch.rand(20_000) * 10 - 2])
    obs = HistogramObserver(num_bins=1024, axis=0)
    obs.observe(x)
    lo, hi = percentile_range(obs.hist, 99.0)
    width = ((obs.hist.hi - obs.hist.lo) / 1024).tolist()
    for c in range(2):
        assert float(lo[c]) == pytest.approx(np.percentile(x[c].numpy(), 1.0), abs=2 * width[c])
        assert float(hi[c]) == pytest.approx(np.percentile(x[c].numpy(), 99.0), abs=2 * width[c])
    default, p9999 = percentile_range(obs.hist), percentile_range(obs.hist, 99.99)  # 99.99 by default
    assert all(torch.equal(a, b) for a, b in zip(default, p9999)) and not torch.equal(default[1], hi)


def _brute_sqnr(hist, enc_scale, enc_min, enc_max, c):
    """10 log10(E[x^2] / noise) with Python loops over the bins of channel ``c``."""
    centers, counts = hist.centers[c].tolist(), hist.counts[c].tolist()
    total = sum(counts)
    s, qlo, qhi = float(enc_scale), float(enc_min), float(enc_max)
    noise = power = 0.0
    for x, n in zip(centers, counts):
        p = n / total
        power += p * x * x
        noise += p * s * s / 12 if qlo <= x <= qhi else p * 3.0 * (x - min(max(x, qlo), qhi)) ** 2
    return 10 * math.log10(power / noise)


def test_sqnr_candidates_follow_the_definition():
    """m = min(lo, 0), M = max(hi, 0). Asymmetric: all pairs (m i / 24, M j / 24); symmetric:
    +-A k / 128 with A = max(-m, M). Channels: straddling 0, all positive below 1, all negative."""
    lo = torch.tensor([-2.0, 0.25, -3.0], dtype=torch.float64)
    hi = torch.tensor([3.0, 0.5, -1.0], dtype=torch.float64)
    hist = Histogram(torch.ones(3, 4, dtype=torch.float64), lo, hi)
    m, M = [-2.0, 0.0, -3.0], [3.0, 0.5, 0.0]
    clo, chi = sqnr_candidates(hist, False)
    assert clo.shape == chi.shape == (3, 24 * 24) and clo.dtype == torch.float64
    for c in range(3):
        got = sorted(zip(clo[c].tolist(), chi[c].tolist()))
        assert got == sorted((m[c] * i / 24, M[c] * j / 24) for i in range(1, 25) for j in range(1, 25))
    slo, shi = sqnr_candidates(hist, True)
    assert slo.shape == shi.shape == (3, 128)
    for c in range(3):
        a = max(-m[c], M[c])
        assert shi[c].tolist() == [a * k / 128 for k in range(1, 129)] and torch.equal(slo[c], -shi[c])


@pytest.mark.parametrize("bitwidth", [4, 8, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_grid_of_is_encodings_grid(symmetric, bitwidth):
    """The search's vectorized grid equals Encoding.from_min_max (the owner of the grid math)
    elementwise, degenerate ranges (the tiny floor scale) and |min| > max included."""
    g = torch.Generator().manual_seed(3)
    lo = torch.cat([-torch.rand(20, generator=g, dtype=torch.float64) * 5, torch.tensor([0.0, 0.0, -7.0, -1e-3])])
    hi = torch.cat([torch.rand(20, generator=g, dtype=torch.float64) * 3, torch.tensor([0.0, 2.0, 0.0, 1e-3])])
    scale, offset = grid_of(lo, hi, bitwidth, symmetric)
    ref = Encoding.from_min_max(lo, hi, bitwidth, symmetric, axis=0)
    assert torch.equal(scale, ref.scale) and torch.equal(offset, ref.offset)
    assert float(scale[20]) == torch.finfo(torch.float32).tiny * 2**10


def _loop_noise(hist, s, qlo, qhi, gamma):
    noise = 0.0
    total = float(hist.counts.sum())
    for c, n in zip(hist.centers[0].tolist(), hist.counts[0].tolist()):
        p = n / total
        noise += p * s * s / 12 if qlo <= c <= qhi else p * gamma * (c - min(max(c, qlo), qhi)) ** 2
    return noise


def test_grid_noise_counts_centers_on_the_grid_ends_as_inside():
    """Centers 0.5 .. 7.5; grid ends exactly on the centers 1.5 and 5.5: those bins are inside."""
    hist = Histogram(torch.arange(1.0, 9.0, dtype=torch.float64)[None], torch.tensor([0.0], dtype=torch.float64),
                     torch.tensor([8.0], dtype=torch.float64))
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)
    got = float(grid_noise(hist, t(1.0), t(1.5), t(5.5)))
    assert got == pytest.approx(_loop_noise(hist, 1.0, 1.5, 5.5, SQNR_CLIP_WEIGHT), rel=1e-12)
    assert float(grid_noise(hist, t(1.0), t(1.5), t(5.5), clip_weight=10.0)) == \
        pytest.approx(_loop_noise(hist, 1.0, 1.5, 5.5, 10.0), rel=1e-12)


def test_clip_weight_reaches_the_search():
    """A huge clipping weight makes the search keep the whole observed range; the default clips."""
    x = torch.cat([torch.randn(20_000), torch.tensor([25.0, -30.0])])
    obs = HistogramObserver(num_bins=512)
    obs.observe(x)
    lo_c, hi_c = sqnr_candidates(obs.hist, False)
    assert float(expected_noise(obs.hist, lo_c, hi_c, 4, False, clip_weight=1e9).argmin()) == lo_c.shape[1] - 1
    keep = sqnr_search(obs.hist, 4, False, clip_weight=1e9)
    assert float(keep.min) == float(obs.hist.lo) and float(keep.max) == float(obs.hist.hi)
    clip = sqnr_search(obs.hist, 4, False)
    assert float(clip.max) < 25.0 and float(clip.min) > -30.0


def test_sqnr_search_chunks_and_more_channels_than_bins():
    """Results do not depend on the chunk size; 10 channels with 8 bins each are all searched."""
    obs = HistogramObserver(num_bins=8, axis=0)
    obs.observe(torch.randn(10, 200) * torch.arange(1.0, 11.0)[:, None])
    whole, one_by_one = sqnr_search(obs.hist, 4, True), sqnr_search(obs.hist, 4, True, max_elements=1)
    assert whole.max.shape == (10,)
    for a, b in ((whole.min, one_by_one.min), (whole.max, one_by_one.max), (whole.sqnr_db, one_by_one.sqnr_db)):
        assert torch.equal(a, b)
    assert float(whole.max[-1]) > 3 * float(whole.max[0])  # each channel its own range


@pytest.mark.parametrize("symmetric", [False, True])
def test_range_setting_ignores_the_histograms_total_mass(symmetric):
    """Counts are relative: a histogram scaled to a total mass below 1 gives the same ranges and SQNR."""
    obs = HistogramObserver(num_bins=256, axis=0)
    obs.observe(torch.stack([torch.randn(3000), torch.rand(3000) * 5]))
    small = Histogram(obs.hist.counts * 1e-6, obs.hist.lo, obs.hist.hi)
    for a, b in zip(percentile_range(obs.hist, 99.0), percentile_range(small, 99.0)):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)
    big, tiny = sqnr_search(obs.hist, 4, symmetric), sqnr_search(small, 4, symmetric)
    assert torch.equal(big.min, tiny.min) and torch.equal(big.max, tiny.max)
    assert torch.allclose(big.sqnr_db, tiny.sqnr_db, rtol=1e-12, atol=0)
    enc = Encoding.from_min_max(big.min, big.max, 4, symmetric, axis=0)
    assert torch.allclose(encoding_sqnr(obs.hist, enc), encoding_sqnr(small, enc), rtol=1e-12, atol=0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_encoding_sqnr_matches_loops(symmetric):
    g = torch.Generator().manual_seed(1)
    x = torch.stack([torch.randn(5000, generator=g), torch.randn(5000, generator=g) * 4 + 1])
    obs = HistogramObserver(num_bins=128, axis=0)
    obs.observe(x)
    # a deliberately clipping per-channel grid, and a per-tensor one
    enc = Encoding.from_min_max(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 3.0]), 4, symmetric, axis=0)
    got = encoding_sqnr(obs.hist, enc)
    assert got.shape == (2,)
    for c in range(2):
        assert float(got[c]) == pytest.approx(_brute_sqnr(obs.hist, enc.scale[c], enc.min[c], enc.max[c], c), rel=1e-9)
    one = Encoding.from_min_max(torch.tensor(-2.0), torch.tensor(2.0), 8, symmetric)
    got1 = encoding_sqnr(obs.hist, one)
    assert got1.shape == (2,)
    assert [float(v) for v in got1] == pytest.approx([_brute_sqnr(obs.hist, one.scale, one.min, one.max, c)
                                                      for c in range(2)], rel=1e-9)


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scheme", ["tf", "percentile", "tf_enhanced"])
def test_encoding_from_observer(scheme, symmetric, axis):
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(2, 4000, generator=g) * torch.tensor([[1.0], [3.0]]) + 0.5,
                   torch.tensor([[40.0], [-90.0]])], 1)  # one outlier per channel
    obs = make_observer(scheme, axis=axis, name="s")
    obs.observe(x)
    enc = encoding_from_observer(obs, scheme, 6, symmetric, axis, percentile=99.0)
    assert (enc.bitwidth, enc.symmetric, enc.axis) == (6, symmetric, axis)
    assert enc.scale.shape == (() if axis is None else (2,))
    rows = x.reshape(1, -1) if axis is None else x
    if scheme == "tf":
        lo, hi = rows.double().amin(1), rows.double().amax(1)
    elif scheme == "percentile":
        lo = torch.tensor([np.percentile(r.numpy(), 1.0) for r in rows], dtype=torch.float64)
        hi = torch.tensor([np.percentile(r.numpy(), 99.0) for r in rows], dtype=torch.float64)
    else:
        res = sqnr_search(obs.hist, 6, symmetric)
        lo, hi = res.min, res.max
        span = (lambda a, b: torch.maximum(-a, b)) if symmetric else (lambda a, b: b - a)
        assert bool((span(lo, hi) < span(rows.double().amin(1), rows.double().amax(1))).all())  # outliers clipped
    ref = Encoding.from_min_max(lo.reshape(enc.scale.shape), hi.reshape(enc.scale.shape), 6, symmetric, axis)
    # percentile: numpy's value is within 2 of the 2048 bins of the histogram's linear interpolation
    tol = 0.0 if scheme != "percentile" else 4 * float((rows.amax() - rows.amin()) / 2048) / 31
    assert torch.allclose(enc.scale, ref.scale, rtol=1e-12, atol=tol)
    assert torch.equal(enc.offset, ref.offset) or scheme == "percentile"


def test_encoding_from_observer_percentile_default_is_99_99():
    x = torch.randn(50_000)
    obs = make_observer("percentile", name="s")
    obs.observe(x)
    enc = encoding_from_observer(obs, "percentile", 8, True, None)
    ref = Encoding.from_min_max(*(v.reshape(()) for v in percentile_range(obs.hist, 99.99)), 8, True)
    assert torch.equal(enc.scale, ref.scale)
    assert not torch.equal(enc.scale, encoding_from_observer(obs, "percentile", 8, True, None, percentile=99.9).scale)


# ---- DDP merge, ranks as threads ----------------------------------------------------------------
class _ThreadGroup:
    """A stand-in for ``torch.distributed`` with ranks run as threads: ``all_reduce`` waits for every
    rank, then reduces the rank's tensors in rank order (a barrier timeout fails a rank that waits
    on a collective the others never reach)."""

    class ReduceOp:
        MIN, MAX, SUM = "min", "max", "sum"

    def __init__(self, world: int):
        self.world, self.barrier = world, threading.Barrier(world, timeout=5)
        self.slots, self.local, self.calls = [None] * world, threading.local(), [0] * world

    def get_world_size(self):
        return self.world

    def get_backend(self):
        return "gloo"

    def all_reduce(self, t, op):
        rank = self.local.rank
        self.calls[rank] += 1
        self.slots[rank] = t.clone()
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        out = {"min": stacked.amin(0), "max": stacked.amax(0), "sum": stacked.sum(0)}[op]
        self.barrier.wait()
        t.copy_(out)

    def run(self, observers_per_rank):
        errors = [None] * self.world

        def rank_main(rank):
            self.local.rank = rank
            try:
                all_reduce_observer(observers_per_rank[rank])
            except Exception as e:  # noqa: BLE001 - reported by the caller
                errors[rank] = e
                self.barrier.abort()

        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors


@pytest.fixture
def group(monkeypatch):
    g = _ThreadGroup(3)
    monkeypatch.setattr(observers, "world", lambda: g)
    return g


def test_all_reduce_min_max_matches_concatenated_data(group):
    data = [torch.tensor([[1.0, float("nan")], [-3.0, 2.0], [0.5, 0.5]]), None,
            torch.tensor([[4.0, -7.0], [1.0, 9.0], [0.25, 0.75]])]  # rank 1 saw no data
    obs = [MinMaxObserver(axis=0, name="m", count_nonfinite=True) for _ in data]
    for o, d in zip(obs, data):
        if d is not None:
            o.observe(d)
    assert group.run(obs) == [None] * 3
    for o in obs:
        assert o.min.tolist() == [-7.0, -3.0, 0.25] and o.max.tolist() == [4.0, 9.0, 0.75] and o.nonfinite == 1
    assert group.calls == [4, 4, 4]


def test_all_reduce_histograms_rebin_onto_the_common_range(group):
    obs = [HistogramObserver(num_bins=4, name="h", count_nonfinite=True) for _ in range(3)]
    obs[0].observe(torch.tensor([0.0, 0.5, 1.5, 2.5, 3.5, 4.0, float("inf")]))  # [0, 4]: counts [2, 1, 1, 2]
    obs[1].observe(torch.tensor([0.0, 1.0, 3.0, 5.0, 7.0, 8.0]))  # [0, 8]: counts [2, 1, 1, 2]
    assert group.run(obs) == [None] * 3  # rank 2 saw no data
    for o in obs:
        assert o.hist.lo.tolist() == [0.0] and o.hist.hi.tolist() == [8.0] and o.nonfinite == 1
        assert o.hist.counts.tolist() == [[5.0, 4.0, 1.0, 2.0]]  # rank 0's bins pair up: [3, 3, 0, 0]
    assert group.calls == [5, 5, 5]


def test_all_reduce_same_range_keeps_counts(group):
    obs = [HistogramObserver(num_bins=4, axis=0, name="h") for _ in range(3)]
    for r, o in enumerate(obs):
        o.observe(torch.tensor([[0.0, 4.0, 0.5 + r], [-1.0, 1.0, -0.75]]))
    group.run(obs)
    for o in obs:
        assert o.hist.counts.tolist() == [[4.0, 1.0, 1.0, 3.0], [6.0, 0.0, 0.0, 3.0]]


def test_all_reduce_with_no_data_anywhere_stays_empty(group):
    for make in (lambda: MinMaxObserver(name="m"), lambda: HistogramObserver(num_bins=4, name="h")):
        obs = [make() for _ in range(3)]
        assert group.run(obs) == [None] * 3
        assert not any(o.has_data() for o in obs) and all(o.nonfinite == 0 for o in obs)


def test_all_reduce_refuses_different_channel_counts(group):
    obs = [MinMaxObserver(axis=0, name="conv1") for _ in range(3)]
    obs[0].observe(torch.zeros(2, 3))
    obs[1].observe(torch.zeros(4, 3))
    errors = group.run(obs)
    assert isinstance(errors[0], RuntimeError)
    assert "quantizer site 'conv1': ranks disagree on the channel count (2 here, 4 elsewhere)" in str(errors[0])


def test_all_reduce_gives_every_rank_bit_identical_float64_statistics(group):
    """A rank without data takes part with float64 placeholders: its merged range is not rounded."""
    obs = [HistogramObserver(num_bins=8, axis=0, name="h") for _ in range(3)]
    for o in obs[:2]:
        o.observe(torch.tensor([[-0.3, 0.7, 0.1], [0.2, 1.1, 0.3]]))
    assert group.run(obs) == [None] * 3
    for o in obs:
        assert o.hist.lo.dtype == o.hist.hi.dtype == o.hist.counts.dtype == torch.float64
        for field in ("lo", "hi", "counts"):
            assert torch.equal(getattr(o.hist, field), getattr(obs[0].hist, field))
    assert obs[2].hist.lo.tolist() == [float(torch.tensor(-0.3)), float(torch.tensor(0.2))]


def test_all_reduce_without_a_process_group_changes_nothing():
    obs = HistogramObserver(num_bins=4, axis=0, count_nonfinite=True)
    obs.observe(torch.tensor([[1.0, 2.0, float("nan")], [0.0, -1.0, 3.0]]))
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in obs.state_dict().items()}
    all_reduce_observer(obs)
    after = obs.state_dict()
    assert after["nonfinite"] == before["nonfinite"] == 1
    assert all(torch.equal(after[k], before[k]) for k in ("counts", "lo", "hi"))
