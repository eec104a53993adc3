"""The encodings file, in AIMET's encodings format version 0.6.1.

Layout (what AIMET writes and its tools read)::

    {
      "version": "0.6.1",
      "activation_encodings": {"<onnx tensor>": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False",
                                                  "max": 2.9, "min": -1.0, "offset": -64, "scale": 0.0156}]},
      "param_encodings": {"<onnx initializer>": [{...}, {...}]},   # one entry per output channel
      "excluded_layers": [],
      "quantizer_args": {...}
    }

``is_symmetric`` is the string "True"/"False" as AIMET writes it; ``offset`` follows AIMET's
sign (``-zero_point`` for asymmetric grids, ``-2**(b-1)`` for symmetric ones). Version 0.6.1 has
no per-channel axis: lists longer than one are per output channel (axis 0, or 1 for
ConvTranspose weights); this package also writes ``"qat_plugin_axes"`` with the exact axis.

Every entry carries its own ``bitwidth``, so a mixed-precision file (int4 / int8 / int16) needs
nothing more; ``"qat_plugin_bitwidths"`` summarizes the mix: how many activation and param
tensors the file holds at each bitwidth (``{"activation": {"8": 60, "16": 2}, "param": {"4": 40,
"8": 13}}``; :func:`bitwidth_mix`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..encoding import Encoding

VERSION = "0.6.1"


@dataclass
class EncodingsFile:
    activation_encodings: dict[str, Encoding] = field(default_factory=dict)
    param_encodings: dict[str, Encoding] = field(default_factory=dict)
    quantizer_args: dict = field(default_factory=dict)


def _entries(enc: Encoding) -> list[dict]:
    return [{"bitwidth": e["bitwidth"], "dtype": "int", "is_symmetric": e["is_symmetric"], "max": e["max"],
             "min": e["min"], "offset": e["offset"], "scale": e["scale"]} for e in enc.to_json()]


def bitwidth_mix(activation: dict[str, Encoding], params: dict[str, Encoding]) -> dict[str, dict[str, int]]:
    """Tensors per bitwidth, by kind: ``{"activation": {"8": 5, "16": 1}, "param": {"4": 2}}``.

    >>> import torch
    >>> e = lambda b: Encoding(torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64), b, False)
    >>> bitwidth_mix({"x": e(8), "y": e(16), "z": e(8)}, {"w": e(4)})
    {'activation': {'8': 2, '16': 1}, 'param': {'4': 1}}
    """
    def count(encs):
        bws = [e.bitwidth for e in encs.values()]
        return {str(b): bws.count(b) for b in sorted(set(bws))}
    return {"activation": count(activation), "param": count(params)}


def write_encodings(path: str | os.PathLike, activation: dict[str, Encoding], params: dict[str, Encoding],
                    quantizer_args: Optional[dict] = None) -> None:
    data = {
        "version": VERSION,
        "activation_encodings": {k: _entries(v) for k, v in activation.items()},
        "param_encodings": {k: _entries(v) for k, v in params.items()},
        "excluded_layers": [],
        "quantizer_args": quantizer_args or {},
        "qat_plugin_axes": {k: v.axis for k, v in {**activation, **params}.items() if v.axis is not None},
        "qat_plugin_bitwidths": bitwidth_mix(activation, params),
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() == "true"


def _encoding(entries: list[dict], axis: Optional[int]) -> Encoding:
    scale = torch.tensor([float(e["scale"]) for e in entries], dtype=torch.float64)
    offset = torch.tensor([float(e["offset"]) for e in entries], dtype=torch.float64)
    if len(entries) == 1 and axis is None:
        scale, offset = scale[0], offset[0]
    elif axis is None:
        axis = 0
    return Encoding(scale, offset, int(entries[0]["bitwidth"]), _bool(entries[0]["is_symmetric"]), axis)


def load_encodings(path: str | os.PathLike) -> EncodingsFile:
    """Read an encodings file (ours or AIMET's 0.6.1 layout) into :class:`Encoding` objects.

    Per-channel lists take their axis from ``qat_plugin_axes`` when present, else axis 0.
    """
    with open(path) as f:
        data = json.load(f)
    axes = data.get("qat_plugin_axes", {})
    return EncodingsFile(
        {k: _encoding(v, axes.get(k)) for k, v in data.get("activation_encodings", {}).items()},
        {k: _encoding(v, axes.get(k)) for k, v in data.get("param_encodings", {}).items()},
        data.get("quantizer_args", {}),
    )
