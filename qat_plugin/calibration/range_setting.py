"""Range setting: statistics in, ``(min, max)`` per tensor or channel out.

* ``tf`` (min-max): the observed min and max.
* ``percentile``: the ``p``-th and ``(100 - p)``-th percentiles of the histogram
  (linear inside a bin).
* ``tf_enhanced`` (SQNR search, :func:`sqnr_search`): the candidate range that minimizes the
  expected quantization noise of the observed distribution.

Every function is vectorized over channels and candidates: no Python loop over bins.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..encoding import num_steps
from .observers import Histogram, interp

#: Fractions of the observed extremes tried as clipping points by the SQNR search.
SQNR_ASYM_STEPS = 24
SQNR_SYM_STEPS = 128
#: Weight of clipping noise against rounding noise (AIMET's TF-enhanced uses 3 too).
SQNR_CLIP_WEIGHT = 3.0


def percentile_range(hist: Histogram, percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Values below which ``100 - p`` % and ``p`` % of the observed mass lie."""
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    cdf = torch.nn.functional.pad(hist.counts.cumsum(1), (1, 0))
    cdf = cdf / cdf[:, -1:].clamp_min(1e-300)
    p = torch.tensor([[1 - percentile / 100, percentile / 100]], dtype=torch.float64, device=cdf.device)
    # invert the CDF: interpolate edges as a function of the cumulative mass
    q = interp(p.expand(cdf.shape[0], 2), cdf, hist.edges)
    return q[:, 0], q[:, 1]


@dataclass
class SqnrResult:
    min: torch.Tensor  # (C,)
    max: torch.Tensor  # (C,)
    sqnr_db: torch.Tensor  # (C,) expected SQNR of the chosen candidate


def sqnr_candidates(hist: Histogram, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate clipping ranges, ``(C, K)`` lows and highs.

    Let ``m = min(observed_min, 0)``, ``M = max(observed_max, 0)``.
    Asymmetric: every pair ``(m * i / N, M * j / N)`` for ``i, j`` in ``1..N``
    (``N = SQNR_ASYM_STEPS``, so ``N**2`` candidates). Symmetric: ``(-A k / N, A k / N)`` for
    ``k`` in ``1..N`` with ``A = max(-m, M)`` and ``N = SQNR_SYM_STEPS``.
    """
    m = torch.clamp(hist.lo, max=0.0)[:, None]
    M = torch.clamp(hist.hi, min=0.0)[:, None]
    if symmetric:
        f = torch.arange(1, SQNR_SYM_STEPS + 1, dtype=torch.float64, device=m.device) / SQNR_SYM_STEPS
        a = torch.maximum(-m, M) * f
        return -a, a
    f = torch.arange(1, SQNR_ASYM_STEPS + 1, dtype=torch.float64, device=m.device) / SQNR_ASYM_STEPS
    lo = (m * f)[:, :, None].expand(-1, -1, len(f))
    hi = (M * f)[:, None, :].expand(-1, len(f), -1)
    return lo.reshape(m.shape[0], -1), hi.reshape(m.shape[0], -1)


def grid_of(lo: torch.Tensor, hi: torch.Tensor, bitwidth: int, symmetric: bool):
    """The (scale, offset) that :meth:`Encoding.from_min_max` gives, elementwise."""
    tiny = torch.finfo(torch.float32).tiny * 2**10
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / (2 ** (bitwidth - 1) - 1), min=tiny)
        offset = torch.full_like(scale, -(2 ** (bitwidth - 1)))
    else:
        scale = torch.clamp((hi - lo) / num_steps(bitwidth), min=tiny)
        offset = torch.round(lo / scale)
    return scale, offset


def expected_noise(hist: Histogram, lo: torch.Tensor, hi: torch.Tensor, bitwidth: int, symmetric: bool,
                   clip_weight: float = SQNR_CLIP_WEIGHT) -> torch.Tensor:
    """Expected squared error per value for each candidate, ``(C, K)``.

    For a bin with center ``c`` and probability ``p``: inside the grid's range
    ``[offset*s, (offset + 2**b - 1)*s]`` the rounding noise is ``s**2 / 12`` (uniform error),
    outside it is ``clip_weight * (c - clamp(c))**2``. Evaluated with prefix sums of ``p``,
    ``p*c`` and ``p*c**2``, so the cost is ``O(C * (B + K log B))``, not ``O(C * K * B)``.
    """
    scale, offset = grid_of(lo, hi, bitwidth, symmetric)
    return grid_noise(hist, scale, offset * scale, (offset + num_steps(bitwidth)) * scale, clip_weight)


def grid_noise(hist: Histogram, scale: torch.Tensor, qlo: torch.Tensor, qhi: torch.Tensor,
               clip_weight: float = SQNR_CLIP_WEIGHT) -> torch.Tensor:
    """:func:`expected_noise` for grids given directly: ``scale``, ``qlo``, ``qhi`` are ``(C, K)``."""
    c = hist.centers
    p = hist.counts / hist.counts.sum(1, keepdim=True).clamp_min(1e-300)
    prefix = [torch.nn.functional.pad(torch.cumsum(p * c**k, 1), (1, 0)) for k in range(3)]
    n_lo = torch.searchsorted(c.contiguous(), qlo.contiguous(), right=False)  # bins with c < qlo
    n_hi = torch.searchsorted(c.contiguous(), qhi.contiguous(), right=True)  # bins with c <= qhi
    below = [P.gather(1, n_lo) for P in prefix]
    above = [P[:, -1:] - P.gather(1, n_hi) for P in prefix]
    clip_lo = below[2] - 2 * qlo * below[1] + qlo**2 * below[0]
    clip_hi = above[2] - 2 * qhi * above[1] + qhi**2 * above[0]
    inside = prefix[0].gather(1, n_hi) - below[0]
    return scale**2 / 12 * inside + clip_weight * (clip_lo.clamp_min(0) + clip_hi.clamp_min(0))


def sqnr_db(hist: Histogram, noise: torch.Tensor) -> torch.Tensor:
    """``10 log10(E[x^2] / noise)`` per channel, for a ``(C,)`` noise."""
    p = hist.counts / hist.counts.sum(1, keepdim=True).clamp_min(1e-300)
    power = (p * hist.centers**2).sum(1)
    return 10 * torch.log10(power.clamp_min(1e-300) / noise.clamp_min(1e-300))


def encoding_sqnr(hist: Histogram, enc) -> torch.Tensor:
    """Expected SQNR (dB) of an existing :class:`~qat_plugin.encoding.Encoding` on ``hist``, ``(C,)``."""
    col = lambda t: t.reshape(-1, 1).to(torch.float64).expand(hist.counts.shape[0], 1)
    return sqnr_db(hist, grid_noise(hist, col(enc.scale), col(enc.min), col(enc.max))[:, 0])


def sqnr_search(hist: Histogram, bitwidth: int, symmetric: bool, clip_weight: float = SQNR_CLIP_WEIGHT,
                max_elements: int = 2**24) -> SqnrResult:
    """Pick, per channel, the candidate range with the highest SQNR.

    ``SQNR = 10 log10(E[x**2] / noise)`` with ``noise`` from :func:`expected_noise`.
    Channels are processed in chunks of at most ``max_elements`` (C x (K + B)) values.
    """
    lo_c, hi_c = sqnr_candidates(hist, symmetric)
    C, K, B = hist.counts.shape[0], lo_c.shape[1], hist.counts.shape[1]
    chunk = max(1, max_elements // (K + B))
    los, his, dbs = [], [], []
    for s in range(0, C, chunk):
        part = Histogram(hist.counts[s:s + chunk], hist.lo[s:s + chunk], hist.hi[s:s + chunk])
        noise = expected_noise(part, lo_c[s:s + chunk], hi_c[s:s + chunk], bitwidth, symmetric, clip_weight)
        best = noise.argmin(1, keepdim=True)
        los.append(lo_c[s:s + chunk].gather(1, best)[:, 0])
        his.append(hi_c[s:s + chunk].gather(1, best)[:, 0])
        dbs.append(sqnr_db(part, noise.gather(1, best)[:, 0]))
    return SqnrResult(torch.cat(los), torch.cat(his), torch.cat(dbs))
