"""Exceptions raised by qat_plugin. Each message says what went wrong and how to fix it."""
from __future__ import annotations

import difflib
from typing import Iterable


class QuantConfigError(ValueError):
    """A runtime config (or a QuantSimModel argument) has an unknown key or a bad value."""


class NotCalibratedError(RuntimeError):
    """A quantizer was used before it had an encoding."""


class UnsupportedModelError(RuntimeError):
    """The model cannot be captured or simulated as it is; the message names the way out."""


class CalibrationError(ValueError):
    """Calibration data was unusable (NaN/Inf); the message names the quantizer site."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or a list of valid choices.

    >>> did_you_mean("is_symetric", ["is_symmetric", "is_quantized"])
    " Did you mean 'is_symmetric'?"
    """
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{close[0]}'?"
    return f" Valid choices: {', '.join(repr(c) for c in choices)}."
