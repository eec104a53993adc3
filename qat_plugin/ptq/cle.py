"""Cross-layer equalization and high-bias absorption (Nagel et al., 2019, "Data-Free
Quantization"), on the FP32 model, in place.

For two consecutive layers ``A -> act -> B`` where ``act`` is positively homogeneous
(``act(x / s) = act(x) / s`` for ``s > 0``: ReLU, LeakyReLU, or nothing), dividing A's output
channel ``i`` by ``s_i`` and multiplying B's input channel ``i`` by ``s_i`` leaves the network's
function unchanged. With ``r1_i`` the range of A's channel ``i`` and ``r2_i`` the range of B's
input channel ``i``, ``s_i = sqrt(r1_i / r2_i)`` makes both ranges ``sqrt(r1_i * r2_i)``: the
per-channel ranges of each weight tensor move toward each other, which is what a per-tensor
weight grid needs (depthwise convolutions above all).

ReLU6 is not homogeneous (``relu6(x / s) != relu6(x) / s`` once ``x > 6``), so pairs through
ReLU6 are skipped by default (``relu6="skip"``) and the FP32 function is unchanged to float
error. ``relu6="relu"`` replaces each ``nn.ReLU6`` between two equalizable layers by
``nn.ReLU`` first (as the DFQ paper did for MobileNetV2); that changes the FP32 function where
pre-activations exceed 6, so measure it (``benchmarks/ptq_toolbox.py`` prints the FP32 accuracy
after CLE).

High-bias absorption: after equalization, a channel whose BatchNorm said its pre-activation is
``N(beta_i, gamma_i^2)`` gets ``c_i = max(0, beta_i - 3 |gamma_i|)`` moved from A's bias into
B's bias (``relu(x) = relu(x - c) + c`` when ``x >= c``). It is applied only where B has no
padding (1x1 convolutions, Linear), where the move is exact for every input with ``x >= c``.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import torch
from torch import fx, nn

from ..errors import QuantConfigError, did_you_mean
from ..graph.apply import fold_batch_norm_
from ..graph.patterns import op_type_of
from ..graph.trace import capture

log = logging.getLogger("qat_plugin.ptq")

RELU6_POLICIES = ("skip", "relu")
_HOMOGENEOUS = ("Relu", "LeakyRelu")
_PASS = ("Identity", "Dropout")


def _kind(mod: nn.Module) -> Optional[str]:
    if type(mod) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return f"conv{mod.weight.dim()}"
    if type(mod) is nn.Linear:
        return "linear"
    return None


def _out_channels(mod: nn.Module) -> int:
    return mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels


def _in_channels(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels


def _depthwise(mod: nn.Module) -> bool:
    return not isinstance(mod, nn.Linear) and mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1


def _second_ok(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or mod.groups == 1 or _depthwise(mod)


def _set_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _fold_batch_norms(model: nn.Module, gm: fx.GraphModule) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fold every BatchNorm that directly follows a Conv/Linear (its only user) into it, replace
    the BN by ``nn.Identity`` in ``model``; return the BN's ``(beta, |gamma|)`` per layer name."""
    modules = dict(gm.named_modules())
    stats = {}
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    for n in gm.graph.nodes:
        if n.op != "call_module" or _kind(modules[n.target]) is None or len(n.users) != 1:
            continue
        (u,) = n.users
        if u.op != "call_module" or not isinstance(modules[u.target], nn.modules.batchnorm._BatchNorm):
            continue
        layer, bn = modules[n.target], modules[u.target]
        if calls[n.target] != 1 or calls[u.target] != 1 or bn.running_mean is None or bn.num_features != _out_channels(layer):
            continue
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(bn.running_mean, dtype=torch.float64)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(gamma)
        fold_batch_norm_(layer, bn)
        _set_submodule(model, u.target, nn.Identity())
        stats[n.target] = (beta, gamma.abs())
    return stats


def _find_pairs(gm: fx.GraphModule, relu6: str) -> list[tuple[str, str, str, list[str]]]:
    """``(first, second, activation op, ReLU6 modules to replace)`` for every equalizable pair."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or calls[n.target] != 1 or _kind(modules[n.target]) is None:
            continue
        first = modules[n.target]
        cur, act, relu6s, ok = n, "", [], True
        while ok and len(cur.users) == 1:
            (u,) = cur.users
            if u.args[:1] != (cur,):
                break
            t = op_type_of(u, modules)
            if u.op == "call_module" and _kind(modules[u.target]) is not None:
                second = modules[u.target]
                if (_kind(second) == _kind(first) and _in_channels(second) == _out_channels(first)
                        and _second_ok(second) and calls[u.target] == 1):
                    pairs.append((n.target, u.target, act, relu6s))
                break
            if t in _HOMOGENEOUS and not act:
                act = t
            elif t == "Clip" and u.op == "call_module" and type(modules[u.target]) is nn.ReLU6 and not act:
                if relu6 == "skip" or calls[u.target] != 1:
                    ok = False
                    break
                act, relu6s = "Relu6->Relu", [u.target]
            elif t in _PASS and u.op == "call_module":
                pass
            else:
                break
            cur = u
    return pairs


def _ranges_out(w: torch.Tensor) -> torch.Tensor:
    return w.abs().reshape(w.shape[0], -1).amax(1)


def _ranges_in(second: nn.Module, w: torch.Tensor) -> torch.Tensor:
    if _depthwise(second):
        return _ranges_out(w)
    return w.abs().transpose(0, 1).reshape(w.shape[1], -1).amax(1)


def _shape(w: torch.Tensor, dim: int) -> list[int]:
    shape = [1] * w.dim()
    shape[dim] = -1
    return shape


@torch.no_grad()
def _equalize_pair(first: nn.Module, second: nn.Module) -> torch.Tensor:
    """Scale one pair in float64; return the scales ``s`` (A's channel ``i`` divided by ``s_i``)."""
    w1, w2 = first.weight.detach().double(), second.weight.detach().double()
    r1, r2 = _ranges_out(w1), _ranges_in(second, w2)
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-300)), torch.ones_like(r1))
    first.weight.copy_((w1 / s.reshape(_shape(w1, 0))).to(first.weight.dtype))
    if first.bias is not None:
        first.bias.copy_((first.bias.double() / s).to(first.bias.dtype))
    in_dim = 0 if _depthwise(second) else 1
    second.weight.copy_((w2 * s.reshape(_shape(w2, in_dim))).to(second.weight.dtype))
    return s


@torch.no_grad()
def _absorb_high_bias(first: nn.Module, second: nn.Module, beta: torch.Tensor, gamma: torch.Tensor) -> float:
    """Move ``c = max(0, beta - 3 gamma)`` from ``first``'s bias into ``second``'s; return max(c)."""
    if first.bias is None:
        return 0.0
    c = torch.clamp(beta - 3 * gamma, min=0.0)
    if not bool((c > 0).any()):
        return 0.0
    w2 = second.weight.detach().double()
    if isinstance(second, nn.Linear):
        shift = w2 @ c
    elif _depthwise(second):
        shift = w2.reshape(w2.shape[0], -1).sum(1) * c
    else:
        shift = w2.reshape(w2.shape[0], w2.shape[1], -1).sum(2) @ c
    first.bias.copy_((first.bias.double() - c).to(first.bias.dtype))
    if second.bias is None:
        second.bias = nn.Parameter(torch.zeros(_out_channels(second), dtype=second.weight.dtype,
                                               device=second.weight.device), requires_grad=second.weight.requires_grad)
    second.bias.copy_((second.bias.double() + shift).to(second.bias.dtype))
    return float(c.max())


def _no_padding(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    if isinstance(mod.padding, str):
        return mod.padding == "valid"
    return all(p == 0 for p in mod.padding)


def _output(model: nn.Module, dummy_input: Any) -> Optional[torch.Tensor]:
    args = tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
    with torch.no_grad():
        out = model(*args)
    return out.detach().double() if isinstance(out, torch.Tensor) else None


def equalize_model(model: nn.Module, dummy_input: Any, *, relu6: str = "skip", absorb_high_bias: bool = True,
                   max_iterations: int = 20) -> nn.Module:
    """Cross-layer equalization plus high-bias absorption of ``model`` (FP32, eval), in place.

    BatchNorms that follow a Conv/Linear are folded into it first (and replaced by
    ``nn.Identity``). Then every pair ``Conv/Linear -> [ReLU | LeakyReLU] -> Conv/Linear``
    (the second a regular or depthwise conv of the same dimension, or a Linear after a Linear)
    is equalized; chains of pairs are iterated until the scales settle (``max_iterations``).
    With no equalizable pair the model is left as it is (BN folded) and a warning says so.

    Args:
        model: the FP32 model; changed in place and returned.
        dummy_input: an input of the model: used to report the FP32 output change.
        relu6: ``"skip"`` (pairs through ReLU6 are left alone: exact) or ``"relu"`` (replace those
            ReLU6 by ReLU, then equalize: not exact where activations exceed 6).
        absorb_high_bias: move the part of a bias that ReLU never clips into the next layer.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    >>> x = torch.randn(2, 3, 8, 8)
    >>> before = net(x)
    >>> _ = equalize_model(net, x)
    >>> torch.allclose(net(x), before, atol=1e-5)
    True
    """
    if relu6 not in RELU6_POLICIES:
        raise QuantConfigError(f"unknown relu6 policy '{relu6}'." + did_you_mean(relu6, RELU6_POLICIES))
    if model.training:
        warnings.warn("equalize_model: the model is in training mode; BatchNorm is folded with its running "
                      "statistics (call model.eval() first to silence this)", stacklevel=2)
    before = _output(model, dummy_input)
    gm = capture(model)
    bn_stats = _fold_batch_norms(model, gm)
    gm = capture(model)  # the BNs are Identity now
    found = _find_pairs(gm, relu6)
    if not found:
        msg = ("equalize_model: no equalizable pair (Conv/Linear -> ReLU/none -> Conv/Linear) in the model; "
               "nothing was equalized" + (" (pairs through ReLU6 are skipped; relu6='relu' replaces them)"
                                          if relu6 == "skip" else ""))
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        return model
    for _, _, _, relu6s in found:
        for name in relu6s:
            _set_submodule(model, name, nn.ReLU(inplace=getattr(model.get_submodule(name), "inplace", False)))
    modules = dict(model.named_modules())
    scale_of = {a: torch.ones(_out_channels(modules[a]), dtype=torch.float64) for a, _, _, _ in found}
    for it in range(max_iterations):
        worst = 0.0
        for a, b, _, _ in found:
            s = _equalize_pair(modules[a], modules[b])
            scale_of[a] = scale_of[a] * s
            worst = max(worst, float(s.log().abs().max()))
        if worst < 1e-4:
            break
    absorbed = 0
    if absorb_high_bias:
        for a, b, act, _ in found:
            if a in bn_stats and act in ("Relu", "Relu6->Relu") and _no_padding(modules[b]):
                beta, gamma = bn_stats[a]
                absorbed += _absorb_high_bias(modules[a], modules[b], beta / scale_of[a], gamma / scale_of[a]) > 0
    after = _output(model, dummy_input)
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30)) \
        if before is not None and after is not None and before.shape == after.shape else float("nan")
    log.info("equalize_model: %d pairs equalized (%d iterations), %d high biases absorbed, %d BatchNorms folded, "
             "%d ReLU6 replaced; FP32 output change on dummy_input: %.3g (max abs, relative to max |output|)",
             len(found), it + 1, absorbed, len(bn_stats), sum(len(r) for *_, r in found), change)
    return model
