"""Runtime configs: load a preset by name or a JSON file by path."""
from __future__ import annotations

import json
import os
from importlib import resources
from typing import Union

from ..errors import QuantConfigError, did_you_mean
from .schema import OpRule, ParamRule, PrecisionRule, RuntimeConfig, check_exportable_bitwidth

__all__ = ["RuntimeConfig", "OpRule", "ParamRule", "PrecisionRule", "check_exportable_bitwidth", "load_config",
           "preset_names"]


def preset_names() -> list[str]:
    """Names of the presets shipped with the package (``default``, ``tensorrt``, ...)."""
    files = resources.files(__package__).joinpath("presets").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json"))


def load_config(config: Union[None, str, os.PathLike, dict, RuntimeConfig] = None) -> RuntimeConfig:
    """A :class:`RuntimeConfig` from a preset name, a JSON path, a dict, or ``None`` (``default``).

    >>> load_config("tensorrt").ops_symmetric
    True
    >>> load_config("tensorrrt")
    Traceback (most recent call last):
    ...
    qat_plugin.errors.QuantConfigError: 'tensorrrt' is neither a preset nor an existing file. Did you mean 'tensorrt'?
    """
    if isinstance(config, RuntimeConfig):
        return config
    if config is None:
        config = "default"
    if isinstance(config, dict):
        return RuntimeConfig.from_dict(config)
    path = os.fspath(config)
    if path in preset_names():
        text = resources.files(__package__).joinpath("presets", f"{path}.json").read_text()
        return RuntimeConfig.from_dict(json.loads(text))
    if not os.path.isfile(path):
        raise QuantConfigError(f"'{path}' is neither a preset nor an existing file." + did_you_mean(path, preset_names()))
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise QuantConfigError(f"{path}: not valid JSON ({e})") from None
    return RuntimeConfig.from_dict(data)
