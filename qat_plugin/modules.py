"""Fake-quantized weighted layers: the torch layer, with its weight (and optionally its bias)
passed through quantizers in ``forward``. Parameters are the original ones (shared, not copied).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import QuantizeDequantize, _RoundSTE

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class _QuantizedWeights:
    """What every quantized layer adds: ``param_quantizers['weight']`` and an int32 bias grid."""

    param_quantizers: nn.ModuleDict
    _bias_input: list  # [QuantizeDequantize] whose scale sets the bias grid; [] keeps bias in float

    def _attach(self, weight_quantizer: QuantizeDequantize) -> None:
        self.param_quantizers = nn.ModuleDict({"weight": weight_quantizer})
        self._bias_input = []

    def set_bias_input_quantizer(self, quantizer: Optional[QuantizeDequantize]) -> None:
        """Quantize the bias to int32 with ``scale = input_scale * weight_scale`` (None: float bias)."""
        self._bias_input = [quantizer] if quantizer is not None else []

    def quantized_weight(self) -> torch.Tensor:
        return self.param_quantizers["weight"](self.weight)

    def quantized_bias(self) -> Optional[torch.Tensor]:
        bias = self.bias
        if bias is None or not self._bias_input:
            return bias
        src, wq = self._bias_input[0], self.param_quantizers["weight"]
        if not (src.enabled and wq.enabled and src.is_initialized() and wq.is_initialized()):
            return bias
        with torch.autocast(device_type=bias.device.type, enabled=False):
            scale = (src.scale.float() * wq.scale.float()).detach().expand_as(bias)
            q = torch.clamp(_RoundSTE.apply(bias.float() / scale), INT32_MIN, INT32_MAX)
            return (q * scale).to(bias.dtype)


def _conv_kwargs(m) -> dict:
    kw = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
              stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
              bias=m.bias is not None, padding_mode=m.padding_mode)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        kw["output_padding"] = m.output_padding
    return kw


class QuantizedConv1d(_QuantizedWeights, nn.Conv1d):
    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.quantized_bias())


class QuantizedConv2d(_QuantizedWeights, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.quantized_bias())


class QuantizedConv3d(_QuantizedWeights, nn.Conv3d):
    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.quantized_bias())


class _QuantizedConvTransposeNd(_QuantizedWeights):
    _fn = None
    _dims = 0

    def forward(self, x, output_size=None):
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              self._dims, self.dilation)
        return type(self)._fn(x, self.quantized_weight(), self.quantized_bias(), self.stride, self.padding,
                              output_padding, self.groups, self.dilation)


class QuantizedConvTranspose1d(_QuantizedConvTransposeNd, nn.ConvTranspose1d):
    _fn, _dims = staticmethod(F.conv_transpose1d), 1


class QuantizedConvTranspose2d(_QuantizedConvTransposeNd, nn.ConvTranspose2d):
    _fn, _dims = staticmethod(F.conv_transpose2d), 2


class QuantizedConvTranspose3d(_QuantizedConvTransposeNd, nn.ConvTranspose3d):
    _fn, _dims = staticmethod(F.conv_transpose3d), 3


class QuantizedLinear(_QuantizedWeights, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.quantized_weight(), self.quantized_bias())


QUANTIZED = {
    nn.Conv1d: QuantizedConv1d, nn.Conv2d: QuantizedConv2d, nn.Conv3d: QuantizedConv3d,
    nn.ConvTranspose1d: QuantizedConvTranspose1d, nn.ConvTranspose2d: QuantizedConvTranspose2d,
    nn.ConvTranspose3d: QuantizedConvTranspose3d, nn.Linear: QuantizedLinear,
}


def quantize_module(mod: nn.Module, weight_quantizer: QuantizeDequantize) -> nn.Module:
    """The quantized twin of ``mod``, sharing its parameters, in ``mod``'s train/eval mode."""
    cls = QUANTIZED.get(type(mod))
    if cls is None:
        raise TypeError(f"no quantized version of {type(mod).__name__}; supported: "
                        f"{', '.join(c.__name__ for c in QUANTIZED)}")
    if isinstance(mod, nn.Linear):
        new = cls(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
    else:
        new = cls(**_conv_kwargs(mod), device="meta")
    new.weight = mod.weight
    new.bias = mod.bias
    new._attach(weight_quantizer.to(mod.weight.device))
    new.train(mod.training)
    return new
