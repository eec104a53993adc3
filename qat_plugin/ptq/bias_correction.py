"""Empirical bias correction (Nagel et al., 2019; AIMET's empirical mode): weight (and upstream
activation) quantization shifts the mean of each layer's output; the shift, measured on data
as ``E[y_fp32] - E[y_sim]`` per output channel, is added to the layer's bias.

Corrections upstream change the shifts downstream, so the measurement is repeated ``passes``
times (each pass corrects what the previous one left). The FP32 reference is ``sim.model`` with
every quantizer bypassed, measured once.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..errors import QuantConfigError
from ..modules import QuantizedLinear
from ._common import check_calibrated, device_of, eval_mode, float_mode, run, take_batches, weighted_layers


def _channel_axis(layer: nn.Module, y: torch.Tensor) -> int:
    return y.dim() - 1 if isinstance(layer, QuantizedLinear) else 1


def _channel_means(sim, layers: list, batches: list, device, fp32: bool, desc: str, progress: bool) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    names = {id(layer): name for _, name, layer in layers}

    def hook(module, args, y):
        name = names[id(module)]
        axis = _channel_axis(module, y)
        flat = y.detach().movedim(axis, 0).reshape(y.shape[axis], -1).double()
        sums[name] = sums.get(name, 0) + flat.sum(1)
        counts[name] = counts.get(name, 0) + flat.shape[1]

    handles = [layer.register_forward_hook(hook) for _, _, layer in layers]
    try:
        with (float_mode(sim) if fp32 else _null()), eval_mode(sim.model), torch.no_grad():
            for batch in tqdm(batches, desc=desc, leave=False, disable=not progress):
                run(sim.model, batch, device)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def correct_bias(sim, data: Iterable[Any], num_batches: Optional[int] = None, *, passes: int = 2,
                 progress: bool = True) -> dict[str, float]:
    """Move the expected output shift of each quantized Conv/Linear layer into its bias.

    Args:
        sim: a calibrated :class:`~qat_plugin.QuantSimModel` (``bn_folding="static"``).
        data: an iterable of model inputs (tensors or tuples of tensors).
        num_batches: use the first ``num_batches`` items of ``data`` (default: all).
        passes: measure-and-correct rounds (1 + ``passes`` passes over the data in all).
        progress: show tqdm bars.

    Returns:
        module name -> the largest ``|E[y_fp32] - E[y_sim]|`` over channels before correction.
        A layer without a bias gets one (zeros plus the correction); an optimizer built before
        this call does not hold it.

    >>> import torch
    >>> from torch import nn
    >>> from qat_plugin import QuantSimModel
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> data = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    >>> sim = QuantSimModel(net, data[0], default_param_bw=4)
    >>> sim.compute_encodings(lambda m, _: [m(x) for x in data])
    >>> shifts = correct_bias(sim, data, progress=False)
    >>> sorted(shifts)
    ['0', '2']
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise QuantConfigError(f"correct_bias: passes must be a positive int, got {passes!r}")
    check_calibrated(sim, "correct_bias")
    batches = take_batches(data, num_batches, "correct_bias")
    layers = weighted_layers(sim)
    device = device_of(sim.model)
    target = _channel_means(sim, layers, batches, device, True, "bias correction: FP32 means", progress)
    first: dict[str, float] = {}
    for p in range(passes):
        means = _channel_means(sim, layers, batches, device, False, f"bias correction: pass {p + 1}/{passes}", progress)
        for _, name, layer in layers:
            if name not in means:
                continue
            shift = target[name] - means[name]
            first.setdefault(name, float(shift.abs().max()))
            with torch.no_grad():
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros_like(shift, dtype=layer.weight.dtype),
                                              requires_grad=layer.weight.requires_grad)
                layer.bias.add_(shift.to(layer.bias))
    return first
