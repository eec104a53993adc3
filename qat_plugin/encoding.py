"""Affine encodings: the numbers that describe one quantization grid.

Convention (AIMET's, used everywhere in this package)::

    q     = clamp(round(x / scale) - offset, 0, 2**bitwidth - 1)     # unsigned view
    x_hat = (q + offset) * scale

``offset`` is an integer <= 0 (it is minus the zero point), so the grid always holds 0
exactly. A symmetric encoding has ``offset = -2**(bitwidth - 1)``: in ONNX's signed view
that is ``zero_point = 0`` with ``q_signed = q + offset`` in ``[-2**(b-1), 2**(b-1) - 1]``.
The one conversion to ONNX lives in :meth:`Encoding.onnx_zero_point`:

    asymmetric  -> uint<b>, zero_point = -offset
    symmetric   -> int<b>,  zero_point = 0

``round`` is round-half-to-even, as in ONNX ``QuantizeLinear``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def num_steps(bitwidth: int) -> int:
    return 2**bitwidth - 1


@dataclass(frozen=True)
class Encoding:
    """One tensor's (or one channel set's) quantization grid.

    ``scale`` and ``offset`` are float64 tensors of shape ``()`` (per-tensor) or ``(C,)``
    (per-channel along ``axis``).

    >>> enc = Encoding.from_min_max(torch.tensor(-1.0), torch.tensor(3.0), bitwidth=8, symmetric=False)
    >>> round(float(enc.scale), 6), int(enc.offset)
    (0.015686, -64)
    >>> round(float(enc.min), 4), round(float(enc.max), 4)
    (-1.0039, 2.9961)
    """

    scale: torch.Tensor
    offset: torch.Tensor
    bitwidth: int
    symmetric: bool
    axis: Optional[int] = None

    def __post_init__(self):
        if not 2 <= self.bitwidth <= 16:
            raise ValueError(f"bitwidth must be in [2, 16], got {self.bitwidth}")
        if self.scale.shape != self.offset.shape:
            raise ValueError("scale and offset must have the same shape")
        if self.axis is None and self.scale.dim() != 0:
            raise ValueError("a per-tensor encoding has scalar scale/offset; pass axis for per-channel")
        if not bool(torch.all(self.scale > 0)):
            raise ValueError("scale must be positive")

    @property
    def min(self) -> torch.Tensor:
        return self.offset * self.scale

    @property
    def max(self) -> torch.Tensor:
        return (self.offset + num_steps(self.bitwidth)) * self.scale

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(min, max)`` that :meth:`from_min_max` maps back to this same encoding.

        Asymmetric: the grid's ends. Symmetric: ``+-scale * (2**(b-1) - 1)`` (the grid's
        extra negative level is not part of the requested range).
        """
        if self.symmetric:
            top = self.scale * (2 ** (self.bitwidth - 1) - 1)
            return -top, top
        return self.min, self.max

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @classmethod
    def from_min_max(cls, min: torch.Tensor, max: torch.Tensor, bitwidth: int, symmetric: bool,
                     axis: Optional[int] = None) -> "Encoding":
        """The grid that covers ``[min, max]`` (widened to hold 0).

        Symmetric: ``scale = max(|min|, |max|) / (2**(b-1) - 1)``, ``offset = -2**(b-1)``
        (so the signed grid is ``[-2**(b-1), 2**(b-1) - 1]``, like AIMET's non-strict mode).
        Asymmetric: ``scale = (max - min) / (2**b - 1)``, ``offset = round(min / scale)``.
        Degenerate ranges get a tiny positive scale so that the grid stays valid.
        """
        lo = torch.clamp(min.detach().double(), max=0.0)
        hi = torch.clamp(max.detach().double(), min=0.0)
        tiny = torch.finfo(torch.float32).tiny * 2**10
        if symmetric:
            absmax = torch.maximum(-lo, hi)
            scale = torch.clamp(absmax / (2 ** (bitwidth - 1) - 1), min=tiny)
            offset = torch.full_like(scale, -(2 ** (bitwidth - 1)))
        else:
            scale = torch.clamp((hi - lo) / num_steps(bitwidth), min=tiny)
            offset = torch.round(lo / scale)
        return cls(scale, offset, bitwidth, symmetric, axis)

    def to_cpu(self) -> "Encoding":
        return Encoding(self.scale.cpu(), self.offset.cpu(), self.bitwidth, self.symmetric, self.axis)

    def onnx_zero_point(self) -> torch.Tensor:
        """Zero point in ONNX's view: 0 (signed int) when symmetric, ``-offset`` (unsigned) otherwise."""
        if self.symmetric:
            return torch.zeros_like(self.offset, dtype=torch.int64)
        return (-self.offset).to(torch.int64)

    def onnx_signed(self) -> bool:
        return self.symmetric

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        """Reference fake-quantization in float64 (used by tests and export checks)."""
        scale, offset = self._broadcast(x)
        q = torch.clamp(torch.round(x.double() / scale) - offset, 0, num_steps(self.bitwidth))
        return (q + offset) * scale

    def _broadcast(self, x: torch.Tensor):
        if self.axis is None:
            return self.scale, self.offset
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return self.scale.reshape(shape), self.offset.reshape(shape)

    def to_json(self) -> list[dict] | dict:
        """AIMET encodings-file entries: one dict per tensor, a list of dicts per channel."""
        entries = []
        for s, o, lo, hi in zip(self.scale.reshape(-1).tolist(), self.offset.reshape(-1).tolist(),
                                self.min.reshape(-1).tolist(), self.max.reshape(-1).tolist()):
            entries.append({"bitwidth": self.bitwidth, "dtype": "int", "is_symmetric": str(self.symmetric),
                            "max": hi, "min": lo, "offset": int(o), "scale": s})
        return entries


#: The largest ``|bias| / bias_scale`` an int32 bias grid uses: 2**30, half the int32 range, so
#: that the integer accumulator (bias + sum of input x weight products) keeps room to grow.
INT32_BIAS_LIMIT = 2**30


def int32_bias_grid(bias: torch.Tensor, input_scale: torch.Tensor,
                    weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 grid of a weighted layer's bias: ``(weight_scale, bias_scale)``, in float32.

    ``bias_scale = input_scale * weight_scale``, where ``weight_scale`` is raised wherever
    ``|bias| / bias_scale`` would pass :data:`INT32_BIAS_LIMIT` (tiny activation scales, or
    dead channels whose weight scale collapsed): to ``|bias| / (input_scale * 2**30)`` per
    channel, or, for a per-tensor ``weight_scale``, for the whole tensor. A raised channel's
    weight must be quantized with the returned scale (the simulation and the export both do;
    the export's int8 weights and encodings file carry it). Both the simulation
    (:meth:`qat_plugin.modules._QuantizedWeights.quantized_bias`) and the ONNX export call this
    function; the floor is computed without gradients.

    >>> w, b = int32_bias_grid(torch.tensor([0.5, 4.0]), torch.tensor(1e-6), torch.tensor([1e-3, 1e-6]))
    >>> [f"{v:.3g}" for v in w.tolist()]   # channel 1: 4 / (1e-6 * 1e-6) = 4e12 > 2**30, so raised
    ['0.001', '0.00373']
    >>> [round(v) for v in (torch.tensor([0.5, 4.0]) / b).tolist()]
    [499999968, 1073741824]
    """
    bias = bias.detach().float()
    s_in, s_w = input_scale.float(), weight_scale.float()
    floor = (bias.abs() / (s_in.detach() * INT32_BIAS_LIMIT)).to(s_w.dtype)
    if s_w.dim() == 0 or s_w.numel() == 1:
        floor = floor.max() if floor.numel() else floor.new_zeros(())
        floor = floor.reshape(s_w.shape)
    else:
        floor = floor.reshape(s_w.shape)
    s_w = torch.maximum(s_w, floor)
    return s_w, s_in * s_w
