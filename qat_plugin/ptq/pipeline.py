"""The post-training steps as one validated config, for the callback, recipes and the CLI.

``PTQConfig(cle=True, adaround={"num_iterations": 300}, bias_correction=True)``:

1. :meth:`PTQConfig.prepare` runs on the FP32 network before the simulation is built
   (cross-layer equalization with high-bias absorption);
2. :meth:`PTQConfig.apply` runs on the calibrated simulation (AdaRound, then bias correction).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from torch import nn

from ..errors import QuantConfigError, did_you_mean
from .adaround import AdaroundReport, apply_adaround
from .bias_correction import correct_bias
from .cle import RELU6_POLICIES, equalize_model

_ADAROUND_ARGS = tuple(p for p in inspect.signature(apply_adaround).parameters if p not in ("sim", "data", "num_batches"))
_BIAS_ARGS = ("progress",)


def _options(value: Union[bool, dict, None], allowed: tuple[str, ...], what: str) -> Optional[dict]:
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise QuantConfigError(f"ptq.{what} must be true/false or a dict of options, got {value!r}")
    for key in value:
        if key not in allowed:
            raise QuantConfigError(f"unknown ptq.{what} option '{key}'." + did_you_mean(key, allowed))
    return dict(value)


@dataclass(frozen=True)
class PTQConfig:
    """Which post-training steps run, with their options.

    Args:
        cle: cross-layer equalization + high-bias absorption on the FP32 network.
        relu6: CLE's ReLU6 policy, ``"skip"`` or ``"relu"`` (see :func:`equalize_model`).
        adaround: ``True`` or a dict of :func:`apply_adaround` options
            (``num_iterations``, ``reg_param``, ``beta_range``, ``warm_start``, ``rows``, ...).
        bias_correction: ``True`` or a dict of :func:`correct_bias` options (``progress``).
        num_batches: batches of data for AdaRound and bias correction (default: all given).

    >>> PTQConfig.from_value({"cle": True, "adaround": {"num_iterations": 50}})
    PTQConfig(cle=True, relu6='skip', adaround={'num_iterations': 50}, bias_correction=None, num_batches=None)
    >>> PTQConfig.from_value({"adaround": {"num_iteration": 50}})
    Traceback (most recent call last):
    ...
    qat_plugin.errors.QuantConfigError: unknown ptq.adaround option 'num_iteration'. Did you mean 'num_iterations'?
    """

    cle: bool = False
    relu6: str = "skip"
    adaround: Union[bool, dict, None] = None
    bias_correction: Union[bool, dict, None] = None
    num_batches: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.cle, bool):
            raise QuantConfigError(f"ptq.cle must be true or false, got {self.cle!r}")
        if self.relu6 not in RELU6_POLICIES:
            raise QuantConfigError(f"unknown ptq.relu6 '{self.relu6}'." + did_you_mean(str(self.relu6), RELU6_POLICIES))
        object.__setattr__(self, "adaround", _options(self.adaround, _ADAROUND_ARGS, "adaround"))
        object.__setattr__(self, "bias_correction", _options(self.bias_correction, _BIAS_ARGS, "bias_correction"))
        if self.num_batches is not None and (isinstance(self.num_batches, bool) or not isinstance(self.num_batches, int)
                                             or self.num_batches < 1):
            raise QuantConfigError(f"ptq.num_batches must be a positive int, got {self.num_batches!r}")

    @classmethod
    def from_value(cls, value: Union[None, bool, dict, "PTQConfig"]) -> Optional["PTQConfig"]:
        """``None``/``False``: no PTQ steps; ``True``: all three; a dict: its fields; a PTQConfig."""
        if value is None or value is False:
            return None
        if isinstance(value, PTQConfig):
            return value
        if value is True:
            return cls(cle=True, adaround=True, bias_correction=True)
        if not isinstance(value, dict):
            raise QuantConfigError(f"ptq must be true/false, a dict or a PTQConfig, got {value!r}")
        names = [f.name for f in fields(cls)]
        for key in value:
            if key not in names:
                raise QuantConfigError(f"unknown ptq field '{key}'." + did_you_mean(key, names))
        return cls(**value)

    def prepare(self, network: nn.Module, dummy_input: Any) -> nn.Module:
        """The FP32 step: CLE (in place) when ``cle``."""
        if self.cle:
            was = network.training
            network.eval()
            equalize_model(network, dummy_input, relu6=self.relu6)
            network.train(was)
        return network

    def apply(self, sim, data: list) -> dict:
        """The steps on a calibrated sim: AdaRound, then bias correction. Returns their reports
        (``{"adaround": AdaroundReport, "bias_correction": {layer: shift}}``)."""
        out: dict = {}
        if self.adaround is not None:
            out["adaround"] = apply_adaround(sim, data, self.num_batches, **self.adaround)
        if self.bias_correction is not None:
            out["bias_correction"] = correct_bias(sim, data, self.num_batches, **self.bias_correction)
        return out
