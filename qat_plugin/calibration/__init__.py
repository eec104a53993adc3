"""Calibration: observers (statistics) and range setting (statistics -> encodings)."""
from __future__ import annotations

from typing import Optional

from ..encoding import Encoding
from ..errors import CalibrationError
from .observers import Histogram, HistogramObserver, MinMaxObserver
from .range_setting import percentile_range, sqnr_search

QUANT_SCHEMES = ("tf", "tf_enhanced", "percentile")
#: Schemes for weights (a percentile of a weight tensor would clip its largest weights by count).
PARAM_QUANT_SCHEMES = ("tf", "tf_enhanced")

__all__ = ["QUANT_SCHEMES", "PARAM_QUANT_SCHEMES", "check_quant_scheme", "param_scheme_for", "Histogram", "HistogramObserver", "MinMaxObserver", "make_observer",
           "encoding_from_observer", "percentile_range", "sqnr_search"]


def check_quant_scheme(scheme: str) -> str:
    """``scheme`` if it is one of :data:`QUANT_SCHEMES`, else :class:`QuantConfigError` with a suggestion."""
    if scheme not in QUANT_SCHEMES:
        from ..errors import QuantConfigError, did_you_mean
        raise QuantConfigError(f"unknown quant_scheme '{scheme}'." + did_you_mean(scheme, QUANT_SCHEMES))
    return scheme


def param_scheme_for(quant_scheme: str, param_quant_scheme: Optional[str] = None) -> str:
    """The scheme that sets weight encodings: ``param_quant_scheme`` if given (``tf`` or
    ``tf_enhanced``), else ``quant_scheme`` (``tf`` for ``percentile``)."""
    check_quant_scheme(quant_scheme)
    if param_quant_scheme is None:
        return "tf" if quant_scheme == "percentile" else quant_scheme
    if param_quant_scheme not in PARAM_QUANT_SCHEMES:
        from ..errors import QuantConfigError, did_you_mean
        raise QuantConfigError(f"unknown param_quant_scheme '{param_quant_scheme}' (weights take "
                               f"{' or '.join(PARAM_QUANT_SCHEMES)})." + did_you_mean(param_quant_scheme, PARAM_QUANT_SCHEMES))
    return param_quant_scheme


def make_observer(scheme: str, axis: Optional[int] = None, name: str = ""):
    """The observer a quant scheme needs: min-max for ``tf``, a histogram otherwise."""
    if scheme == "tf":
        return MinMaxObserver(axis=axis, name=name)
    if scheme == "tf_enhanced":
        return HistogramObserver(num_bins=512 if axis is None else 256, axis=axis, name=name)
    check_quant_scheme(scheme)
    return HistogramObserver(num_bins=2048, axis=axis, name=name)


def encoding_from_observer(observer, scheme: str, bitwidth: int, symmetric: bool, axis: Optional[int],
                           percentile: float = 99.99) -> Encoding:
    """Turn an observer's statistics into an encoding with the scheme's range setting."""
    if not observer.has_data():
        raise CalibrationError(
            f"quantizer site '{observer.name}' saw no data during calibration: make sure the "
            "forward_pass_callback runs the model (sim.model) on at least one batch")
    if scheme == "tf":
        lo, hi = observer.min, observer.max
    elif scheme == "percentile":
        lo, hi = percentile_range(observer.hist, percentile)
    else:
        res = sqnr_search(observer.hist, bitwidth, symmetric)
        lo, hi = res.min, res.max
    if axis is None:
        lo, hi = lo.reshape(()), hi.reshape(())
    return Encoding.from_min_max(lo, hi, bitwidth, symmetric, axis)
