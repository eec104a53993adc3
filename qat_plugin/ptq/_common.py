"""Pieces shared by the post-training tools: calibration data, running the model, and the
simulation switched to float (every quantizer bypassed) for reference outputs."""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from ..errors import NotCalibratedError, QuantConfigError
from ..modules import QUANTIZED


def take_batches(data: Iterable[Any], num_batches: Optional[int], tool: str) -> list:
    """The first ``num_batches`` items of ``data`` (all when ``None``) as a list; an empty result
    is a :class:`ValueError` raised before anything changes."""
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise QuantConfigError(f"{tool}: num_batches must be a positive int or None, got {num_batches!r}")
    if isinstance(data, torch.Tensor):
        raise TypeError(f"{tool}: data is an iterable of model inputs (e.g. a list of batches or a "
                        "DataLoader of tensors), not one tensor; wrap it: [x]")
    batches = []
    for item in data:
        if num_batches is not None and len(batches) >= num_batches:
            break
        batches.append(item)
    if not batches:
        raise ValueError(f"{tool}: data is empty; pass an iterable of model inputs (tensors or tuples "
                         "of tensors), e.g. [x for x, _ in loader]. Nothing was changed.")
    return batches


def run(model: nn.Module, batch: Any, device: torch.device) -> Any:
    """``model(batch)``, or ``model(*batch)`` for a tuple/list, with the inputs on ``device``."""
    if isinstance(batch, (tuple, list)):
        return model(*(b.to(device) if isinstance(b, torch.Tensor) else b for b in batch))
    return model(batch.to(device))


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_calibrated(sim, tool: str) -> None:
    missing = [k for k, q in sim.quantizers().items() if q.enabled and not q.is_initialized()]
    if missing:
        raise NotCalibratedError(f"{tool} needs a calibrated simulation: {len(missing)} quantizer(s) have no "
                                 f"encoding (e.g. '{missing[0]}'); call sim.compute_encodings(...) first")


def weighted_layers(sim) -> list[tuple[str, str, nn.Module]]:
    """``(site key, module name, quantized layer)`` of every enabled weight quantizer, in graph order.

    Embedding tables are left out: a lookup returns table rows, which nearest rounding already
    reproduces best, and it has no bias to correct.

    Layers that absorbed a BatchNorm (``bn_folding="simulated"``) are refused: their weight is
    re-folded on every forward, so rounded weights or corrected biases would not stay exact.
    """
    out = []
    for site in sim.quantizer_sites():
        if site.kind != "param" or site.module is None:
            continue
        layer = sim.model.get_submodule(site.module)
        if not layer.param_quantizers["weight"].enabled or isinstance(layer, nn.Embedding):
            continue
        if getattr(layer, "bn", None) is not None:
            raise QuantConfigError(f"post-training tools need BatchNorm folded into the weights; layer "
                                   f"'{site.module}' keeps one (bn_folding='simulated'): build the sim with "
                                   "bn_folding='static' for PTQ, or call sim.freeze_batch_norm() and fold first")
        out.append((site.key, site.module, layer))
    return out


def is_supported_layer(layer: nn.Module) -> bool:
    return type(layer) in set(QUANTIZED.values())


@contextlib.contextmanager
def float_mode(sim, weights: Optional[dict[str, torch.Tensor]] = None) -> Iterator[None]:
    """Run ``sim.model`` as the FP32 model: every quantizer bypassed and, for the layers in
    ``weights`` (module name -> float weight), the original float weights swapped back in."""
    quantizers = [q for q in sim.quantizers().values() if q.enabled]
    swapped = {}
    try:
        for q in quantizers:
            q.enabled = False
        for name, w in (weights or {}).items():
            layer = sim.model.get_submodule(name)
            swapped[name] = layer.weight.detach().clone()
            with torch.no_grad():
                layer.weight.copy_(w)
        yield
    finally:
        for q in quantizers:
            q.enabled = True
        for name, w in swapped.items():
            with torch.no_grad():
                sim.model.get_submodule(name).weight.copy_(w)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def recompute_activation_encodings(sim, batches: list, keep: Iterable[str]) -> None:
    """``sim.compute_encodings`` on ``batches``, then the weight encodings of ``keep`` (site keys)
    put back as they were, so that learned integers stay on their grids."""
    saved = {k: sim.quantizers()[k].encoding for k in keep}
    device = device_of(sim.model)
    with eval_mode(sim.model):
        sim.compute_encodings(lambda m, _: [run(m, b, device) for b in batches])
    for key, enc in saved.items():
        if enc is not None:
            sim.quantizers()[key].set_encoding(enc)
