"""Apply a :class:`~qat_plugin.graph.plan.QuantPlan`: fold BatchNorm, swap weighted layers for
their quantized twins and insert activation quantizers into the graph."""
from __future__ import annotations

import torch
from torch import fx, nn

from ..modules import quantize_module, scale_output_channels
from ..quantizer import QuantizeDequantize
from .plan import QuantPlan, QuantizerSite


@torch.no_grad()
def fold_batch_norm_(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` (eval statistics) into the preceding Conv / ConvTranspose / Linear, in place.

    ``w' = w * gamma / sqrt(var + eps)`` per output channel and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``, computed in float64.
    """
    factor = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        factor = factor * bn.weight.double()
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(factor)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(factor)
    w = scale_output_channels(layer, layer.weight.double(), factor)
    layer.weight.copy_(w.to(layer.weight.dtype))
    new_bias = ((bias - bn.running_mean.double()) * factor + beta).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def _set_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _make_quantizer(site: QuantizerSite, learnable: bool) -> QuantizeDequantize:
    shape = (site.channels,) if site.axis is not None else ()
    return QuantizeDequantize(shape, site.bitwidth, site.symmetric, site.axis, learnable, name=site.key,
                              per_sample=site.kind != "param")


BN_FOLDING = ("static", "simulated")


def check_bn_folding(mode: str) -> str:
    """``mode`` if it is one of :data:`BN_FOLDING`, else :class:`QuantConfigError` with a suggestion."""
    if mode not in BN_FOLDING:
        from ..errors import QuantConfigError, did_you_mean
        raise QuantConfigError(f"unknown bn_folding '{mode}'." + did_you_mean(mode, BN_FOLDING))
    return mode


def apply_plan(gm: fx.GraphModule, plan: QuantPlan, learnable: bool = False,
               bn_folding: str = "static") -> dict[str, QuantizeDequantize]:
    """Mutate ``gm`` as ``plan`` says; return the quantizers by site key.

    ``bn_folding="static"`` folds each BatchNorm into its layer's weights now;
    ``"simulated"`` moves it into the quantized layer, which folds on the fly (see
    :class:`qat_plugin.modules._QuantizedWeights`) until its statistics are frozen.
    """
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    modules = dict(gm.named_modules())
    weighted = {s.module for s in plan.sites if s.module is not None}
    absorbed: dict[str, nn.Module] = {}
    for conv_name, bn_name in plan.bn_folds:
        conv, bn = by_name[conv_name], by_name[bn_name]
        if bn_folding == "simulated" and conv.target in weighted:
            absorbed[conv.target] = modules[bn.target]
        else:
            fold_batch_norm_(modules[conv.target], modules[bn.target])
        bn.replace_all_uses_with(conv)
        graph.erase_node(bn)
        gm.delete_submodule(bn.target)

    quantizers: dict[str, QuantizeDequantize] = {}
    if hasattr(gm, "quantizers"):
        raise RuntimeError("the model already has an attribute 'quantizers'; is it already quantized?")
    gm.add_module("quantizers", nn.ModuleDict())
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1:] or [None]
    for site in plan.sites:
        q = _make_quantizer(site, learnable)
        quantizers[site.key] = q
        if site.module is not None:  # a module's weight
            layer = quantize_module(gm.get_submodule(site.module), q)
            if site.module in absorbed:
                layer.attach_batch_norm(absorbed[site.module])
            _set_submodule(gm, site.module, layer)
            continue
        gm.quantizers[site.key] = q.to(_device_of(gm))
        for name in site.nodes:
            node = by_name[name]
            anchor = last_placeholder[0] if node.op == "placeholder" else node
            with graph.inserting_after(anchor):
                qnode = graph.call_module(f"quantizers.{site.key}", (node,))
            allowed = set(site.consumers) if site.consumers is not None else None
            node.replace_all_uses_with(qnode, delete_user_cb=lambda u, qn=qnode, ok=allowed:
                                       u is not qn and (ok is None or u.name in ok))
            if node.op == "placeholder":
                last_placeholder[0] = qnode
    for site in plan.sites:
        if site.module is not None and site.bias_from is not None:
            gm.get_submodule(site.module).set_bias_input_quantizer(quantizers[site.bias_from])
    graph.lint()
    gm.recompile()
    return quantizers


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
