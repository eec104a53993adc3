"""Property-based tests (hypothesis) for the encoding math: grids, round trips, per-channel
equivalence and the SQNR search. Each property runs ~50 generated cases."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_plugin import QuantizeDequantize
from qat_plugin.calibration import HistogramObserver
from qat_plugin.calibration.range_setting import encoding_sqnr, sqnr_search
from qat_plugin.encoding import Encoding, num_steps

FAST = settings(max_examples=50, deadline=None, derandomize=True)

bitwidths = st.sampled_from([2, 4, 8, 16]) | st.integers(2, 16)
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


def _t(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


@FAST
@given(a=finite, b=finite, bitwidth=bitwidths, symmetric=st.booleans())
def test_from_min_max_holds_zero_and_covers_the_range(a, b, bitwidth, symmetric):
    lo, hi = min(a, b), max(a, b)
    enc = Encoding.from_min_max(_t(lo), _t(hi), bitwidth, symmetric)
    scale, n = float(enc.scale), num_steps(bitwidth)
    # the scale is the documented formula over the range widened to hold 0 (or the floor scale)
    width = max(-min(lo, 0.0), max(hi, 0.0)) / (2 ** (bitwidth - 1) - 1) if symmetric else (max(hi, 0.0) - min(lo, 0.0)) / n
    assert scale == max(width, torch.finfo(torch.float32).tiny * 2**10)
    assert scale > 0 and -n <= float(enc.offset) <= 0 and float(enc.offset) == round(float(enc.offset))
    assert float(enc.quantize_dequantize(_t(0.0))) == 0.0  # zero is a grid point
    # every value of [min(lo, 0), max(hi, 0)] is within half a step of the grid: nothing clips
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    x = torch.linspace(lo0, hi0, 101, dtype=torch.float64)
    err = (enc.quantize_dequantize(x) - x).abs().max()
    assert float(err) <= scale / 2 * (1 + 1e-9) + 1e-300
    if symmetric:  # the symmetric grid holds the range itself, not only within half a step
        assert float(enc.min) <= lo0 * (1 - 1e-12) + 1e-300 and float(enc.max) >= hi0 * (1 - 1e-12)


@FAST
@given(a=finite, b=finite, bitwidth=bitwidths, symmetric=st.booleans(), learnable=st.booleans(),
       seed=st.integers(0, 2**16))
def test_quantize_of_dequantize_is_the_identity(a, b, bitwidth, symmetric, learnable, seed):
    """Every grid level survives the simulation's float32 round trip, and fake-quantization is
    idempotent (``qdq(qdq(x)) == qdq(x)``)."""
    enc = Encoding.from_min_max(_t(min(a, b)), _t(max(a, b)), bitwidth, symmetric)
    q = QuantizeDequantize((), bitwidth, symmetric, learnable=learnable)
    q.set_encoding(enc)
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, num_steps(bitwidth) + 1, (512,), generator=g).double()
    levels[:2] = torch.tensor([0.0, num_steps(bitwidth)])  # both ends
    grid = ((levels + enc.offset) * enc.scale.float().double()).float()  # dequantize(q) in float32
    with torch.no_grad():
        assert torch.equal(q(grid), grid)
        back = torch.round(grid / q.scale.detach()) - enc.offset.float()  # quantize(dequantize(q))
        assert torch.equal(back.double(), levels)
        lo, hi = float(enc.min), float(enc.max)
        x = (torch.rand(512, generator=g, dtype=torch.float64) * 1.2 * (hi - lo) + lo - 0.1 * (hi - lo)).float()
        once = q(x)
        assert torch.equal(q(once), once)


@FAST
@given(channels=st.integers(1, 6), bitwidth=bitwidths, symmetric=st.booleans(), learnable=st.booleans(),
       seed=st.integers(0, 2**16), axis=st.sampled_from([0, 1]))
def test_per_channel_equals_per_tensor_per_channel(channels, bitwidth, symmetric, learnable, seed, axis):
    g = torch.Generator().manual_seed(seed)
    lo = -torch.rand(channels, generator=g, dtype=torch.float64) * 10 ** torch.randint(-3, 3, (channels,), generator=g)
    hi = torch.rand(channels, generator=g, dtype=torch.float64) * 10 ** torch.randint(-3, 3, (channels,), generator=g)
    enc = Encoding.from_min_max(lo, hi, bitwidth, symmetric, axis=axis)
    pc = QuantizeDequantize((channels,), bitwidth, symmetric, axis, learnable=learnable)
    pc.set_encoding(enc)
    x = torch.randn(7, channels, 5, generator=g) * 10.0 ** torch.randint(-3, 3, (1,), generator=g).item()
    x = x.movedim(1, axis).contiguous()
    with torch.no_grad():
        out = pc(x)
    for c in range(channels):
        enc_c = Encoding.from_min_max(lo[c], hi[c], bitwidth, symmetric)
        assert torch.equal(enc_c.scale, enc.scale[c]) and torch.equal(enc_c.offset, enc.offset[c])
        pt = QuantizeDequantize((), bitwidth, symmetric, learnable=learnable)
        pt.set_encoding(enc_c)
        with torch.no_grad():
            assert torch.equal(out.select(axis, c), pt(x.select(axis, c)))


@FAST
@given(bitwidth=st.sampled_from([4, 8]), symmetric=st.booleans(), seed=st.integers(0, 2**16),
       shape=st.sampled_from(["normal", "laplace", "uniform", "skewed", "outliers"]))
def test_sqnr_search_never_does_worse_than_min_max_on_its_own_score(bitwidth, symmetric, seed, shape):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, generator=g)
    if shape == "laplace":
        x = torch.sign(x) * -torch.log(torch.rand(2000, generator=g).clamp_min(1e-12))
    elif shape == "uniform":
        x = torch.rand(2000, generator=g) * 3 - 1
    elif shape == "skewed":
        x = torch.relu(x) * 4 + 0.1
    elif shape == "outliers":
        x[:3] = torch.tensor([40.0, -25.0, 60.0])
    obs = HistogramObserver(num_bins=512)
    obs.observe(x)
    res = sqnr_search(obs.hist, bitwidth, symmetric)
    minmax = Encoding.from_min_max(obs.hist.lo[0], obs.hist.hi[0], bitwidth, symmetric)
    best = Encoding.from_min_max(res.min[0], res.max[0], bitwidth, symmetric)
    minmax_db, best_db = float(encoding_sqnr(obs.hist, minmax)[0]), float(encoding_sqnr(obs.hist, best)[0])
    assert math.isfinite(best_db)
    assert best_db >= minmax_db - 1e-9
    assert float(res.sqnr_db[0]) == pytest.approx(best_db, abs=1e-6)  # the reported score is the chosen grid's
