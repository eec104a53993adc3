"""Observers collect statistics of what flows through a quantizer; they set no ranges.

Range setting (:mod:`qat_plugin.calibration.range_setting`) turns the statistics into
encodings. Both kinds of statistics can be merged across batches and across DDP ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import CalibrationError


def _channels_first(x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """View ``x`` as ``(C, N)`` (``C = 1`` per-tensor), in float32."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise CalibrationError(
            f"quantizer site '{name}' saw {bad} NaN/Inf value(s) during calibration: check the "
            "calibration data and the model's numerics upstream of this site")


class MinMaxObserver:
    """Running min and max (per tensor, or per channel along ``axis``)."""

    def __init__(self, axis: Optional[int] = None, name: str = ""):
        self.axis, self.name = axis, name
        self.min: Optional[torch.Tensor] = None
        self.max: Optional[torch.Tensor] = None

    def observe(self, x: torch.Tensor) -> None:
        x2 = _channels_first(x, self.axis)
        _check_finite(x2, self.name)
        if x2.numel() == 0:
            return
        lo, hi = torch.aminmax(x2, dim=1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def has_data(self) -> bool:
        return self.min is not None


@dataclass
class Histogram:
    """Counts in ``num_bins`` equal bins over ``[lo, hi]``, one row per channel."""

    counts: torch.Tensor  # (C, B) float64
    lo: torch.Tensor  # (C,) float64
    hi: torch.Tensor  # (C,)

    @property
    def edges(self) -> torch.Tensor:
        steps = torch.linspace(0, 1, self.counts.shape[1] + 1, dtype=torch.float64, device=self.lo.device)
        return self.lo[:, None] + (self.hi - self.lo)[:, None] * steps

    @property
    def centers(self) -> torch.Tensor:
        e = self.edges
        return (e[:, 1:] + e[:, :-1]) / 2


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Row-wise piecewise-linear interpolation (like ``np.interp``), clamped at the ends."""
    idx = torch.searchsorted(xp.contiguous(), x.contiguous()).clamp(1, xp.shape[1] - 1)
    x0, x1 = xp.gather(1, idx - 1), xp.gather(1, idx)
    f0, f1 = fp.gather(1, idx - 1), fp.gather(1, idx)
    t = ((x - x0) / (x1 - x0).clamp_min(1e-300)).clamp(0, 1)
    return f0 + t * (f1 - f0)


def rebin(hist: Histogram, lo: torch.Tensor, hi: torch.Tensor) -> Histogram:
    """Move counts to new bins over ``[lo, hi]`` (which covers the old range), assuming
    counts are spread uniformly inside each old bin. Total mass is kept exactly."""
    cdf = torch.nn.functional.pad(hist.counts.cumsum(1), (1, 0))
    new = Histogram(torch.zeros_like(hist.counts), lo, hi)
    new_cdf = _interp(new.edges, hist.edges, cdf)
    new.counts = new_cdf.diff(dim=1).clamp_min(0)
    return new


class HistogramObserver:
    """Histogram of the values seen, with a range that grows to hold every value.

    When a batch falls outside the current range, the histogram is re-binned over the union
    (counts spread uniformly inside old bins), then the batch is added.
    """

    def __init__(self, num_bins: int = 512, axis: Optional[int] = None, name: str = ""):
        self.num_bins, self.axis, self.name = num_bins, axis, name
        self.hist: Optional[Histogram] = None

    def observe(self, x: torch.Tensor) -> None:
        x2 = _channels_first(x, self.axis)
        _check_finite(x2, self.name)
        if x2.numel() == 0:
            return
        bmin, bmax = torch.aminmax(x2, dim=1)
        bmin, bmax = bmin.double(), bmax.double()
        if self.hist is None:
            lo, hi = bmin, bmax
        else:
            lo, hi = torch.minimum(self.hist.lo, bmin), torch.maximum(self.hist.hi, bmax)
        hi = torch.maximum(hi, lo + 1e-12 * torch.clamp(lo.abs(), min=1.0))  # non-empty range
        if self.hist is None:
            self.hist = Histogram(torch.zeros(x2.shape[0], self.num_bins, dtype=torch.float64, device=x2.device), lo, hi)
        elif not (torch.equal(lo, self.hist.lo) and torch.equal(hi, self.hist.hi)):
            self.hist = rebin(self.hist, lo, hi)
        self.hist.counts += self._count(x2, self.hist.lo, self.hist.hi)

    def _count(self, x2: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] == 1:
            return torch.histc(x2, bins=self.num_bins, min=float(lo), max=float(hi)).double()[None]
        width = ((hi - lo) / self.num_bins).float()[:, None]
        idx = ((x2 - lo.float()[:, None]) / width).long().clamp_(0, self.num_bins - 1)
        counts = torch.zeros(x2.shape[0], self.num_bins, dtype=torch.float64, device=x2.device)
        return counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))

    def has_data(self) -> bool:
        return self.hist is not None


def _world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def all_reduce_observer(observer) -> None:
    """Merge an observer's statistics across DDP ranks, in place, so that every rank ends with
    identical statistics (and so bit-identical encodings). A no-op without a process group.

    Min-max: all-reduce MIN / MAX. Histogram: all-reduce the range (MIN / MAX), re-bin every
    rank's counts onto the common range, then all-reduce SUM. A rank that saw no data takes part
    with an empty histogram.
    """
    dist = _world()
    if dist is None:
        return
    if isinstance(observer, MinMaxObserver):
        lo, hi = observer.min, observer.max
        if lo is None:
            raise RuntimeError(f"quantizer site '{observer.name}': cannot merge statistics of a rank that saw "
                               "no data (give every rank calibration batches)")
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return
    h = observer.hist
    if h is None:
        raise RuntimeError(f"quantizer site '{observer.name}': cannot merge statistics of a rank that saw no "
                           "data (give every rank calibration batches)")
    lo, hi = h.lo.clone(), h.hi.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    merged = rebin(h, lo, hi) if not (torch.equal(lo, h.lo) and torch.equal(hi, h.hi)) else Histogram(h.counts.clone(), lo, hi)
    dist.all_reduce(merged.counts, op=dist.ReduceOp.SUM)
    observer.hist = merged
