import math

import numpy as np
import pytest
import torch

from qat_plugin.calibration import HistogramObserver, MinMaxObserver, encoding_from_observer
from qat_plugin.calibration.observers import Histogram, rebin
from qat_plugin.calibration.range_setting import (SQNR_CLIP_WEIGHT, expected_noise, grid_of, percentile_range,
                                                   sqnr_candidates, sqnr_search)
from qat_plugin.errors import CalibrationError


def test_minmax_merges_batches_per_channel():
    obs = MinMaxObserver(axis=0)
    obs.observe(torch.tensor([[1.0, -2.0], [0.5, 0.7]]))
    obs.observe(torch.tensor([[3.0, 0.0], [-4.0, 0.1]]))
    assert obs.min.tolist() == [-2.0, -4.0] and obs.max.tolist() == pytest.approx([3.0, 0.7])


def test_histogram_grows_and_keeps_mass():
    obs = HistogramObserver(num_bins=64)
    a, b = torch.rand(1000), torch.rand(3000) * 4 - 2
    obs.observe(a)
    obs.observe(b)
    h = obs.hist
    assert float(h.lo) == pytest.approx(float(b.min())) and float(h.hi) == pytest.approx(float(b.max()))
    assert float(h.counts.sum()) == pytest.approx(4000)
    # the mass below 0 comes from b only
    below = float(h.counts[0, : int(64 * (0 - h.lo) / (h.hi - h.lo))].sum())
    assert below == pytest.approx(float((b < 0).sum()), rel=0.05)


def test_rebin_is_exact_for_aligned_bins():
    h = Histogram(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64),
                  torch.tensor([0.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64))
    r = rebin(h, torch.tensor([0.0], dtype=torch.float64), torch.tensor([8.0], dtype=torch.float64))
    assert r.counts.tolist() == [[3.0, 7.0, 0.0, 0.0]]


def test_percentile_matches_numpy():
    x = torch.randn(200_000)
    obs = HistogramObserver(num_bins=2048)
    obs.observe(x)
    lo, hi = percentile_range(obs.hist, 99.9)
    width = float((obs.hist.hi - obs.hist.lo) / 2048)
    assert float(hi) == pytest.approx(np.percentile(x.numpy(), 99.9), abs=2 * width)
    assert float(lo) == pytest.approx(np.percentile(x.numpy(), 0.1), abs=2 * width)


def test_nan_names_the_site():
    obs = HistogramObserver(name="layer3.conv_output")
    with pytest.raises(CalibrationError, match="layer3.conv_output"):
        obs.observe(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CalibrationError, match="Inf"):
        MinMaxObserver(name="x").observe(torch.tensor([float("inf")]))


def test_no_data_is_an_error():
    with pytest.raises(CalibrationError, match="saw no data"):
        encoding_from_observer(MinMaxObserver(name="s"), "tf", 8, False, None)


def brute_force_noise(centers, probs, lo, hi, bw, symmetric, gamma):
    """Python loops, straight from the documented definition."""
    scale, offset = grid_of(torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64), bw, symmetric)
    s, o = float(scale), float(offset)
    qlo, qhi = o * s, (o + 2**bw - 1) * s
    noise = 0.0
    for c, p in zip(centers, probs):
        if qlo <= c <= qhi:
            noise += p * s * s / 12
        else:
            noise += p * gamma * (c - min(max(c, qlo), qhi)) ** 2
    return noise


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bw", [4, 8])
def test_sqnr_search_matches_brute_force(seed, symmetric, bw):
    g = torch.Generator().manual_seed(seed)
    bins = 64
    counts = torch.rand(1, bins, generator=g, dtype=torch.float64) ** 4 * 100  # spiky histogram
    lo = torch.tensor([-(torch.rand(1, generator=g).item() * 3)], dtype=torch.float64)
    hi = torch.tensor([torch.rand(1, generator=g).item() * 5 + 0.1], dtype=torch.float64)
    hist = Histogram(counts, lo, hi)
    centers = hist.centers[0].tolist()
    probs = (counts[0] / counts.sum()).tolist()
    cand_lo, cand_hi = sqnr_candidates(hist, symmetric)
    brute = [brute_force_noise(centers, probs, a, b, bw, symmetric, SQNR_CLIP_WEIGHT)
             for a, b in zip(cand_lo[0].tolist(), cand_hi[0].tolist())]
    fast = expected_noise(hist, cand_lo, cand_hi, bw, symmetric)[0].tolist()
    assert fast == pytest.approx(brute, rel=1e-9, abs=1e-15)
    best = int(np.argmin(brute))
    res = sqnr_search(hist, bw, symmetric)
    assert float(res.min) == pytest.approx(cand_lo[0, best].item())
    assert float(res.max) == pytest.approx(cand_hi[0, best].item())
    power = sum(p * c * c for p, c in zip(probs, centers))
    assert float(res.sqnr_db) == pytest.approx(10 * math.log10(power / brute[best]), rel=1e-9)


def test_sqnr_clips_outliers_that_minmax_keeps():
    x = torch.cat([torch.randn(100_000), torch.tensor([60.0])])
    obs = HistogramObserver()
    obs.observe(x)
    res = sqnr_search(obs.hist, 4, False)
    assert float(res.max) < 15.0  # min-max would put the top at 60
    # and its error on the bulk is smaller than min-max's
    from qat_plugin.encoding import Encoding
    sq = Encoding.from_min_max(res.min[0], res.max[0], 4, False)
    mm = Encoding.from_min_max(x.min(), x.max(), 4, False)
    err = lambda e: float(((e.quantize_dequantize(x) - x.double()) ** 2).mean())
    assert err(sq) < err(mm)


def test_sqnr_search_is_per_channel():
    w = torch.stack([torch.randn(500), torch.randn(500) * 10])
    obs = HistogramObserver(num_bins=256, axis=0)
    obs.observe(w)
    res = sqnr_search(obs.hist, 8, True)
    assert res.max.shape == (2,) and float(res.max[1]) > 5 * float(res.max[0])
