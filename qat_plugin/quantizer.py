"""The quantize-dequantize node: a plain module with a straight-through estimator.

>>> import torch
>>> q = QuantizeDequantize(bitwidth=8, symmetric=False)
>>> q.is_initialized()
False
>>> with q.compute_encodings():
...     _ = q(torch.tensor([-1.0, 0.0, 3.0]))
>>> q.is_initialized()
True
>>> q(torch.tensor([0.5, 10.0]))   # 0.5 lands on the grid, 10.0 clips to the grid's max
tensor([0.5020, 2.9961])
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import nn

from .encoding import Encoding, num_steps
from .errors import NotCalibratedError


_MIN_SCALE = torch.finfo(torch.float32).tiny * 2**10


class _RoundSTE(torch.autograd.Function):
    """``round`` forward (half to even, as ONNX), identity backward.

    >>> x = torch.tensor([0.4, 1.5, 2.5], requires_grad=True)
    >>> y = _RoundSTE.apply(x); y.sum().backward()
    >>> y.tolist(), x.grad.tolist()
    ([0.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    """

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _FixedFakeQuantize(torch.autograd.Function):
    """Fake-quantization with a fixed grid: one division, in-place round/clamp/scale, and the
    straight-through gradient masked by one fused kernel.

    ``offset`` is either a Python number (one offset for the whole tensor) or a broadcastable
    tensor (per-channel offsets, handled by shifting the quotient). The gradient passes where
    the quotient lies strictly inside ``[offset - 0.5, offset + 2**b - 1 + 0.5]``: the reference
    clamp's mask, except exactly at the two half-way points.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, bitwidth):
        qmax = num_steps(bitwidth)
        t = x / scale
        if isinstance(offset, torch.Tensor):
            # round before the shift, as ONNX (round(x / s) + zero point): half-to-even is not
            # invariant under a shift by an odd offset; the shifted quotient only sets the mask
            out = torch.round(t).sub_(offset).clamp_(0, qmax).add_(offset).mul_(scale)
            t = t.sub_(offset)
            ctx.bounds = (-0.5, qmax + 0.5)
        else:
            out = torch.round(t).clamp_(offset, offset + qmax).mul_(scale)
            ctx.bounds = (offset - 0.5, offset + qmax + 0.5)
        ctx.save_for_backward(t)
        return out

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, t, *ctx.bounds), None, None, None


class _LearnedFakeQuantize(torch.autograd.Function):
    """LSQ fake-quantization with hand-written gradients (same values as :func:`fake_quantize`,
    which is the autograd reference, in about a third of the memory passes).

    With ``t = x / s - o`` (``o`` rounded), ``v = clamp(round(x / s) - o, 0, 2**b - 1) + o`` and
    ``m = 1`` inside the range: ``dx = g * m``, ``ds = f * sum(g * v - g * m * (t + o))``,
    ``do = f * s * sum(g * (1 - m))`` with ``f`` the LSQ gradient factor; the sums run over the
    values of each scale (per tensor or per channel).

    ``fixed_offset`` (a Python number, for grids whose offset does not learn, e.g. symmetric)
    skips the shift: ``t = x / s`` and ``v = clamp(round(t), o, o + 2**b - 1)``, as the fixed
    path and ONNX's QuantizeLinear (round, then add the zero point) do.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, bitwidth, factor, fixed_offset=None):
        qmax = num_steps(bitwidth)
        if fixed_offset is not None:
            t = x / scale
            v = torch.round(t).clamp_(fixed_offset, fixed_offset + qmax)
            ctx.bounds = (fixed_offset - 0.5, fixed_offset + qmax + 0.5)
            o = None
        else:
            o = torch.round(offset)
            t = x / scale
            v = torch.round(t).sub_(o).clamp_(0, qmax).add_(o)  # round before the shift, as ONNX
            t = t.sub_(o)
            ctx.bounds = (-0.5, qmax + 0.5)
        ctx.save_for_backward(t, v, scale, o)
        ctx.factor = factor
        return v * scale

    @staticmethod
    def backward(ctx, grad):
        t, v, scale, o = ctx.saved_tensors
        gx = torch.ops.aten.hardtanh_backward(grad, t, *ctx.bounds)  # grad * m in one pass
        gs = go = None
        learn_offset = ctx.needs_input_grad[2] and o is not None  # learned (asymmetric) offsets only
        sum_gx = _channel_sum(gx, scale) if o is not None and (ctx.needs_input_grad[1] or learn_offset) else None
        if ctx.needs_input_grad[1]:
            # ds = f * (<g, v> - <gx, t>) (- f * o * sum(gx) when t was shifted by o)
            gs = _channel_dot_diff(grad, v, gx, t, scale)
            if o is not None:
                gs = gs - o * sum_gx
            gs = gs * ctx.factor
        if learn_offset:
            go = (_channel_sum(grad, scale) - sum_gx) * scale * ctx.factor
        return gx, gs, go, None, None, None


def _per_tensor(scale: torch.Tensor) -> bool:
    return scale.dim() == 0 or scale.numel() == 1


def _channel_view(a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``a`` as ``(C, N)`` with ``C`` the channels of a broadcast ``scale`` (``C = 1`` per-tensor)."""
    if _per_tensor(scale):
        return a.reshape(1, -1)
    axis = next(d for d in range(scale.dim()) if scale.shape[d] != 1)
    return a.movedim(axis, 0).reshape(scale.shape[axis], -1)


def _channel_dot_diff(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """``<a, b> - <c, d>`` per channel of ``scale``: two fused dot products per tensor, else
    one product buffer and one multiply-add before the channel sums."""
    if _per_tensor(scale):
        return (torch.dot(a.reshape(-1), b.reshape(-1)) - torch.dot(c.reshape(-1), d.reshape(-1))).reshape(scale.shape)
    return _channel_sum((a * b).addcmul_(c, d, value=-1), scale)


def _channel_sum(a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _channel_view(a, scale).sum(1).reshape(scale.shape)


def _grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """``t`` in the forward pass; its gradient multiplied by ``g`` in the backward pass."""
    return (t - t * g).detach() + t * g


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bitwidth: int,
                  grad_factor: float = 1.0) -> torch.Tensor:
    """Reference affine fake-quantization through autograd (the module's fast paths must match it).

    ``scale``/``offset`` are broadcastable to ``x``. With ``t = x / s - o``, a value is *inside*
    when ``-0.5 < t < 2**b - 1 + 0.5`` (it is rounded, not clipped). Gradients: ``x`` gets 1
    inside and 0 outside; ``scale`` gets LSQ's ``round(t) - t`` inside and the clipping level
    ``o + clamp(round(t))`` outside; ``offset`` gets 0 inside and ``scale`` outside (LSQ+). Range
    gradients are multiplied by ``grad_factor``.
    """
    if grad_factor != 1.0 and (scale.requires_grad or offset.requires_grad):
        scale, offset = _grad_scale(scale, grad_factor), _grad_scale(offset, grad_factor)
    qmax = num_steps(bitwidth)
    offset = _RoundSTE.apply(offset)
    quotient = x / scale
    t = quotient - offset
    with torch.no_grad():
        inside = (t > -0.5) & (t < qmax + 0.5)
        clipped = torch.clamp(torch.round(quotient) - offset, 0, qmax)  # round, then shift: as ONNX
    rounded = _RoundSTE.apply(quotient) * scale
    saturated = (clipped + offset) * scale
    return torch.where(inside, rounded, saturated)


class QuantizeDequantize(nn.Module):
    """Simulates one tensor's rounding on the integer target.

    Args:
        shape: shape of scale/offset: ``()`` per-tensor, ``(C,)`` per-channel.
        bitwidth: 2 to 16.
        symmetric: symmetric signed grid (offset fixed at ``-2**(b-1)``) or asymmetric.
        axis: channel axis for per-channel quantization (``None`` per-tensor).
        learnable: whether scale (and offset, if asymmetric) get gradients, LSQ-style: scaled by
            ``1 / sqrt(N * (2**b - 1))`` with ``N`` the values per scale (Esser et al., 2020).
        per_sample: count ``N`` per sample (dimension 0 is the batch), as LSQ does for
            activations: the range gradient then does not depend on the batch size, so a DDP run
            equals one process on the concatenated batch. The simulation sets it for every
            activation quantizer; weights have no batch dimension.

    The math runs in float32 with autocast disabled whatever the input dtype. The output
    takes the input's dtype, except that a 16-bit float input to a grid wider than 8 bits
    stays float32 (fp16/bf16 cannot hold a 16-bit integer grid).
    """

    def __init__(self, shape: Sequence[int] = (), bitwidth: int = 8, symmetric: bool = False,
                 axis: Optional[int] = None, learnable: bool = False, name: str = "", *, per_sample: bool = False):
        super().__init__()
        if not isinstance(bitwidth, int) or not 2 <= bitwidth <= 16:
            raise ValueError(f"bitwidth must be an int in [2, 16], got {bitwidth!r}")
        if (axis is None) != (len(tuple(shape)) == 0):
            raise ValueError("per-channel quantizers need both a non-scalar shape and an axis")
        self.bitwidth = bitwidth
        self.symmetric = symmetric
        self.axis = axis
        self.name = name
        self.per_sample = per_sample
        self.enabled = True
        self.scale = nn.Parameter(torch.ones(tuple(shape)), requires_grad=learnable)
        self.offset = nn.Parameter(torch.zeros(tuple(shape)), requires_grad=learnable and not symmetric)
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False  # python mirror of the buffer: no device sync in forward
        self._observer = None
        self._monitor = None  # observes while the quantizer keeps quantizing (encoding annealing)
        self._offset_value: Optional[float] = None
        self._sync_offset_value()

    # ---- state ---------------------------------------------------------------------------
    def is_initialized(self) -> bool:
        return self._initialized

    @property
    def learnable(self) -> bool:
        return self.scale.requires_grad

    def freeze(self) -> None:
        """Stop learning scale/offset (the encoding stays as it is: the fixed-grid path takes the
        learned ``|scale|`` and rounded offset, as :attr:`encoding` reports them)."""
        if self._initialized and self.learnable:
            with torch.no_grad():
                self.scale.copy_(self._positive_scale())
                self.offset.copy_(torch.round(self.offset))
        self.scale.requires_grad_(False)
        self.offset.requires_grad_(False)
        self._sync_offset_value()

    def unfreeze(self) -> None:
        self.scale.requires_grad_(True)
        self.offset.requires_grad_(not self.symmetric)

    def _positive_scale(self) -> torch.Tensor:
        """Learned scales can be pushed through zero by an optimizer; the grid uses ``|scale|``."""
        return self.scale.abs().clamp_min(_MIN_SCALE) if self.learnable else self.scale

    @property
    def encoding(self) -> Optional[Encoding]:
        if not self._initialized:
            return None
        return Encoding(self._positive_scale().detach().double().clone(), torch.round(self.offset.detach().double()),
                        self.bitwidth, self.symmetric, self.axis)

    def set_encoding(self, enc: Encoding) -> None:
        if enc.bitwidth != self.bitwidth or enc.symmetric != self.symmetric or enc.axis != self.axis:
            raise ValueError(
                f"{self.name or 'quantizer'}: encoding ({enc.bitwidth}-bit, symmetric={enc.symmetric}, "
                f"axis={enc.axis}) does not match the quantizer ({self.bitwidth}-bit, "
                f"symmetric={self.symmetric}, axis={self.axis})")
        if enc.scale.shape != self.scale.shape:
            raise ValueError(f"{self.name}: encoding shape {tuple(enc.scale.shape)} != {tuple(self.scale.shape)}")
        with torch.no_grad():
            self.scale.copy_(enc.scale.to(self.scale))
            self.offset.copy_(enc.offset.to(self.offset))
            self.initialized.fill_(True)
        self._initialized = True
        self._sync_offset_value()

    def _sync_offset_value(self) -> None:
        """Python copy of a single offset, so the fixed-grid path never reads the device."""
        if self.symmetric:
            self._offset_value = float(-(2 ** (self.bitwidth - 1)))
        elif self.offset.numel() == 1:
            self._offset_value = float(torch.round(self.offset.detach()))
        else:
            self._offset_value = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)
        self._sync_offset_value()

    # ---- calibration ---------------------------------------------------------------------
    def start_calibration(self, observer) -> None:
        """Route inputs to ``observer`` (inputs pass through unchanged) until stop_calibration."""
        self._observer = observer

    def stop_calibration(self):
        observer, self._observer = self._observer, None
        return observer

    def start_monitoring(self, observer) -> None:
        """Show inputs to ``observer`` while quantizing as usual (used by encoding annealing)."""
        self._monitor = observer

    def stop_monitoring(self):
        observer, self._monitor = self._monitor, None
        return observer

    @contextlib.contextmanager
    def compute_encodings(self, scheme: str = "tf", **kwargs):
        """Observe what passes through, then set the encoding from it (``tf``, ``tf_enhanced``, ``percentile``)."""
        from .calibration import encoding_from_observer, make_observer

        self.start_calibration(make_observer(scheme, axis=self.axis, name=self.name))
        try:
            yield self
        finally:
            observer = self.stop_calibration()
        self.set_encoding(encoding_from_observer(observer, scheme, self.bitwidth, self.symmetric, self.axis, **kwargs))

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self._observer is not None:
            self._observer.observe(x.detach())
            return x
        if self._monitor is not None:
            self._monitor.observe(x.detach())
        if not self._initialized:
            raise NotCalibratedError(
                f"quantizer '{self.name or type(self).__name__}' has no encoding: call "
                "sim.compute_encodings(forward_pass_callback) before running the simulation")
        with torch.autocast(device_type=x.device.type, enabled=False):
            scale, offset = self._positive_scale(), self.offset
            if self.axis is not None:
                shape = [1] * x.dim()
                shape[self.axis] = -1
                scale, offset = scale.reshape(shape), offset.reshape(shape)
            if self.learnable:
                # LSQ's gradient scale: 1 / sqrt(values per scale * levels), per sample for activations
                values = x.numel() / max(1, self.scale.numel())
                if self.per_sample and x.dim() > 0 and x.shape[0] > 0:
                    values /= x.shape[0]
                g = (values * num_steps(self.bitwidth)) ** -0.5
                fixed = self._offset_value if not self.offset.requires_grad else None
                out = _LearnedFakeQuantize.apply(x.float(), scale.float(), offset.float(), self.bitwidth, g, fixed)
            else:
                fixed = self._offset_value if self._offset_value is not None else offset.detach().float()
                out = _FixedFakeQuantize.apply(x.float(), scale.detach().float(), fixed, self.bitwidth)
        if x.dtype in (torch.float16, torch.bfloat16) and self.bitwidth > 8:
            return out
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        sym = "symmetric" if self.symmetric else "asymmetric"
        flags = "" if self.enabled else ", disabled"
        return f"bitwidth={self.bitwidth}, {sym}, {kind}, learnable={self.learnable}{flags}"
