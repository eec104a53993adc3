"""AdaRound (Nagel et al., 2020): learn whether each weight rounds up or down, layer by layer,
so that the layer's output on real data stays close to the FP32 layer's output.

For a weight ``w`` on a grid of scale ``s`` (the sim's weight encoding, unchanged), the rounded
weight is ``s * clamp(floor(w / s) + h(V), qmin, qmax)`` with the rectified sigmoid
``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``, ``gamma = -0.1``.
``V`` starts where ``h(V)`` equals the fractional part of ``w / s`` and is trained with Adam on

    || X_q W_soft^T - Y ||^2  (sum over channels, mean over rows)
    + reg_param * sum(1 - |2 h(V) - 1| ** beta)        (after the first warm_start of iterations)

where ``X_q`` are the layer's inputs in the simulation (activations quantized, every earlier
layer already rounded) and ``Y`` the target. Default ``target="fp32_outputs"``: ``Y`` is the
FP32 network's output of this layer (AdaRound's asymmetric reconstruction: it also makes up for
error from upstream). ``target="float_weights"``: ``Y = X_q W^T``, this layer's rounding error
only. ``beta`` falls linearly from ``beta_range[0]`` to ``beta_range[1]``, pushing ``h`` to 0
or 1; at the end ``h >= 0.5`` rounds up.

Cost. ``fp32_outputs`` needs each layer's inputs after the layers before it are rounded. Instead
of one pass over the data per layer, the data runs once as one batch, and a forward hook on
each layer learns its rounding right there (its inputs are the simulation's, with every earlier
layer rounded) and hands the rounded layer's output on: one FP32 pass (targets), one such pass,
and the activation re-calibration. (Batches that do not concatenate fall back to one pass per
layer.) ``float_weights`` caches every layer's inputs in one pass (in groups of ``memory_mb``).
(Fitting the FP32 layer outputs with every layer's inputs cached at once, i.e. before the earlier
layers are rounded, compensates the same upstream error in many layers at the same time: on
digits mobilenet_v2 at W4A8 that dropped accuracy from 75% to 9%.)

Each layer caches ``rows`` randomly chosen output positions (their input patches) instead of
every pixel, and each iteration uses ``batch_rows`` of them. With the defaults
(``num_iterations=200``, 2048 rows, 256 per iteration), CLE + AdaRound + bias correction on
torchvision resnet50 with 128 images at 224x224 take 6.7 min of one CPU thread, learning about
two thirds of AdaRound's time (``benchmarks/ptq_toolbox.py --parts timing``; README).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..encoding import num_steps
from ..errors import QuantConfigError, did_you_mean
from ..modules import QuantizedConv2d, QuantizedLinear
from ..dist import world
from ._common import (check_calibrated, device_of, eval_mode, float_mode, recompute_activation_encodings,
                      run, take_batches, weighted_layers)

ZETA, GAMMA = 1.1, -0.1
DEFAULT_ITERATIONS = 200
TARGETS = ("float_weights", "fp32_outputs")


@dataclass(frozen=True)
class AdaroundLayer:
    """One layer's result. MSEs are of the layer output against its output with float weights
    on the cached rows (sum over channels, mean over rows); ``changed`` is the share of weights rounded
    differently from nearest."""

    name: str
    rows: int
    iterations: int
    mse_nearest: float
    mse_adaround: float
    changed: float
    skipped: str = ""
    seconds: float = 0.0


@dataclass
class AdaroundReport:
    """What :func:`apply_adaround` did, per layer; ``print(report)`` shows a table."""

    layers: list[AdaroundLayer] = field(default_factory=list)
    seconds: float = 0.0
    target: str = ""

    @property
    def optimize_seconds(self) -> float:
        """Time spent learning roundings (the rest of ``seconds`` is passes over the data)."""
        return sum(l.seconds for l in self.layers)

    def __str__(self) -> str:
        lines = [f"AdaRound: {sum(not l.skipped for l in self.layers)} layers in {self.seconds:.1f} s "
                 f"(target {self.target}; learning {self.optimize_seconds:.1f} s, passes over the data "
                 f"{self.seconds - self.optimize_seconds:.1f} s)",
                 f"{'layer':40s} {'rows':>6s} {'iters':>6s} {'MSE nearest':>12s} {'MSE adaround':>12s} {'ratio':>6s} "
                 f"{'changed':>8s} {'s':>6s}"]
        for l in self.layers:
            if l.skipped:
                lines.append(f"{l.name:40s} skipped: {l.skipped}")
                continue
            ratio = l.mse_adaround / l.mse_nearest if l.mse_nearest > 0 else float("nan")
            lines.append(f"{l.name:40s} {l.rows:6d} {l.iterations:6d} {l.mse_nearest:12.4g} {l.mse_adaround:12.4g} "
                         f"{ratio:6.3f} {100 * l.changed:7.2f}% {l.seconds:6.2f}")
        return "\n".join(lines)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def _unsupported(layer: nn.Module) -> str:
    if isinstance(layer, QuantizedLinear):
        return ""
    if not isinstance(layer, QuantizedConv2d):
        return f"{type(layer).__name__} (AdaRound covers Conv2d and Linear)"
    if isinstance(layer.padding, str) and layer.padding != "valid":
        return f"padding='{layer.padding}'"
    if layer.padding_mode != "zeros":
        return f"padding_mode='{layer.padding_mode}'"
    return ""


def _patch_dim(layer: nn.Module) -> int:
    if isinstance(layer, QuantizedLinear):
        return layer.in_features
    return layer.weight[0].numel() * layer.groups


class _Cache:
    """Rows of one layer: input patches ``x`` (rows, in * kh * kw) at sampled output positions."""

    def __init__(self, layer: nn.Module, index: int, rows_per_batch: int):
        self.layer, self.index, self.rows_per_batch = layer, index, rows_per_batch
        self.x: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []

    def _positions(self, batch_index: int, total: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1_000_003 * (self.index + 1) + batch_index)
        return torch.randperm(total, generator=g)[: self.rows_per_batch]

    def take_input(self, batch_index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        layer = self.layer
        if isinstance(layer, QuantizedLinear):
            flat = x.reshape(-1, x.shape[-1])
            self.x.append(flat[self._positions(batch_index, flat.shape[0]).to(x.device)].float().cpu())
            return
        n, _, ho, wo = y.shape
        idx = self._positions(batch_index, n * ho * wo).to(x.device)
        b, rest = idx // (ho * wo), idx % (ho * wo)
        oh, ow = rest // wo, rest % wo
        ph, pw = (0, 0) if isinstance(layer.padding, str) else layer.padding
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        (sh, sw), (dh, dw), (kh, kw) = layer.stride, layer.dilation, layer.kernel_size
        cols = [xp[b, :, oh * sh + i * dh, ow * sw + j * dw] for i in range(kh) for j in range(kw)]
        self.x.append(torch.stack(cols, dim=2).reshape(len(idx), -1).float().cpu())  # (rows, in * kh * kw)


    def take_output(self, batch_index: int, y: torch.Tensor) -> None:
        """The layer's output at the same sampled rows (same seed, same output shape)."""
        if isinstance(self.layer, QuantizedLinear):
            flat = y.reshape(-1, y.shape[-1])
            self.y.append(flat[self._positions(batch_index, flat.shape[0]).to(y.device)].float().cpu())
            return
        n, _, ho, wo = y.shape
        idx = self._positions(batch_index, n * ho * wo).to(y.device)
        rest = idx % (ho * wo)
        self.y.append(y[idx // (ho * wo), :, rest // wo, rest % wo].float().cpu())


class _StopForward(Exception):
    pass


def _fill(sim, caches: list[_Cache], batches: list, device, desc: str, progress: bool, fp32: bool = False) -> None:
    """One pass of the simulation over the data, caching each layer's input patches at its
    sampled rows (``fp32``: the FP32 model's layer outputs); the forward stops after the last
    layer of the group."""
    from tqdm.auto import tqdm

    last = caches[-1].layer
    state = {"batch": 0}

    def hook(module, args, output):
        if fp32:
            by_layer[id(module)].take_output(state["batch"], output.detach())
        else:
            by_layer[id(module)].take_input(state["batch"], args[0].detach(), output.detach())
        if module is last:
            raise _StopForward

    by_layer = {id(c.layer): c for c in caches}
    handles = [c.layer.register_forward_hook(hook) for c in caches]
    try:
        with (float_mode(sim) if fp32 else contextlib.nullcontext()), eval_mode(sim.model), torch.no_grad():
            for i, batch in enumerate(tqdm(batches, desc=desc, leave=False, disable=not progress)):
                state["batch"] = i
                try:
                    run(sim.model, batch, device)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()


def _join(batches: list) -> Optional[list]:
    """All batches as one batch (tensors, or tuples of tensors, concatenated on dim 0), or ``None``
    when they do not concatenate."""
    try:
        if all(isinstance(b, torch.Tensor) for b in batches):
            return [torch.cat(batches)]
        if all(isinstance(b, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in b) for b in batches):
            return [tuple(torch.cat(parts) for parts in zip(*batches))]
    except RuntimeError:
        pass
    return None


def _one_pass(sim, todo: list, batch, device, rows: int, optimize, progress: bool) -> None:
    """AdaRound in layer order inside one forward pass over all the data as one batch: a forward
    hook on each layer takes its quantized input (every earlier layer already rounded), calls
    ``optimize(name, layer, cache)`` (which writes the rounded weight), and gives the layer's
    output with the rounded weight to the layers after it. The same inputs as one (partial) pass
    per layer, at the cost of one pass."""
    from tqdm.auto import tqdm

    index = {id(layer): (i, name) for i, (_, name, layer) in enumerate(todo)}
    state = {"inner": False, "done": set()}

    def hook(module, args, kwargs, output):
        i, name = index[id(module)]
        if state["inner"] or name in state["done"]:
            return None
        cache = _Cache(module, i, rows)
        cache.take_input(0, args[0].detach(), output.detach())
        optimize(name, module, cache)
        state["done"].add(name)
        state["inner"] = True
        try:
            return module(*args, **kwargs)  # the rounded weight's output, for the layers after it
        finally:
            state["inner"] = False

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for _, _, layer in todo]
    try:
        with eval_mode(sim.model), torch.no_grad():
            for b in tqdm([batch], desc="AdaRound: one pass, layer by layer", leave=False, disable=not progress):
                run(sim.model, b, device)
    finally:
        for h in handles:
            h.remove()


def _grouped_matmul(x: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` (rows, groups * d) times ``w`` (out, d) grouped as a conv: (rows, out)."""
    if groups == 1:
        return x @ w.t()
    rows = x.shape[0]
    xg = x.reshape(rows, groups, -1).transpose(0, 1)  # (g, rows, d)
    wg = w.reshape(groups, w.shape[0] // groups, -1)  # (g, out/g, d)
    return torch.bmm(xg, wg.transpose(1, 2)).transpose(0, 1).reshape(rows, -1)


def _mse(x, w, b, y, groups, chunk=4096) -> float:
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        out = _grouped_matmul(x[i:i + chunk], w, groups)
        if b is not None:
            out = out + b
        total += float(((out - y[i:i + chunk]) ** 2).sum())
    return total / x.shape[0]


def _optimize_layer(layer, x, y, num_iterations, reg_param, beta_range, warm_start, batch_rows, lr, generator):
    q = layer.param_quantizers["weight"]
    enc = q.encoding
    w = layer.weight.detach().float()
    shape = [-1] + [1] * (w.dim() - 1)
    scale = q.scale.detach().float().abs().reshape(shape) if enc.axis is not None else q.scale.detach().float().abs()
    offset = enc.offset.float().reshape(shape) if enc.axis is not None else enc.offset.float()
    qmin, qmax = offset, offset + num_steps(enc.bitwidth)
    w_floor = torch.floor(w / scale)
    v = _inverse_rectified_sigmoid(w / scale - w_floor).requires_grad_(True)
    groups = getattr(layer, "groups", 1)
    bias = layer.bias.detach().float() if layer.bias is not None else None
    w2 = lambda t: t.reshape(t.shape[0], -1)
    opt = torch.optim.Adam([v], lr=lr)
    start_beta, end_beta = beta_range
    warm = int(warm_start * num_iterations)
    rows = x.shape[0]
    for it in range(num_iterations):
        idx = torch.randint(rows, (min(batch_rows, rows),), generator=generator)
        h = rectified_sigmoid(v)
        w_soft = torch.clamp(w_floor + h, qmin, qmax) * scale
        out = _grouped_matmul(x[idx], w2(w_soft), groups)
        if bias is not None:
            out = out + bias
        loss = ((out - y[idx]) ** 2).sum(1).mean()
        if it >= warm and reg_param > 0:
            rel = (it - warm) / max(1, num_iterations - warm)
            beta = end_beta + (start_beta - end_beta) * (1 - rel)
            loss = loss + reg_param * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        n = torch.clamp(w_floor + (v >= 0).float(), qmin, qmax)
        nearest = torch.clamp(torch.round(w / scale), qmin, qmax)
        w_new = n * scale
        changed = float((n != nearest).float().mean())
        mse_near = _mse(x, w2(layer.quantized_weight().detach().float()), bias, y, groups)
        mse_ada = _mse(x, w2(w_new), bias, y, groups)
    return w_new, mse_near, mse_ada, changed


def _check_args(num_iterations, reg_param, beta_range, warm_start) -> int:
    if num_iterations is None:
        num_iterations = DEFAULT_ITERATIONS
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 1:
        raise QuantConfigError(f"apply_adaround: num_iterations must be a positive int, got {num_iterations!r}")
    if not reg_param >= 0:
        raise QuantConfigError(f"apply_adaround: reg_param must be >= 0, got {reg_param!r}")
    if len(tuple(beta_range)) != 2 or not 0 < beta_range[1] <= beta_range[0]:
        raise QuantConfigError(f"apply_adaround: beta_range is (start, end) with start >= end > 0, got {beta_range!r}")
    if not 0 <= warm_start < 1:
        raise QuantConfigError(f"apply_adaround: warm_start is a fraction of the iterations in [0, 1), got {warm_start!r}")
    return num_iterations


def apply_adaround(sim, data: Iterable[Any], num_batches: Optional[int] = None, num_iterations: Optional[int] = None,
                   reg_param: float = 0.01, beta_range: tuple[float, float] = (20, 2), warm_start: float = 0.2, *,
                   rows: int = 2048, batch_rows: int = 256, lr: float = 1e-2, memory_mb: int = 1024,
                   target: str = "fp32_outputs", progress: bool = True, seed: int = 0) -> AdaroundReport:
    """Learn the rounding of every Conv2d / Linear weight of a calibrated ``sim``; write the
    rounded weights into ``sim.model``, freeze those weight encodings, and re-compute the
    activation encodings on the same data.

    After this, each weight of ``sim.model`` lies exactly on its grid, so the simulation, the
    exported INT8 initializers and the encodings file carry the learned integers. Weight
    encodings (scale, offset) do not change. Calling ``sim.compute_encodings`` again afterwards
    re-derives weight encodings from the rounded weights (the same grid for min-max, possibly
    another for ``tf_enhanced``): calibrate first, then round.

    Args:
        sim: a :class:`~qat_plugin.QuantSimModel` after ``compute_encodings``
            (``bn_folding="static"``).
        data: an iterable of model inputs (tensors or tuples of tensors), e.g. 128 images in
            batches.
        num_batches: use the first ``num_batches`` items of ``data`` (default: all).
        num_iterations: Adam steps per layer (default 200).
        reg_param: weight of the rounding regularizer.
        beta_range: ``(start, end)`` of the regularizer's annealed exponent.
        warm_start: share of the iterations without the regularizer.
        rows: output positions cached per layer (input patches + FP32 outputs).
        batch_rows: rows per iteration.
        lr: Adam learning rate for ``V``.
        memory_mb: cache budget; layers are cached in groups that fit, and each group's inputs
            come from the simulation with the earlier groups already rounded.
        target: what each layer reconstructs. ``"fp32_outputs"`` (default): the FP32
            network's output of that layer (AdaRound's asymmetric reconstruction), from its inputs
            in the simulation with every earlier layer already rounded; all of ``data`` runs as
            one batch (so pass about 128 images, or ``num_batches``), rounding layer by layer
            inside that forward pass. ``"float_weights"``: its own output with float weights on
            the same quantized inputs (one pass caching every layer's inputs, in groups that fit
            ``memory_mb``); it does not make up for upstream error and is weaker (digits mobilenet_v2
            W4A8: 90.8% vs 95.3%, FP32 95.3%).
        progress: show tqdm bars.

    Under DDP (``torch.distributed`` initialized, more than one rank) every rank calls this with
    its own data: rank 0 learns the roundings on its data while the others wait, the rounded
    weights and the report are broadcast, and all ranks then re-calibrate the activations
    together, so that every rank holds the same integers and encodings.

    Returns:
        :class:`AdaroundReport` with each layer's reconstruction MSE, nearest vs learned.

    Raises:
        NotCalibratedError: the sim has no encodings yet.
        ValueError: ``data`` is empty (nothing changes).

    >>> import torch
    >>> from torch import nn
    >>> from qat_plugin import QuantSimModel
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    >>> data = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    >>> sim = QuantSimModel(net, data[0], default_param_bw=4)
    >>> sim.compute_encodings(lambda m, _: [m(x) for x in data])
    >>> report = apply_adaround(sim, data, num_iterations=100, progress=False)
    >>> all(l.mse_adaround <= l.mse_nearest for l in report.layers)
    True
    """
    from tqdm.auto import tqdm

    num_iterations = _check_args(num_iterations, reg_param, beta_range, warm_start)
    if target not in TARGETS:
        raise QuantConfigError(f"apply_adaround: unknown target '{target}'." + did_you_mean(str(target), TARGETS))
    check_calibrated(sim, "apply_adaround")
    batches = take_batches(data, num_batches, "apply_adaround")
    layers = weighted_layers(sim)
    t0 = time.perf_counter()
    device = device_of(sim.model)
    report = AdaroundReport(target=target)
    todo, skipped = [], {}
    for key, name, layer in layers:
        why = _unsupported(layer)
        if why:
            skipped[name] = why
        else:
            todo.append((key, name, layer))
    per_batch = max(1, math.ceil(rows / len(batches)))
    groups, current, used = [], [], 0.0
    for item in todo:
        need = per_batch * len(batches) * _patch_dim(item[2]) * 4 / 2**20
        if current and used + need > memory_mb:
            groups.append(current)
            current, used = [], 0.0
        current.append(item)
        used += need
    if current:
        groups.append(current)
    dist = world()
    lead = dist is None or dist.get_rank() == 0
    learn = todo if lead else []  # under DDP rank 0 learns and broadcasts (the other ranks wait)
    if not lead:
        groups = []
    originals: dict[str, torch.Tensor] = {}  # for undoing on an error
    done: list[str] = []
    results: dict[str, AdaroundLayer] = {}
    generator = torch.Generator().manual_seed(seed)
    keys = {name: key for key, name, _ in todo}
    fp32_caches: dict[str, _Cache] = {}
    bar = tqdm(total=len(todo), desc="AdaRound", disable=not progress)

    def optimize(name: str, layer: nn.Module, cache: _Cache) -> None:
        bar.set_postfix_str(name)
        x = torch.cat(cache.x).to(device)
        cache.x = []
        with torch.no_grad():
            if name in fp32_caches:
                y = torch.cat(fp32_caches.pop(name).y).to(device)
            else:
                y = _grouped_matmul(x, layer.weight.detach().float().reshape(layer.weight.shape[0], -1),
                                    getattr(layer, "groups", 1))
                if layer.bias is not None:
                    y = y + layer.bias.detach().float()
        t = time.perf_counter()
        with torch.enable_grad():
            w_new, near, ada, changed = _optimize_layer(layer, x, y, num_iterations, reg_param, tuple(beta_range),
                                                        warm_start, batch_rows, lr, generator)
        originals[name] = layer.weight.detach().clone()
        with torch.no_grad():
            layer.weight.copy_(w_new.to(layer.weight.dtype))
        done.append(keys[name])
        results[name] = AdaroundLayer(name, x.shape[0], num_iterations, near, ada, changed,
                                      seconds=time.perf_counter() - t)
        bar.update(1)

    try:
        joined = _join(batches) if target == "fp32_outputs" and learn else None
        if joined is not None:  # one FP32 pass, then one simulation pass with every layer rounded in order
            index = {item[1]: i for i, item in enumerate(todo)}
            fp32_caches.update({name: _Cache(layer, index[name], rows) for _, name, layer in learn})
            _fill(sim, list(fp32_caches.values()), joined, device, "AdaRound: FP32 layer outputs", progress, fp32=True)
            _one_pass(sim, learn, joined[0], device, rows, optimize, progress)
        else:
            if target == "fp32_outputs":  # batches of different shapes: one (partial) pass per layer
                groups = [[item] for item in todo]
                index = {item[1]: i for i, item in enumerate(todo)}
                fp32_caches.update({name: _Cache(layer, index[name], per_batch) for _, name, layer in learn})
                if learn:
                    _fill(sim, list(fp32_caches.values()), batches, device, "AdaRound: FP32 layer outputs", progress,
                          fp32=True)
            for gi, group in enumerate(groups):
                start = sum(map(len, groups[:gi]))
                caches = [_Cache(layer, li, per_batch) for li, (_, _, layer) in enumerate(group, start=start)]
                _fill(sim, caches, batches, device, f"AdaRound: layer inputs {gi + 1}/{len(groups)}", progress)
                for (key, name, layer), cache in zip(group, caches):
                    optimize(name, layer, cache)
    except BaseException:
        with torch.no_grad():  # leave the sim as it was
            for name, w in originals.items():
                sim.model.get_submodule(name).weight.copy_(w)
        raise
    finally:
        bar.close()
    if dist is not None:  # every rank ends with rank 0's integers (then calibrates with them)
        with torch.no_grad():
            for _, _, layer in todo:
                dist.broadcast(layer.weight.data, src=0)
        box = [results]
        dist.broadcast_object_list(box, src=0)
        results = box[0]
        done = [key for key, name, _ in todo if name in results]
    recompute_activation_encodings(sim, batches, keep=done)
    for _, name, _ in layers:
        report.layers.append(results.get(name) or AdaroundLayer(name, 0, 0, float("nan"), float("nan"), 0.0,
                                                                 skipped.get(name, "")))
    report.seconds = time.perf_counter() - t0
    return report


def _out(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, QuantizedLinear) else layer.out_channels
