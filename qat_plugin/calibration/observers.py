"""Observers collect statistics of what flows through a quantizer; they set no ranges.

Range setting (:mod:`qat_plugin.calibration.range_setting`) turns the statistics into
encodings. Both kinds of statistics can be merged across batches and across DDP ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import CalibrationError
from ..dist import collective_device, world


def _channels_first(x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """View ``x`` as ``(C, N)`` (``C = 1`` per-tensor), in float32."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _finite_part(observer, x2: torch.Tensor) -> torch.Tensor:
    """``x2`` (``(C, N)``) if finite. Otherwise raise :class:`CalibrationError` (calibration), or,
    for an observer made with ``count_nonfinite=True`` (monitors during training), add the count
    to ``observer.nonfinite`` and keep the columns (samples) that are finite in every channel."""
    finite = torch.isfinite(x2)
    if bool(finite.all()):
        return x2
    bad = int((~finite).sum())
    if not observer.count_nonfinite:
        raise CalibrationError(
            f"quantizer site '{observer.name}' saw {bad} NaN/Inf value(s) during calibration: check the "
            "calibration data and the model's numerics upstream of this site")
    observer.nonfinite += bad
    return x2[:, finite.all(0)]


class MinMaxObserver:
    """Running min and max (per tensor, or per channel along ``axis``).

    ``count_nonfinite=True``: NaN/Inf values are counted in ``nonfinite`` and left out instead of
    raising :class:`~qat_plugin.errors.CalibrationError`.
    """

    def __init__(self, axis: Optional[int] = None, name: str = "", count_nonfinite: bool = False):
        self.axis, self.name = axis, name
        self.count_nonfinite, self.nonfinite = count_nonfinite, 0
        self.min: Optional[torch.Tensor] = None
        self.max: Optional[torch.Tensor] = None

    def observe(self, x: torch.Tensor) -> None:
        x2 = _finite_part(self, _channels_first(x, self.axis))
        if x2.numel() == 0:
            return
        lo, hi = torch.aminmax(x2, dim=1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def has_data(self) -> bool:
        return self.min is not None

    def state_dict(self) -> dict:
        return {"min": self.min, "max": self.max, "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.min, self.max, self.nonfinite = state["min"], state["max"], int(state["nonfinite"])


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


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
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
    new_cdf = interp(new.edges, hist.edges, cdf)
    new.counts = new_cdf.diff(dim=1).clamp_min(0)
    return new


class HistogramObserver:
    """Histogram of the values seen, with a range that grows to hold every value.

    When a batch falls outside the current range, the histogram is re-binned over the union
    (counts spread uniformly inside old bins), then the batch is added. ``count_nonfinite``: as
    in :class:`MinMaxObserver`.

    >>> obs = HistogramObserver(num_bins=4, count_nonfinite=True)
    >>> obs.observe(torch.tensor([0.0, 1.0, float("nan"), 3.0, 4.0]))
    >>> obs.nonfinite, obs.hist.counts.tolist()
    (1, [[1.0, 1.0, 0.0, 2.0]])
    """

    def __init__(self, num_bins: int = 512, axis: Optional[int] = None, name: str = "",
                 count_nonfinite: bool = False):
        self.num_bins, self.axis, self.name = num_bins, axis, name
        self.count_nonfinite, self.nonfinite = count_nonfinite, 0
        self.hist: Optional[Histogram] = None

    def observe(self, x: torch.Tensor) -> None:
        x2 = _finite_part(self, _channels_first(x, self.axis))
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

    def state_dict(self) -> dict:
        """Plain values and tensors (loads with ``torch.load(weights_only=True)``)."""
        h = self.hist
        return {"counts": None if h is None else h.counts, "lo": None if h is None else h.lo,
                "hi": None if h is None else h.hi, "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.hist = None if state["counts"] is None else Histogram(state["counts"], state["lo"], state["hi"])
        self.nonfinite = int(state["nonfinite"])


def all_reduce_observer(observer) -> None:
    """Merge an observer's statistics across DDP ranks, in place, so that every rank ends with
    identical statistics (and so bit-identical encodings). A no-op without a process group.

    Min-max: all-reduce MIN / MAX. Histogram: all-reduce the range (MIN / MAX), re-bin every
    rank's counts onto the common range, then all-reduce SUM. A rank that saw no data takes part
    with empty statistics (so no rank waits forever); when no rank saw data, the observer stays
    empty on every rank. The non-finite counts are summed. Every rank must call this for the
    same observers in the same order.
    """
    dist = world()
    if dist is None:
        return
    mine = observer.min if isinstance(observer, MinMaxObserver) else (observer.hist.lo if observer.hist else None)
    device = mine.device if mine is not None else collective_device(dist)
    # channel count (0 on a rank without data) and non-finite count, in one collective
    head = torch.tensor([0 if mine is None else mine.numel(), observer.nonfinite], dtype=torch.float64, device=device)
    sums = head.clone()
    dist.all_reduce(head, op=dist.ReduceOp.MAX)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    channels, observer.nonfinite = int(head[0]), int(sums[1])
    if channels == 0:
        return  # no rank saw data
    if mine is not None and mine.numel() != channels:
        raise RuntimeError(f"quantizer site '{observer.name}': ranks disagree on the channel count "
                           f"({mine.numel()} here, {channels} elsewhere)")
    if isinstance(observer, MinMaxObserver):
        if observer.min is None:
            observer.min = torch.full((channels,), float("inf"), device=device)
            observer.max = torch.full((channels,), float("-inf"), device=device)
        dist.all_reduce(observer.min, op=dist.ReduceOp.MIN)
        dist.all_reduce(observer.max, op=dist.ReduceOp.MAX)
        return
    h = observer.hist
    if h is None:
        inf = torch.full((channels,), float("inf"), dtype=torch.float64, device=device)
        h = Histogram(torch.zeros(channels, observer.num_bins, dtype=torch.float64, device=device), inf, -inf)
    lo, hi = h.lo.clone(), h.hi.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if observer.hist is None or (torch.equal(lo, h.lo) and torch.equal(hi, h.hi)):
        merged = Histogram(h.counts.clone(), lo, hi)
    else:
        merged = rebin(h, lo, hi)
    dist.all_reduce(merged.counts, op=dist.ReduceOp.SUM)
    observer.hist = merged
