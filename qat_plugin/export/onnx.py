"""QDQ ONNX export with the installed torch's default exporter (``torch.onnx.export(dynamo=True)``).

How: a copy of ``sim.model`` has every quantizer replaced by one custom op,
``qat_plugin::quantize_dequantize``, whose ONNX translation is a QuantizeLinear +
DequantizeLinear pair. Value-preserving ops (max-pool, reshape, flatten, ...) get the same
encoding repeated after them, so that ONNX Runtime sees ``DQ -> op -> Q`` everywhere and keeps
integer kernels. The exporter's onnx_ir graph is then rewritten by the passes of :mod:`.rewrite`: weights
become INT8 (INT4, INT16) initializers feeding DequantizeLinear (before the exporter's optimizer
runs, see :func:`_optimize`), zero pads go into convs, biases on the int32 grid become int32 with
``scale = input_scale * weight_scale``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from torch import nn

from ..encoding import Encoding
from ..graph.apply import fold_batch_norm_
from ..errors import NotCalibratedError, QuantConfigError
from .encodings import write_encodings
from .rewrite import (finish, fold_weight_quantizers, fold_zero_pads, global_average_pools, int32_biases,
                      integer_range)

DEFAULT_OPSET = 20
#: bitwidth -> the first opset whose QuantizeLinear can express it
MIN_OPSET = {8: 13, 4: 21, 16: 21}


@torch.library.custom_op("qat_plugin::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                        qmin: int, qmax: int) -> torch.Tensor:
    """ONNX QuantizeLinear + DequantizeLinear semantics (zero point in ONNX's sign)."""
    shape = [1] * x.dim()
    if scale.dim():
        shape[axis] = -1
    s, z = scale.float().reshape(shape), zero_point.float().reshape(shape)
    return ((torch.clamp(torch.round(x.float() / s) + z, qmin, qmax) - z) * s).to(x.dtype)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, axis, qmin, qmax):
    return torch.empty_like(x)


def _translation(opset: int):
    op = getattr(onnxscript, f"opset{min(opset, 21)}")  # the op builder; the file's opset is `opset`

    def qdq(x, scale, zero_point, axis: int, qmin: int, qmax: int):
        q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    return {torch.ops.qat_plugin.quantize_dequantize.default: qdq}


def _container_dtype(enc: Encoding) -> torch.dtype:
    if enc.bitwidth <= 8:
        return torch.int8 if enc.symmetric else torch.uint8
    return torch.int16 if enc.symmetric else torch.uint16


class _ExportQDQ(nn.Module):
    """A quantizer frozen into ONNX's terms: scale, zero point, axis, integer range."""

    def __init__(self, enc: Encoding):
        super().__init__()
        self.register_buffer("scale", enc.scale.float().clone())
        self.register_buffer("zero_point", enc.onnx_zero_point().to(_container_dtype(enc)))
        self.axis = enc.axis if enc.axis is not None else 0
        self.qmin, self.qmax = integer_range(enc)

    def forward(self, x):
        return torch.ops.qat_plugin.quantize_dequantize(x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)


@dataclass
class ExportResult:
    onnx_path: str
    encodings_path: str
    fp32_path: Optional[str]
    opset: int
    #: ONNX tensor name -> site key, for activations and weights
    tensor_sites: dict[str, str]


def _check_exportable(sim, opset: int) -> None:
    missing = [k for k, q in sim.quantizers().items() if q.enabled and not q.is_initialized()]
    if missing:
        raise NotCalibratedError(f"cannot export: {len(missing)} quantizer(s) have no encoding (e.g. "
                                 f"'{missing[0]}'); call sim.compute_encodings(...) first")
    for key, q in sim.quantizers().items():
        if not q.enabled:
            continue
        need = MIN_OPSET.get(q.bitwidth)
        if need is None:
            raise QuantConfigError(f"quantizer '{key}' is {q.bitwidth}-bit: ONNX QuantizeLinear expresses "
                                   "4-bit and 16-bit grids (opset 21 and later) and 8-bit grids only")
        if opset < need:
            raise QuantConfigError(f"quantizer '{key}' is {q.bitwidth}-bit, which ONNX QuantizeLinear can "
                                   f"express from opset {need}; export with opset_version={need} or later "
                                   f"(asked for {opset})")


def _encodings(sim) -> dict[str, Encoding]:
    """Each enabled site's encoding as the simulation uses it: a weight's scale raised where its
    layer's int32 bias grid needs it (:func:`~qat_plugin.encoding.int32_bias_grid`)."""
    encs = {}
    for key, q in sim.quantizers().items():
        site = sim.plan.site(key)
        layer = sim.model.get_submodule(site.module) if site.module is not None else None
        encs[key] = layer.weight_encoding() if layer is not None and q.enabled else q.encoding
    return encs


def _raised_weight_scales(sim, encs: dict[str, Encoding]) -> list[str]:
    """The weight sites whose scale the int32 bias grid raised."""
    return [k for k, q in sim.quantizers().items() if q.enabled and encs[k] is not None
            and sim.plan.site(k).kind == "param" and not torch.equal(encs[k].scale, q.encoding.scale)]


def _export_copy(sim, quantized: bool) -> nn.Module:
    """``sim.model`` with quantizers turned into the custom op (or into identities)."""
    gm = copy.deepcopy(sim.model).cpu().eval()
    encs = _encodings(sim) if quantized else {}
    for key, q in sim.quantizers().items():
        site = sim.plan.site(key)
        new = _ExportQDQ(encs[key].to_cpu()) if quantized and q.enabled else nn.Identity()
        if site.module is not None:
            layer = gm.get_submodule(site.module)
            layer.param_quantizers["weight"] = new
            layer.set_bias_input_quantizer(None)
            if layer.bn is not None:  # simulated folding: fold for good in the export copy
                fold_batch_norm_(layer, layer.bn)
                layer.bn = None
        else:
            gm.quantizers[key] = new
    if quantized:
        by_name = {n.name: n for n in gm.graph.nodes}
        for node_name, key in sim.plan.passthrough:
            node = by_name.get(node_name)
            if node is None or all(u.op == "call_module" and u.target == f"quantizers.{key}" for u in node.users):
                continue
            with gm.graph.inserting_after(node):
                qn = gm.graph.call_module(f"quantizers.{key}", (node,))
            node.replace_all_uses_with(qn, delete_user_cb=lambda u, qn=qn: u is not qn)
        gm.graph.lint()
        gm.recompile()
    return gm


def _torch_export(module: nn.Module, args: tuple, opset: int, dynamic_batch: bool, quantized: bool,
                  input_names, output_names) -> ir.Model:
    """The exporter's graph with constants folded but not yet optimized (see :func:`_optimize`)."""
    if dynamic_batch and all(isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == 1 for a in args):
        args = tuple(torch.cat([a, a]) for a in args)  # a batch of 1 would be specialized away
    dynamic = None
    if dynamic_batch:  # batch; and for token inputs (integer ids, masks) the sequence length too
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic = tuple(({0: batch, 1: seq} if not a.is_floating_point() and a.dim() >= 2 else {0: batch})
                        if isinstance(a, torch.Tensor) and a.dim() else None for a in args)
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
                                    custom_translation_table=_translation(opset) if quantized else None,
                                    input_names=input_names, output_names=output_names, verbose=False,
                                    optimize=False)
    model = program.model  # an onnx_ir.Model (onnxscript >= 0.3)
    onnxscript.optimizer.fold_constants(model)  # a weight computed from parameters becomes an initializer
    return model


def _optimize(model: ir.Model) -> None:
    """The exporter's own optimization, run after :func:`.rewrite.fold_weight_quantizers`: it merges
    initializers of equal content (two quantizers on one grid, cloned layers), which would hide
    which quantizer a scale belongs to, and eliminates common subexpressions."""
    onnxscript.optimizer.optimize(model)


def export_onnx(sim, path: str | os.PathLike, filename_prefix: str, dummy_input: Any, *,
                opset_version: Optional[int] = None, export_fp32: bool = False, dynamic_batch: bool = True,
                input_names=None, output_names=None) -> ExportResult:
    """Write ``<prefix>.onnx`` (QDQ), ``<prefix>.encodings`` (AIMET 0.6.1 JSON) and optionally
    ``<prefix>_fp32.onnx`` (BN-folded float model without Q/DQ) into ``path``."""
    needs_21 = any(q.enabled and q.bitwidth in (4, 16) for q in sim.quantizers().values())
    opset = opset_version if opset_version is not None else (21 if needs_21 else DEFAULT_OPSET)
    _check_exportable(sim, opset)
    os.makedirs(path, exist_ok=True)
    args = tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
    args = tuple(a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args)

    encs = _encodings(sim)
    raised = _raised_weight_scales(sim, encs)
    if raised:
        warnings.warn(f"int32 bias overflow: the weight scale of {len(raised)} site(s) was raised so that "
                      f"|bias| / (input_scale x weight_scale) fits in 2**30 ({', '.join(raised)}); the ONNX "
                      "weights and the encodings file carry the raised scales", RuntimeWarning, stacklevel=3)
    model = _torch_export(_export_copy(sim, True), args, opset, dynamic_batch, True, input_names, output_names)
    site_of_scale = {}
    for key, q in sim.quantizers().items():
        site = sim.plan.site(key)
        prefix = f"{site.module}.param_quantizers.weight" if site.module is not None else f"quantizers.{key}"
        site_of_scale[f"{prefix}.scale"] = (key, encs[key])
    params = frozenset(k for k in sim.quantizers() if sim.plan.site(k).kind == "param" and sim.quantizers()[k].enabled)
    int32 = frozenset(f"{sim.plan.site(k).module}.bias" for k in params
                      if sim.plan.site(k).module is not None and sim.plan.site(k).bias_from is not None
                      and sim.quantizers()[sim.plan.site(k).bias_from].enabled)
    tensor_sites = fold_weight_quantizers(model, site_of_scale, param_keys=params)
    _optimize(model)
    values = {v.name for v in model.graph.inputs} | {v.name for n in model.graph for v in n.outputs}
    # an activation computed twice (cloned layers on one input) is computed once now: its second name is gone
    tensor_sites = {t: k for t, k in tensor_sites.items() if t in values or sim.plan.site(k).kind == "param"}
    fold_zero_pads(model)
    int32_biases(model, int32)
    global_average_pools(model)
    model = finish(model)
    model.producer_name = "qat_plugin"
    onnx.checker.check_model(model)
    onnx_path = os.path.join(os.fspath(path), f"{filename_prefix}.onnx")
    onnx.save(model, onnx_path)

    params = {t: encs[k] for t, k in tensor_sites.items() if sim.plan.site(k).kind == "param"}
    acts = {t: encs[k] for t, k in tensor_sites.items() if t not in params}
    enc_path = os.path.join(os.fspath(path), f"{filename_prefix}.encodings")
    write_encodings(enc_path, acts, params, {
        "activation_bitwidth": sim.output_bw, "param_bitwidth": sim.param_bw, "dtype": "int",
        "quant_scheme": sim.quant_scheme, "param_quant_scheme": sim.param_quant_scheme, "config": sim.config.name,
        "per_channel_quantization": sim.config.per_channel_quantization, "opset": opset})

    fp32_path = None
    if export_fp32:
        fp32 = _torch_export(_export_copy(sim, False), args, opset, dynamic_batch, False, input_names, output_names)
        _optimize(fp32)
        fp32 = finish(fp32)
        fp32_path = os.path.join(os.fspath(path), f"{filename_prefix}_fp32.onnx")
        onnx.save(fp32, fp32_path)
    return ExportResult(onnx_path, enc_path, fp32_path, opset, tensor_sites)
