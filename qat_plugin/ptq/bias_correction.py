"""Empirical bias correction (Nagel et al., 2019): quantizing a layer's weights shifts the mean
of its output by ``E[(W - W_q) x]``; that shift, measured per output channel on the layer's own
(quantized) inputs in the simulation, is added to the layer's bias.

Each layer corrects only its own weights' error, so all layers are measured in one pass.
(Matching the FP32 network's layer means instead, for all layers at once, corrects the same
upstream error in every layer below it: on digits mobilenet_v2 per-tensor W8A8 that dropped
accuracy from 95.5% to 36%.)
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..modules import QuantizedLinear
from ..dist import world
from ._common import check_calibrated, device_of, eval_mode, run, take_batches, weighted_layers


def _channel_sum(layer: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    axis = y.dim() - 1 if isinstance(layer, QuantizedLinear) else 1
    flat = y.detach().movedim(axis, 0).reshape(y.shape[axis], -1).double()
    return flat.sum(1), flat.shape[1]


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, QuantizedLinear) else layer.out_channels


def correct_bias(sim, data: Iterable[Any], num_batches: Optional[int] = None, *,
                 progress: bool = True) -> dict[str, float]:
    """Move the expected output shift that weight quantization causes in each quantized
    Conv/Linear layer into its bias (one pass over ``data``).

    Args:
        sim: a calibrated :class:`~qat_plugin.QuantSimModel` (``bn_folding="static"``).
        data: an iterable of model inputs (tensors or tuples of tensors).
        num_batches: use the first ``num_batches`` items of ``data`` (default: all).
        progress: show a tqdm bar.

    Under DDP every rank passes its own data; the shifts are averaged over all ranks' data
    (all-reduced), so every rank adds the same correction.

    Returns:
        module name -> the largest ``|E[y_float_weights - y_quantized_weights]|`` over channels.
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
    from tqdm.auto import tqdm

    check_calibrated(sim, "correct_bias")
    batches = take_batches(data, num_batches, "correct_bias")
    layers = weighted_layers(sim)
    device = device_of(sim.model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    names = {id(layer): name for _, name, layer in layers}
    inner = {"active": False}

    def hook(module, args, y_q):
        if inner["active"]:
            return
        q = module.param_quantizers["weight"]
        inner["active"], q.enabled = True, False
        try:
            y_f = module(*args)  # the same input with float weights
        finally:
            inner["active"], q.enabled = False, True
        total, n = _channel_sum(module, y_f - y_q)
        name = names[id(module)]
        sums[name] = sums.get(name, 0) + total
        counts[name] = counts.get(name, 0) + n

    handles = [layer.register_forward_hook(hook) for _, _, layer in layers]
    try:
        with eval_mode(sim.model), torch.no_grad():
            for batch in tqdm(batches, desc="bias correction", leave=False, disable=not progress):
                run(sim.model, batch, device)
    finally:
        for h in handles:
            h.remove()
    dist = world()
    if dist is not None:  # the mean over every rank's data, the same shift on every rank
        for _, name, layer in layers:
            total = sums.get(name)
            if total is None:
                total = torch.zeros(_out_channels(layer), dtype=torch.float64, device=device)
            total = total.to(torch.float64).clone()
            n = torch.tensor([float(counts.get(name, 0))], dtype=torch.float64, device=total.device)
            dist.all_reduce(total)
            dist.all_reduce(n)
            if float(n) > 0:
                sums[name], counts[name] = total, float(n)
    out: dict[str, float] = {}
    for _, name, layer in layers:
        if name not in sums:
            continue
        shift = sums[name] / counts[name]
        out[name] = float(shift.abs().max())
        with torch.no_grad():
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(shift, dtype=layer.weight.dtype),
                                          requires_grad=layer.weight.requires_grad)
            layer.bias.add_(shift.to(layer.bias))
    return out
