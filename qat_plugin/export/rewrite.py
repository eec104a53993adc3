"""Post-processing of the exporter's graph, on onnx_ir (the IR ``torch.onnx.export`` returns).

The exporter writes every quantizer as ``QuantizeLinear -> DequantizeLinear`` on float tensors.
These passes turn that into what an integer runtime executes, each one owning one rewrite:

* :func:`fold_weight_quantizers`: a weight's ``QuantizeLinear`` becomes an integer initializer
  (int4 / int8 / int16) feeding its ``DequantizeLinear``; every weight site must end that way.
* :func:`fold_zero_pads`: a constant zero ``Pad`` owned by convolutions goes into their ``pads``.
* :func:`int32_biases`: the biases the simulation puts on the int32 grid become int32
  ``DequantizeLinear`` initializers with ``scale = input_scale * weight_scale``.
* :func:`global_average_pools`: a spatial ``ReduceMean`` becomes ``GlobalAveragePool``.

The grid math (integer ranges, the bias scale) is the simulation's own
(:mod:`qat_plugin.encoding`), so the file holds exactly the integers the simulation uses.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import torch

from ..encoding import Encoding, int32_bias_grid

#: (bitwidth, signed) -> the ONNX type of a weight's integers
INTEGER_TYPES = {(4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4,
                 (8, True): ir.DataType.INT8, (8, False): ir.DataType.UINT8,
                 (16, True): ir.DataType.INT16, (16, False): ir.DataType.UINT16}
_NUMPY_CONTAINER = {4: (np.int8, np.uint8), 8: (np.int8, np.uint8), 16: (np.int16, np.uint16)}


def integer_range(enc: Encoding) -> tuple[int, int]:
    """The integer range of ``enc`` in ONNX's view: signed when symmetric, unsigned otherwise."""
    if enc.symmetric:
        return -(2 ** (enc.bitwidth - 1)), 2 ** (enc.bitwidth - 1) - 1
    return 0, 2**enc.bitwidth - 1


def quantize_array(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int, qmin: int,
                   qmax: int) -> np.ndarray:
    """ONNX QuantizeLinear on an array: ``clip(rint(w / scale) + zero_point)`` (half to even)."""
    shape = [1] * w.ndim
    if scale.ndim:
        shape[axis] = -1
    q = np.rint(w.astype(np.float32) / scale.astype(np.float32).reshape(shape))
    return np.clip(q + zero_point.astype(np.int64).reshape(shape), qmin, qmax)


class _Names:
    """Fresh value names in one graph."""

    def __init__(self, graph: ir.Graph):
        self.taken = {v.name for v in graph.inputs} | set(graph.initializers)
        self.taken |= {v.name for n in graph for v in n.outputs}

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def _initializer(graph: ir.Graph, names: _Names, array: np.ndarray, base: str,
                 dtype: Optional[ir.DataType] = None) -> ir.Value:
    name = names(base)
    value = ir.Value(name=name, const_value=ir.tensor(array, dtype=dtype, name=name))
    graph.register_initializer(value)
    return value


def _const(value: Optional[ir.Value]) -> Optional[np.ndarray]:
    """The value of an initializer or of a Constant node's output, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    return value.decode() if isinstance(value, bytes) else value


def fold_weight_quantizers(model: ir.Model, site_of_scale: dict[str, tuple[str, Encoding]], *,
                           param_keys: Iterable[str] = ()) -> dict[str, str]:
    """Store each weight quantized: ``initializer -> QuantizeLinear -> DequantizeLinear`` becomes
    ``integer initializer -> DequantizeLinear``; 4-bit grids get INT4/UINT4 zero points (their type
    sets the grid of Q and DQ alike).

    ``site_of_scale`` maps a scale initializer's name to ``(site key, Encoding)``. Every site in
    ``param_keys`` must end as an integer initializer, else RuntimeError: a silently float weight
    would be a wrong file. Returns ONNX tensor name -> site key, for weights and activations.
    """
    graph, names = model.graph, _Names(model.graph)
    tensor_sites: dict[str, str] = {}
    converted = set()
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        x, scale, zero_point = node.inputs[0], node.inputs[1], node.inputs[2]
        key, enc = site_of_scale.get(scale.name, (None, None)) if scale is not None else (None, None)
        if key is None:
            continue
        qmin, qmax = integer_range(enc)
        if enc.bitwidth == 4:  # retype the zero point, and the Q output it types
            low = INTEGER_TYPES[(4, enc.symmetric)]
            new_zp = _initializer(graph, names, _const(zero_point), f"{zero_point.name}_int4", low)
            for user in [node] + [u for u, _ in node.outputs[0].uses()]:
                if user.op_type in ("QuantizeLinear", "DequantizeLinear") and user.inputs[2] is zero_point:
                    user.replace_input_with(2, new_zp)
            node.outputs[0].dtype = low
            zero_point = new_zp
        if x.const_value is not None and x.is_initializer():  # a weight: store it quantized
            q = quantize_array(x.const_value.numpy(), _const(scale), _const(zero_point), _attr(node, "axis", 1),
                               qmin, qmax)
            container = _NUMPY_CONTAINER[enc.bitwidth][0 if enc.symmetric else 1]
            qvalue = _initializer(graph, names, q.astype(container), f"{x.name}_quantized",
                                  INTEGER_TYPES[(enc.bitwidth, enc.symmetric)])
            node.outputs[0].replace_all_uses_with(qvalue)
            graph.remove(node, safe=True)
            tensor_sites[x.name] = key
            converted.add(key)
        elif tensor_sites.setdefault(x.name, key) != key:
            # a second grid on one tensor (QuantSimModel.split_site): named by what its consumers read
            dq = [u for u, _ in node.outputs[0].uses() if u.op_type == "DequantizeLinear"]
            tensor_sites[dq[0].outputs[0].name if dq else node.outputs[0].name] = key
    missing = sorted(set(param_keys) - converted)
    if missing:
        raise RuntimeError(f"export: weight site(s) {missing} did not become integer initializers (their "
                           "QuantizeLinear no longer reads an initializer in the exported graph); this is a bug "
                           "in qat_plugin's export, please report it with the model")
    return tensor_sites


def fold_zero_pads(model: Union[ir.Model, onnx.ModelProto]) -> int:
    """Fold every constant zero ``Pad`` whose every consumer is a ``Conv`` reading it as its data
    input into those convs' ``pads`` (which may be asymmetric), in place; returns how many Pads
    went. This is the export side of :func:`qat_plugin.graph.plan.fold_zero_pads`: the plan puts
    no quantizer after such a pad, so the Conv reads ``DequantizeLinear -> Pad``; after this,
    ``DequantizeLinear`` directly, and the runtime fuses an integer Conv with no Pad left over.
    The export calls it on every QDQ file (some exporter versions do it themselves).

    >>> from onnx import TensorProto, helper, numpy_helper
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
    if isinstance(model, onnx.ModelProto):
        irm = ir.from_proto(model)
        folded = fold_zero_pads(irm)
        model.CopyFrom(ir.to_proto(irm))
        return folded
    graph, folded = model.graph, 0
    for pad in list(graph):
        if pad.op_type != "Pad" or pad.outputs[0].is_graph_output() or _attr(pad, "mode", "constant") != "constant":
            continue
        uses = list(pad.outputs[0].uses())
        if not uses or any(u.op_type != "Conv" or i != 0 for u, i in uses):
            continue
        pads = _const(pad.inputs[1]) if len(pad.inputs) > 1 else None
        value = _const(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] is not None else np.zeros(())
        if pads is None or value is None or np.any(value != 0) or np.any(pads < 0):
            continue
        pads = pads.astype(np.int64).reshape(-1)
        if len(pad.inputs) > 3 and pad.inputs[3] is not None:  # axes: expand to every dimension
            axes = _const(pad.inputs[3])
            if axes is None:
                continue
            axes = axes.reshape(-1).tolist()
            rank = len(pads) // 2 + 2  # a Conv input: batch, channels and the padded spatial dims
            full = np.zeros(2 * rank, np.int64)
            for k, a in enumerate(axes):
                full[a % rank], full[a % rank + rank] = pads[k], pads[k + len(axes)]
            pads = full
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or begin[:2].any() or end[:2].any():
            continue  # only spatial padding belongs to a Conv
        if any(_attr(conv, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") for conv, _ in uses):
            continue
        extra = np.concatenate([begin[2:], end[2:]])
        for conv, _ in uses:
            old = np.asarray(_attr(conv, "pads", [0] * len(extra)), np.int64)
            conv.attributes.pop("auto_pad", None)
            conv.attributes["pads"] = ir.AttrInt64s("pads", (old + extra).tolist())
            conv.replace_input_with(0, pad.inputs[0])
        graph.remove(pad, safe=True)
        folded += 1
    return folded


def int32_biases(model: ir.Model, names: frozenset) -> None:
    """The biases the simulation puts on the int32 grid (initializers named in ``names``: the
    ``<module>.bias`` of layers with a bias grid), of Conv / Gemm and of MatMul + Add (a Linear on
    a 3-D input), become int32 DequantizeLinear initializers with the scale of
    :func:`~qat_plugin.encoding.int32_bias_grid`. Other biases stay float, as in the simulation."""
    graph, fresh = model.graph, _Names(model.graph)

    def dq_scale(value: Optional[ir.Value], through_transpose: bool = False) -> Optional[np.ndarray]:
        node = value.producer() if value is not None else None
        if node is not None and through_transpose and node.op_type == "Transpose":
            node = node.inputs[0].producer()
        if node is None or node.op_type != "DequantizeLinear" or not node.inputs[1].is_initializer():
            return None
        return _const(node.inputs[1])

    for node in list(graph):
        if node.op_type in ("Conv", "Gemm", "ConvTranspose") and len(node.inputs) >= 3 \
                and node.inputs[2] is not None and node.inputs[2].is_initializer():
            s_in, s_w, slot = dq_scale(node.inputs[0]), dq_scale(node.inputs[1]), 2
        elif node.op_type == "Add" and any(i is not None and i.is_initializer() for i in node.inputs):
            slot = 0 if node.inputs[0].is_initializer() else 1
            mm = node.inputs[1 - slot].producer()
            if mm is None or mm.op_type != "MatMul" or len(mm.outputs) != 1 or len(list(mm.outputs[0].uses())) != 1 \
                    or mm.outputs[0].is_graph_output():
                continue
            s_in, s_w = dq_scale(mm.inputs[0]), dq_scale(mm.inputs[1], through_transpose=True)
        else:
            continue
        bias_value = node.inputs[slot]
        if bias_value.name not in names or s_in is None or s_w is None or s_in.ndim:
            continue
        bias = _const(bias_value).astype(np.float32)
        if bias.ndim != 1 or (s_w.ndim and s_w.shape[0] != bias.shape[0]):
            continue
        _, bias_scale = int32_bias_grid(torch.from_numpy(bias), torch.from_numpy(np.array(s_in, np.float32)),
                                        torch.from_numpy(np.array(s_w, np.float32)))
        bias_scale = bias_scale.numpy().astype(np.float32) * np.ones_like(bias, dtype=np.float32)
        q = np.rint(bias / bias_scale).astype(np.int32)  # |q| <= 2**30: the grid raised the scale where needed
        qvalue = _initializer(graph, fresh, q, f"{bias_value.name}_quantized")
        svalue = _initializer(graph, fresh, bias_scale, f"{bias_value.name}_scale")
        out = ir.Value(name=fresh(f"{bias_value.name}_dequantized_{node.name}"))
        dq = ir.node("DequantizeLinear", [qvalue, svalue], {"axis": 0}, outputs=[out],  # zero point: 0
                     name=f"{node.name}_bias_dq")
        graph.insert_before(node, dq)
        node.replace_input_with(slot, out)


def _gap_scale_ok(node: ir.Node, image_size: Optional[int]) -> bool:
    """Whether ONNX Runtime's integer global average pool can take this node's Q/DQ scales.

    Its kernel (MLAS) computes ``m = x_scale / (y_scale * image_size)`` and refuses to run
    ("parameter out of computation range") unless ``2**-32 <= m < 256`` and the image has fewer
    than 2**24 values: an untrained network whose pooled outputs are nearly constant gets a tiny
    ``y_scale`` and fails there. Unknown scales or sizes count as fine."""
    producer = node.inputs[0].producer()
    consumers = [u for u, _ in node.outputs[0].uses()]
    if producer is None or producer.op_type != "DequantizeLinear" or not consumers or image_size is None:
        return True
    x_scale = _const(producer.inputs[1])
    y_scales = [_const(u.inputs[1]) for u in consumers if u.op_type == "QuantizeLinear"]
    if x_scale is None or x_scale.size != 1 or len(y_scales) != len(consumers) or \
            any(y is None or y.size != 1 for y in y_scales):
        return True
    for y_scale in y_scales:
        m = np.float32(x_scale.reshape(())) / (np.float32(y_scale.reshape(())) * np.float32(image_size))
        if image_size >= 2**24 or not 2.0**-32 <= m < 256.0:
            return False
    return True


def _image_size(value: ir.Value) -> Optional[int]:
    """The product of the spatial dimensions of an NCHW value, or None when one is not static."""
    dims = list(value.shape)[2:] if value.shape is not None else []
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    return int(np.prod(dims))


def global_average_pools(model: ir.Model) -> None:
    """``ReduceMean(axes=spatial, keepdims=1)`` on an NCHW tensor is ``GlobalAveragePool``, which
    ONNX Runtime runs as an integer kernel between Q/DQ (ReduceMean has none). Where that kernel
    cannot take the Q/DQ scales (see :func:`_gap_scale_ok`), the mean stays a ``ReduceMean``
    (run in float), and an exporter's ``GlobalAveragePool`` becomes one."""
    opset = model.opset_imports.get("", 0)
    for node in list(model.graph):
        if node.op_type == "GlobalAveragePool" and node.domain in ("", "ai.onnx") and node.inputs[0].shape is not None:
            rank = len(node.inputs[0].shape)
            if rank >= 3 and not _gap_scale_ok(node, _image_size(node.inputs[0])):
                axes = list(range(2, rank))
                node.op_type = "ReduceMean"
                if opset >= 18:
                    value = _initializer(model.graph, _Names(model.graph), np.array(axes, np.int64), f"{node.name}_axes")
                    node.resize_inputs(2)
                    node.replace_input_with(1, value)
                else:
                    node.attributes["axes"] = ir.AttrInt64s("axes", axes)
                node.attributes["keepdims"] = ir.AttrInt64("keepdims", 1)
            continue
        if node.op_type != "ReduceMean" or node.inputs[0].shape is None:
            continue
        rank = len(node.inputs[0].shape)
        axes = _attr(node, "axes")
        if axes is None and len(node.inputs) > 1:
            const = _const(node.inputs[1])
            axes = None if const is None else const.reshape(-1).tolist()
        if axes is None or _attr(node, "keepdims", 1) != 1 or rank < 3:
            continue
        if sorted(a % rank for a in axes) != list(range(2, rank)):
            continue
        if not _gap_scale_ok(node, _image_size(node.inputs[0])):
            continue
        node.op_type = "GlobalAveragePool"
        node.resize_inputs(1)
        node.attributes.clear()


def finish(model: ir.Model) -> onnx.ModelProto:
    """Drop what no longer feeds an output and the exporter's debugging metadata (stack traces,
    fx names: a large share of a small quantized file); return the protobuf."""
    ir_passes.RemoveUnusedNodesPass()(model)
    ir_passes.ClearMetadataAndDocStringPass()(model)
    return ir.to_proto(model)
