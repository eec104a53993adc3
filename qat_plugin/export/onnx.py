"""QDQ ONNX export with the installed torch's default exporter (``torch.onnx.export(dynamo=True)``).

How: a copy of ``sim.model`` has every quantizer replaced by one custom op,
``qat_plugin::quantize_dequantize``, whose ONNX translation is a QuantizeLinear +
DequantizeLinear pair. Value-preserving ops (max-pool, reshape, flatten, ...) get the same
encoding repeated after them, so that ONNX Runtime sees ``DQ -> op -> Q`` everywhere and keeps
integer kernels. The exported graph is then rewritten: weights become INT8 (or INT4)
initializers feeding DequantizeLinear, and biases of Conv/Gemm become int32 with
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

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from ..encoding import Encoding, int32_bias_grid
from ..graph.apply import fold_batch_norm_
from ..errors import NotCalibratedError, QuantConfigError
from .encodings import write_encodings

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
    import onnxscript

    op = getattr(onnxscript, f"opset{min(opset, 21 if hasattr(onnxscript, 'opset21') else 18)}")

    def qdq(x, scale, zero_point, axis: int, qmin: int, qmax: int):
        q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    return {torch.ops.qat_plugin.quantize_dequantize.default: qdq}


def _integer_range(enc: Encoding) -> tuple[int, int]:
    """The integer range of ``enc`` in ONNX's view: signed when symmetric, unsigned otherwise."""
    if enc.symmetric:
        return -(2 ** (enc.bitwidth - 1)), 2 ** (enc.bitwidth - 1) - 1
    return 0, 2**enc.bitwidth - 1


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
        self.qmin, self.qmax = _integer_range(enc)

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
                  input_names, output_names) -> onnx.ModelProto:
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
                                    input_names=input_names, output_names=output_names, verbose=False)
    return program.model_proto


class _Graph:
    """Small index over an ONNX graph for the rewrites below."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def add_init(self, array: np.ndarray, name: str, dtype: Optional[int] = None) -> str:
        base, i = name, 0
        while name in self.inits:
            i += 1
            name = f"{base}_{i}"
        if dtype is None:
            tensor = numpy_helper.from_array(array, name)
        else:
            tensor = helper.make_tensor(name, dtype, array.shape, array.reshape(-1).tolist())
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def uses(self, name: str) -> int:
        return sum(name in n.input for n in self.graph.node) + sum(o.name == name for o in self.graph.output)

    def drop_unused_initializers(self) -> None:
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        self.inits = {t.name: t for t in keep}


def _low_bit_type(bitwidth: int, signed: bool) -> Optional[int]:
    if bitwidth == 4:
        return onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    return None


def _quantize_array(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int, qmin: int, qmax: int) -> np.ndarray:
    shape = [1] * w.ndim
    if scale.ndim:
        shape[axis] = -1
    q = np.rint(w.astype(np.float32) / scale.astype(np.float32).reshape(shape)) + zp.astype(np.int64).reshape(shape)
    return np.clip(q, qmin, qmax)


def _rewrite(model: onnx.ModelProto, site_of_scale: dict[str, Any], param_keys: frozenset = frozenset(),
             int32_biases: frozenset = frozenset()) -> dict[str, str]:
    """Fold weight QuantizeLinear into integer initializers; int32 biases; 4-bit types.

    ``site_of_scale`` maps a scale initializer name to ``(site key, Encoding)``; every site in
    ``param_keys`` must end as an integer initializer (else RuntimeError: a silent float weight
    would be a wrong file). Returns ONNX tensor name -> site key.
    """
    g = _Graph(model)
    tensor_sites: dict[str, str] = {}
    removed, retyped, converted = [], set(), set()
    for node in list(g.graph.node):
        if node.op_type != "QuantizeLinear":
            continue
        x, scale_name, zp_name = node.input[0], node.input[1], node.input[2]
        key, enc = site_of_scale.get(scale_name, (None, None))
        if key is None:
            continue
        signed = enc.symmetric
        qmin, qmax = _integer_range(enc)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        low = _low_bit_type(enc.bitwidth, signed)
        consumers = [n for n in g.graph.node if node.output[0] in n.input]
        if low is not None:  # 4-bit: the zero point's type sets the grid for Q and DQ alike
            retyped.add(node.output[0])
            new_zp = g.add_init(g.array(zp_name), f"{zp_name}_int4", low)
            for n in [node] + consumers:
                if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[2] == zp_name:
                    n.input[2] = new_zp
            zp_name = new_zp
        if x in g.inits:  # a weight: store it quantized
            q = _quantize_array(g.array(x), g.array(scale_name), numpy_helper.to_array(g.inits[zp_name]),
                                axis, qmin, qmax)
            np_type = {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16, (16, False): np.uint16}
            if low is not None:
                qname = g.add_init(q.astype(np.int8 if signed else np.uint8), f"{x}_quantized", low)
            else:
                qname = g.add_init(q.astype(np_type[(enc.bitwidth, signed)]), f"{x}_quantized")
            for n in consumers:
                n.input[0] = qname
            removed.append(node)
            tensor_sites[x] = key
            converted.add(key)
        else:
            tensor_sites.setdefault(x, key)
    missing = sorted(set(param_keys) - converted)
    if missing:
        raise RuntimeError(f"export: weight site(s) {missing} did not become integer initializers (their "
                           "QuantizeLinear no longer reads an initializer in the exported graph); this is a bug "
                           "in qat_plugin's export, please report it with the model")
    for node in removed:
        g.graph.node.remove(node)
    keep = [v for v in g.graph.value_info if v.name not in retyped]  # their element type changed
    del g.graph.value_info[:]
    g.graph.value_info.extend(keep)
    _fold_zero_pads(g)
    _int32_biases(g, int32_biases)
    _global_average_pools(g)
    g.drop_unused_initializers()
    _strip_metadata(model)
    return tensor_sites


def _constant(g: _Graph, name: str) -> Optional[np.ndarray]:
    """The value of ``name`` when it is an initializer or a Constant node's output."""
    if name in g.inits:
        return g.array(name)
    node = g.producer.get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))
    return None


def fold_zero_pads(model: onnx.ModelProto) -> int:
    """Fold every constant zero ``Pad`` that only feeds Conv data inputs into those convs' ``pads``,
    in place; returns how many Pads went. The export calls it on every QDQ file (some exporter
    versions do this themselves; this makes it independent of them).

    >>> from onnx import TensorProto
    >>> g = helper.make_graph(
    ...     [helper.make_node("Pad", ["x", "p"], ["xp"]), helper.make_node("Conv", ["xp", "w"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    ...     [numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1]), "p"),
    ...      numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")])
    >>> m = helper.make_model(g)
    >>> fold_zero_pads(m), [n.op_type for n in m.graph.node], list(m.graph.node[0].attribute[0].ints)
    (1, ['Conv'], [0, 0, 1, 1])
    """
    g = _Graph(model)
    before = len(g.graph.node)
    _fold_zero_pads(g)
    g.drop_unused_initializers()
    return before - len(g.graph.node)


def _fold_zero_pads(g: _Graph) -> None:
    """A constant zero ``Pad`` whose every consumer is a ``Conv`` reading it as its data input
    becomes part of those convs' ``pads`` (which may be asymmetric), and goes. This is the
    export side of :func:`qat_plugin.graph.plan.fold_zero_pads`: the plan puts no quantizer after
    such a pad, so the Conv reads ``DequantizeLinear -> Pad``; after this, ``DequantizeLinear``
    directly, and the runtime fuses an integer Conv with no Pad and no Q/DQ pair left over."""
    consumers: dict[str, list] = {}
    for n in g.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.graph.output}
    dropped = set()
    for pad in list(g.graph.node):
        if pad.op_type != "Pad" or pad.output[0] in outputs:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        mode = attrs.get("mode", b"constant")
        users = consumers.get(pad.output[0], [])
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant" or not users or \
                any(u.op_type != "Conv" or u.input[0] != pad.output[0] or list(u.input[1:]).count(pad.output[0])
                    for u in users):
            continue
        pads = _constant(g, pad.input[1]) if len(pad.input) > 1 and pad.input[1] else None
        value = _constant(g, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        if pads is None or value is None or np.any(value != 0) or np.any(pads < 0):
            continue
        pads = pads.astype(np.int64).reshape(-1)
        if len(pad.input) > 3 and pad.input[3]:  # axes: expand to every dimension
            axes = _constant(g, pad.input[3])
            rank = len(pads) // 2 + 2  # a Conv input: batch, channels and the padded spatial dims
            if axes is None:
                continue
            full = np.zeros(2 * rank, np.int64)
            for k, a in enumerate(axes.reshape(-1).tolist()):
                full[a % rank], full[a % rank + rank] = pads[k], pads[k + len(axes.reshape(-1))]
            pads = full
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or begin[:2].any() or end[:2].any():
            continue  # only spatial padding belongs to a Conv
        extra = np.concatenate([begin[2:], end[2:]])
        for conv in users:
            cattrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
            auto = cattrs.get("auto_pad", b"NOTSET")
            if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", "VALID"):
                break
        else:
            for conv in users:
                cattrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
                old = np.asarray(cattrs.get("pads", [0] * len(extra)), np.int64)
                keep = [a for a in conv.attribute if a.name not in ("pads", "auto_pad")]
                del conv.attribute[:]
                conv.attribute.extend(keep + [helper.make_attribute("pads", (old + extra).tolist())])
                conv.input[0] = pad.input[0]
            g.graph.node.remove(pad)
            dropped.add(pad.output[0])
    if dropped:
        keep = [v for v in g.graph.value_info if v.name not in dropped]
        del g.graph.value_info[:]
        g.graph.value_info.extend(keep)
        g.producer = {o: n for n in g.graph.node for o in n.output}


def _global_average_pools(g: _Graph) -> None:
    """``ReduceMean(axes=spatial, keepdims=1)`` on an NCHW tensor is ``GlobalAveragePool``, which
    ONNX Runtime runs as an integer kernel between Q/DQ (ReduceMean has none)."""
    shapes = onnx.shape_inference.infer_shapes(g.model)
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in
            list(shapes.graph.value_info) + list(shapes.graph.input) if v.type.tensor_type.HasField("shape")}
    for node in g.graph.node:
        if node.op_type != "ReduceMean" or node.input[0] not in rank:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in g.inits:
            axes = g.array(node.input[1]).tolist()
        r = rank[node.input[0]]
        if axes is None or attrs.get("keepdims", 1) != 1 or r < 3:
            continue
        if sorted(a % r for a in axes) != list(range(2, r)):
            continue
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debugging metadata (stack traces, fx names): it is not needed
    to run the model and is a large share of a small quantized file."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        del v.metadata_props[:]
    for t in model.graph.initializer:
        del t.metadata_props[:]


def _int32_biases(g: _Graph, names: frozenset) -> None:
    """The biases the simulation puts on the int32 grid (initializers named in ``names``: the
    ``<module>.bias`` of layers with a bias grid), of Conv / Gemm and of MatMul + Add (a Linear on
    a 3-D input), become int32 DequantizeLinear initializers with ``scale = input_scale *
    weight_scale``. Other biases stay float, as in the simulation."""
    producer = {o: n for n in g.graph.node for o in n.output}

    def dq_scale(name: str, through_transpose: bool = False) -> Optional[np.ndarray]:
        node = producer.get(name)
        if node is not None and through_transpose and node.op_type == "Transpose":
            node = producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in g.inits:
            return None
        return g.array(node.input[1])

    for node in list(g.graph.node):
        if node.op_type in ("Conv", "Gemm", "ConvTranspose") and len(node.input) >= 3 and node.input[2] in g.inits:
            s_in, s_w, slot = dq_scale(node.input[0]), dq_scale(node.input[1]), 2
        elif node.op_type == "Add" and any(i in g.inits for i in node.input):
            slot = 0 if node.input[0] in g.inits else 1
            mm = producer.get(node.input[1 - slot])
            if mm is None or mm.op_type != "MatMul" or len(mm.output) != 1 or g.uses(mm.output[0]) != 1:
                continue
            s_in, s_w = dq_scale(mm.input[0]), dq_scale(mm.input[1], through_transpose=True)
        else:
            continue
        if node.input[slot] not in names or s_in is None or s_w is None or s_in.ndim:
            continue
        bias = g.array(node.input[slot]).astype(np.float32)
        if bias.ndim != 1 or (s_w.ndim and s_w.shape[0] != bias.shape[0]):
            continue
        _, bias_scale = int32_bias_grid(torch.from_numpy(bias), torch.from_numpy(np.asarray(s_in, np.float32)),
                                        torch.from_numpy(np.asarray(s_w, np.float32)))
        bias_scale = bias_scale.numpy().astype(np.float32) * np.ones_like(bias, dtype=np.float32)
        q = np.clip(np.rint(bias / bias_scale), -(2**31), 2**31 - 1).astype(np.int32)
        qname = g.add_init(q, f"{node.input[slot]}_quantized")
        sname = g.add_init(bias_scale.astype(np.float32), f"{node.input[slot]}_scale")
        out = f"{node.input[slot]}_dequantized_{node.name}"  # int32 zero point omitted: it defaults to 0
        dq = helper.make_node("DequantizeLinear", [qname, sname], [out], name=f"{node.name}_bias_dq", axis=0)
        g.graph.node.insert(list(g.graph.node).index(node), dq)
        node.input[slot] = out


def export_onnx(sim, path: str | os.PathLike, filename_prefix: str, dummy_input: Any,
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
    tensor_sites = _rewrite(model, site_of_scale, params, int32)
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
        _strip_metadata(fp32)
        fp32_path = os.path.join(os.fspath(path), f"{filename_prefix}_fp32.onnx")
        onnx.save(fp32, fp32_path)
    return ExportResult(onnx_path, enc_path, fp32_path, opset, tensor_sites)
