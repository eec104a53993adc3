"""Fake-quantized weighted layers: the torch layer, with its weight (and optionally its bias)
passed through quantizers in ``forward``. Parameters are the original ones (shared, not copied).
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .encoding import int32_bias_grid
from .quantizer import QuantizeDequantize, _RoundSTE

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def scale_output_channels(layer: nn.Module, w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``w`` (``layer``'s weight layout) with each output channel multiplied by ``factor``."""
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g, shape = layer.groups, w.shape  # weight: (in, out/g, *k); output channel o = gi * (out/g) + j
        return (w.reshape(g, shape[0] // g, shape[1], *shape[2:])
                * factor.reshape(g, 1, shape[1], *([1] * (w.dim() - 2)))).reshape(shape)
    return w * factor.reshape(-1, *([1] * (w.dim() - 1)))


class _QuantizedWeights:
    """What every quantized layer adds: ``param_quantizers['weight']``, an int32 bias grid and,
    in simulated-folding mode, the BatchNorm it absorbs (``self.bn``).

    With ``bn``: the weight is folded with the BN's running statistics before it is quantized
    (``w * gamma / sqrt(var + eps)``). In eval mode, or once ``freeze_batch_norm()`` was called,
    the layer is exactly the folded layer. In training mode before that, the convolution output
    is unscaled and normalized by BN with batch statistics, which also updates the running
    statistics (the approximate simulated fold of Krishnamoorthi, 2018, as in torch.ao).
    """

    param_quantizers: nn.ModuleDict
    _bias_input: list  # [QuantizeDequantize] whose scale sets the bias grid; [] keeps bias in float

    def _attach(self, weight_quantizer: QuantizeDequantize) -> None:
        self.param_quantizers = nn.ModuleDict({"weight": weight_quantizer})
        self._bias_input = []
        self.bn = None
        self.bn_frozen = False

    def attach_batch_norm(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        self.bn = bn
        self.bn.train(self.training)

    def freeze_batch_norm(self) -> None:
        """Stop updating BN statistics: from now on the layer is the folded layer in train mode too."""
        self.bn_frozen = True
        if self.bn is not None:
            self.bn.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.bn is not None and self.bn_frozen:
            self.bn.eval()
        return self

    def _bn_factor(self) -> torch.Tensor:
        bn = self.bn
        factor = torch.rsqrt(bn.running_var + bn.eps)
        return factor * bn.weight if bn.weight is not None else factor

    def folded_weight(self) -> torch.Tensor:
        if self.bn is None:
            return self.weight
        return scale_output_channels(self, self.weight, self._bn_factor())

    def folded_bias(self) -> Optional[torch.Tensor]:
        if self.bn is None:
            return self.bias
        bn = self.bn
        bias = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        return (bias - bn.running_mean) * self._bn_factor() + beta

    def _quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None or not self.bn.training:
            return self._apply_layer(x, self.quantized_weight(), self.quantized_bias())
        y = self._apply_layer(x, self.quantized_weight(), None)
        shape = [1, -1] + [1] * (y.dim() - 2)
        y = y / self._bn_factor().reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return self.bn(y)

    def set_bias_input_quantizer(self, quantizer: Optional[QuantizeDequantize]) -> None:
        """Quantize the bias to int32 with ``scale = input_scale * weight_scale`` (None: float bias)."""
        self._bias_input = [quantizer] if quantizer is not None else []

    def _bias_grid(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(weight_scale, bias_scale)`` of the int32 bias grid (:func:`~qat_plugin.encoding.int32_bias_grid`:
        the weight scale raised where the bias would not fit in int32), or None without a grid."""
        bias = self.folded_bias()
        if bias is None or not self._bias_input:
            return None
        src, wq = self._bias_input[0], self.param_quantizers["weight"]
        if not (src.enabled and wq.enabled and src.is_initialized() and wq.is_initialized()):
            return None
        with torch.autocast(device_type=bias.device.type, enabled=False):
            w_scale, b_scale = int32_bias_grid(bias, src.scale.abs(), wq.scale.abs())
        if not getattr(self, "_bias_grid_checked", False):  # once per layer: this reads the device
            self._bias_grid_checked = True
            raised = int((w_scale.detach() > wq.scale.detach().abs().float()).sum())
            if raised:
                warnings.warn(f"int32 bias overflow in '{wq.name}': |bias| / (input_scale x weight_scale) passes "
                              f"2**30 in {raised} channel(s); their weight scale is raised so that the bias fits "
                              "(the export writes the raised scale)", RuntimeWarning, stacklevel=3)
        return w_scale, b_scale

    def weight_scale_factor(self) -> Optional[torch.Tensor]:
        """How much the int32 bias grid raises the weight quantizer's scale (``>= 1``, detached; per
        channel or per tensor, as the quantizer's scale), or None when it has no bias grid."""
        grid = self._bias_grid()
        if grid is None:
            return None
        return (grid[0] / self.param_quantizers["weight"].scale.abs().float()).detach()

    def weight_encoding(self):
        """The weight's :class:`~qat_plugin.encoding.Encoding` as the layer uses it: the weight
        quantizer's, with the scale the int32 bias grid raised (what the export writes).

        >>> conv = sim.model.get_submodule("conv1")                        # doctest: +SKIP
        >>> conv.weight_scale_factor().max(), conv.weight_encoding().scale  # doctest: +SKIP
        (tensor(21.6), tensor([...]))   # a channel's scale raised 21.6x so that its bias fits int32
        """
        enc = self.param_quantizers["weight"].encoding
        factor = self.weight_scale_factor()
        if enc is None or factor is None or not bool((factor > 1).any()):
            return enc
        scale = torch.maximum(enc.scale, self._bias_grid()[0].detach().double().cpu().reshape(enc.scale.shape))
        return replace(enc, scale=scale.to(enc.scale.device))

    def quantized_weight(self) -> torch.Tensor:
        w, wq = self.folded_weight(), self.param_quantizers["weight"]
        factor = self.weight_scale_factor()
        if factor is None:
            return wq(w)
        # Q_{r s}(w) = r Q_s(w / r) for any grid: exact (w / 1 * 1 = w) where nothing is raised
        if wq.axis is None:
            return wq(w / factor) * factor
        shape = [1] * w.dim()
        shape[wq.axis] = -1
        return wq(w / factor.reshape(shape)) * factor.reshape(shape)

    def quantized_bias(self) -> Optional[torch.Tensor]:
        bias = self.folded_bias()
        grid = self._bias_grid()
        if grid is None:
            return bias
        with torch.autocast(device_type=bias.device.type, enabled=False):
            scale = grid[1].detach().expand_as(bias)
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
    def _apply_layer(self, x, w, b):
        return self._conv_forward(x, w, b)

    def forward(self, x):
        return self._quantized_forward(x)


class QuantizedConv2d(_QuantizedWeights, nn.Conv2d):
    def _apply_layer(self, x, w, b):
        return self._conv_forward(x, w, b)

    def forward(self, x):
        return self._quantized_forward(x)


class QuantizedConv3d(_QuantizedWeights, nn.Conv3d):
    def _apply_layer(self, x, w, b):
        return self._conv_forward(x, w, b)

    def forward(self, x):
        return self._quantized_forward(x)


class _QuantizedConvTransposeNd(_QuantizedWeights):
    _fn = None
    _dims = 0

    def _apply_layer(self, x, w, b, output_size=None):
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              self._dims, self.dilation)
        return type(self)._fn(x, w, b, self.stride, self.padding, output_padding, self.groups, self.dilation)

    def forward(self, x):
        return self._quantized_forward(x)


class QuantizedConvTranspose1d(_QuantizedConvTransposeNd, nn.ConvTranspose1d):
    _fn, _dims = staticmethod(F.conv_transpose1d), 1


class QuantizedConvTranspose2d(_QuantizedConvTransposeNd, nn.ConvTranspose2d):
    _fn, _dims = staticmethod(F.conv_transpose2d), 2


class QuantizedConvTranspose3d(_QuantizedConvTransposeNd, nn.ConvTranspose3d):
    _fn, _dims = staticmethod(F.conv_transpose3d), 3


class QuantizedLinear(_QuantizedWeights, nn.Linear):
    def _apply_layer(self, x, w, b):
        return F.linear(x, w, b)

    def forward(self, x):
        return self._quantized_forward(x)


class QuantizedEmbedding(_QuantizedWeights, nn.Embedding):
    """An embedding table quantized per row (weight-only: the rows it returns are the table's
    integers times their scales, and the consumer re-quantizes)."""

    bias = None

    def _apply_layer(self, x, w, b):
        return F.embedding(x, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def forward(self, x):
        return self._quantized_forward(x)


QUANTIZED = {
    nn.Conv1d: QuantizedConv1d, nn.Conv2d: QuantizedConv2d, nn.Conv3d: QuantizedConv3d,
    nn.ConvTranspose1d: QuantizedConvTranspose1d, nn.ConvTranspose2d: QuantizedConvTranspose2d,
    nn.ConvTranspose3d: QuantizedConvTranspose3d, nn.Linear: QuantizedLinear, nn.Embedding: QuantizedEmbedding,
}


def quantize_module(mod: nn.Module, weight_quantizer: QuantizeDequantize) -> nn.Module:
    """The quantized twin of ``mod``, sharing its parameters, in ``mod``'s train/eval mode."""
    cls = QUANTIZED.get(type(mod))
    if cls is None and isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward:
        cls = QuantizedLinear  # e.g. nn.MultiheadAttention's out_proj (NonDynamicallyQuantizableLinear)
    if cls is None:
        raise TypeError(f"no quantized version of {type(mod).__name__}; supported: "
                        f"{', '.join(c.__name__ for c in QUANTIZED)}")
    if isinstance(mod, nn.Linear):
        new = cls(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
    elif isinstance(mod, nn.Embedding):
        new = cls(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx, max_norm=mod.max_norm,
                  norm_type=mod.norm_type, scale_grad_by_freq=mod.scale_grad_by_freq, sparse=mod.sparse,
                  device="meta")
    else:
        new = cls(**_conv_kwargs(mod), device="meta")
    new.weight = mod.weight
    if not isinstance(mod, nn.Embedding):
        new.bias = mod.bias
    new._attach(weight_quantizer.to(mod.weight.device))
    new.train(mod.training)
    return new
