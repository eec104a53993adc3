"""Capture through ``torch.export`` (non-strict), for models torch.fx cannot trace.

``torch.export`` traces through Python control flow on shapes (TF-style SAME padding), through
Hugging Face transformers and through ``nn.MultiheadAttention``, down to ATen ops. The program it
returns has lost what the rest of the package relies on: module calls (``train()`` / ``eval()``
switching dropout and BatchNorm, the user's module paths as site names). This module gives them
back, so the result looks like a torch.fx trace to the planner:

* every ATen op that *is* a module's computation becomes a ``call_module`` on the user's module
  again: Linear / Conv / ConvTranspose / Embedding / BatchNorm / LayerNorm found by the owner of
  their weight (so ``F.linear(x, self.out_proj.weight, self.out_proj.bias)`` inside
  ``nn.MultiheadAttention`` becomes ``out_proj``), Dropout found by the module stack. A weighted
  module whose own ``forward`` does more (a conv that pads itself) is replaced by a plain twin
  sharing its parameters; the extra work stays in the graph as ops.
* ``scaled_dot_product_attention`` is decomposed into ``q @ k^T``, the scale, the mask, softmax
  and ``@ v``, so that both attention matmuls get quantizers (a runtime runs them as integer
  MatMuls; a fused attention kernel has no place for them).
* the exporter's shape guards and metadata assertions are dropped (they would reject autocast
  dtypes and other batch sizes); batch and sequence dimensions stay symbolic.

The capture runs the model in eval mode: Python branches on ``self.training`` are taken as in
eval, so functional dropout written as ``F.dropout(x, p, self.training)`` stays off in training
(``nn.Dropout`` modules do switch).
"""
from __future__ import annotations

import copy
import math
import sys
from typing import Any, Optional

import torch
from torch import fx, nn

from ..errors import UnsupportedModelError

aten = torch.ops.aten

#: ops that only check the exported program's assumptions (dtype, device, shape guards)
_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default, aten._assert_async.msg}

_CONV_OPS = {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d, aten.conv3d.default: nn.Conv3d,
             aten.conv_transpose1d.default: nn.ConvTranspose1d, aten.conv_transpose2d.input: nn.ConvTranspose2d,
             aten.conv_transpose3d.input: nn.ConvTranspose3d}


def _example_args(args: tuple) -> tuple:
    """A batch of one would be specialized away by torch.export: repeat it to a batch of two."""
    if all(isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == 1 for a in args):
        return tuple(torch.cat([a, a]) for a in args)
    return args


def _dynamic_shapes(args: tuple, level: int):
    """``level`` 1: the batch may vary, and every dimension of integer inputs (token ids and masks:
    the sequence length); 0: static. Other dimensions (an image's size) stay as in the dummy input:
    letting them vary makes capture far slower (52 s against 2.6 s on a small Swin)."""
    if level == 0:
        return None
    auto = torch.export.Dim.AUTO
    return tuple({d: auto for d in range(a.dim() if not a.is_floating_point() else min(a.dim(), 1))}
                 if isinstance(a, torch.Tensor) else None for a in args)


def check_input_shape(x: torch.Tensor, static: tuple, name: str) -> None:
    """Raise if ``x`` differs from the captured input in a dimension the capture fixed."""
    for dim, size in static:
        if x.shape[dim] != size:
            raise ValueError(f"input '{name}' has size {x.shape[dim]} in dimension {dim}; the model was captured "
                             f"(torch.export) with size {size} there, because its forward computes with it: build "
                             "the QuantSimModel with a dummy_input of the size you run")


def _guard_static_dims(graph: fx.Graph) -> None:
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        static = tuple((d, int(s)) for d, s in enumerate(val.shape) if isinstance(s, int))
        if static:
            with graph.inserting_after(node):
                graph.call_function(check_input_shape, (node, static, str(node.target)))


def _check_token_inputs(model: nn.Module, args: tuple) -> None:
    embeds = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    floats = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    ints = [a for a in args if isinstance(a, torch.Tensor) and not a.is_floating_point()]
    if embeds and floats and not ints:
        raise UnsupportedModelError(
            f"the model embeds token ids (nn.Embedding '{embeds[0]}') but dummy_input is float "
            f"(argument {floats[0]}); pass integer token ids, e.g. dummy_input=(torch.randint(0, vocab_size, "
            "(2, 16)), attention_mask) with an int64 attention mask")


def export_program(model: nn.Module, args: tuple) -> torch.export.ExportedProgram:
    """``torch.export.export(model, args, strict=False)`` in eval mode, with the most dynamic
    shapes that export accepts; failures become :class:`UnsupportedModelError`."""
    _check_token_inputs(model, args)
    args = _example_args(args)
    was_training = model.training
    model.eval()
    first: Optional[BaseException] = None
    tb = None
    try:
        for level in (1, 0):
            try:
                return torch.export.export(model, args, strict=False, dynamic_shapes=_dynamic_shapes(args, level))
            except Exception as e:  # export raises many kinds; keep the first (most informative) one
                if first is None:
                    first, tb = e, sys.exc_info()[2]
    finally:
        model.train(was_training)
    from .trace import offending_frame

    module, where = offending_frame(model, tb)
    raise UnsupportedModelError(
        f"neither torch.fx nor torch.export can capture module '{module}' ({type(first).__name__}: "
        f"{str(first).splitlines()[0] if str(first) else ''}).\n  at {where or 'unknown line'}\n"
        f"  way out: pass leaf_modules=['{module}'] to keep it as a black box with quantized inputs and "
        "outputs (torch.fx capture), or make the data-dependent control flow in that forward() depend on "
        "shapes only (torch.cond)") from first


def _resolve(root: nn.Module, target: str):
    try:
        return root.get_submodule(target) if target else root
    except AttributeError:
        pass
    owner, _, attr = target.rpartition(".")
    try:
        mod = root.get_submodule(owner) if owner else root
    except AttributeError:
        return None
    return getattr(mod, attr, None)


def _owner_of(node: Any, kind: str) -> Optional[str]:
    """The module path that owns a ``get_attr`` node's ``kind`` (``weight`` ...), else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr" and node.target.endswith("." + kind):
        return node.target[: -len(kind) - 1]
    return None


def _pairs(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


def _plain_twin(mod: nn.Module) -> nn.Module:
    """``mod`` itself, or a plain torch layer of its class family sharing its parameters when its
    class overrides ``forward`` (the extra work of that forward is already in the graph)."""
    for base in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d, nn.Embedding, nn.LayerNorm):
        if isinstance(mod, base):
            if type(mod).forward is base.forward:
                return mod
            twin = copy.copy(mod)
            twin.__class__ = base  # same attributes and parameters, torch's own forward
            return twin
    return mod


def _matches(node: fx.Node, mod: nn.Module) -> bool:
    """Whether ATen ``node`` computes exactly what ``mod``'s plain forward computes."""
    a, t = node.args, node.target
    bias = a[2] if len(a) > 2 else None
    has_bias = getattr(mod, "bias", None) is not None
    if t is aten.linear.default:
        return isinstance(mod, nn.Linear) and (bias is None) != has_bias
    if t in _CONV_OPS:
        if not isinstance(mod, _CONV_OPS[t]) or (bias is None) == has_bias or mod.padding_mode != "zeros":
            return False
        n = len(mod.kernel_size)
        stride = _pairs(a[3] if len(a) > 3 else 1, n)
        padding = a[4] if len(a) > 4 else 0
        padding = padding if isinstance(padding, str) else _pairs(padding, n)
        if isinstance(mod, nn.modules.conv._ConvTransposeNd):
            out_pad = _pairs(a[5] if len(a) > 5 else 0, n)
            groups, dilation = (a[6] if len(a) > 6 else 1), _pairs(a[7] if len(a) > 7 else 1, n)
            return (stride, padding, out_pad, groups, dilation) == (
                tuple(mod.stride), tuple(mod.padding), tuple(mod.output_padding), mod.groups, tuple(mod.dilation))
        dilation, groups = _pairs(a[5] if len(a) > 5 else 1, n), (a[6] if len(a) > 6 else 1)
        mod_padding = mod.padding if isinstance(mod.padding, str) else tuple(mod.padding)
        return (stride, padding, dilation, groups) == (tuple(mod.stride), mod_padding, tuple(mod.dilation), mod.groups)
    if t is aten.embedding.default:
        padding_idx = a[2] if len(a) > 2 else -1
        return isinstance(mod, nn.Embedding) and mod.max_norm is None and \
            padding_idx == (mod.padding_idx if mod.padding_idx is not None else -1)
    if t is aten.layer_norm.default:
        return isinstance(mod, nn.LayerNorm) and tuple(a[1]) == tuple(mod.normalized_shape) and \
            (len(a) < 5 or a[4] == mod.eps) and (bias is None) != (mod.bias is not None)
    if t is aten.batch_norm.default:
        return isinstance(mod, nn.modules.batchnorm._BatchNorm) and a[7] == mod.eps
    return False


def _module_of_op(node: fx.Node, root: nn.Module) -> Optional[tuple[str, int]]:
    """``(module path, index of the data argument)`` when ``node`` is a module's whole computation."""
    t = node.target
    if t is aten.embedding.default:
        path, data = _owner_of(node.args[0], "weight"), 1
    elif t is aten.batch_norm.default:
        path = _owner_of(node.args[3], "running_mean") or _owner_of(node.args[1], "weight")
        data = 0
    elif t in _CONV_OPS or t in (aten.linear.default, aten.layer_norm.default):
        path, data = _owner_of(node.args[2 if t is aten.layer_norm.default else 1], "weight"), 0
    elif t is aten.dropout.default:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else None
        mod = _resolve(root, path) if path else None
        ok = isinstance(mod, nn.modules.dropout._DropoutNd) and math.isclose(mod.p, node.args[1])
        return (path, 0) if ok else None
    else:
        return None
    mod = _resolve(root, path) if path is not None else None
    if not isinstance(mod, nn.Module) or not _matches(node, mod):
        return None
    if t is aten.batch_norm.default and mod.running_mean is None and node.args[3] is not None:
        return None
    return path, data


def _decompose_attention(graph: fx.Graph, node: fx.Node) -> None:
    """``scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, scale)`` as explicit ops."""
    q, k, v = node.args[:3]
    opts = dict(zip(("attn_mask", "dropout_p", "is_causal"), node.args[3:]))
    opts.update(node.kwargs)
    if opts.get("is_causal") or opts.get("enable_gqa") or opts.get("dropout_p", 0.0):
        return  # kept fused: the planner leaves it in float
    scale = opts.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(q.meta["val"].shape[-1])
    mask = opts.get("attn_mask")
    meta = {k_: node.meta[k_] for k_ in ("nn_module_stack", "stack_trace") if k_ in node.meta}
    before = set(graph.nodes)
    with graph.inserting_before(node):
        kt = graph.call_function(aten.transpose.int, (k, -2, -1))
        scores = graph.call_function(aten.matmul.default, (q, kt))
        scores = graph.call_function(aten.mul.Tensor, (scores, float(scale)))
        if mask is not None:
            if mask.meta["val"].dtype == torch.bool:
                scores = graph.call_function(aten.masked_fill.Scalar,
                                             (scores, graph.call_function(aten.logical_not.default, (mask,)),
                                              float("-inf")))
            else:
                scores = graph.call_function(aten.add.Tensor, (scores, mask))
        probs = graph.call_function(aten.softmax.int, (scores, -1))
        out = graph.call_function(aten.matmul.default, (probs, v))
    for n in graph.nodes:
        if n not in before:
            n.meta.update(meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _follow_input_device(graph: fx.Graph) -> None:
    """The exporter bakes the capture device into ops that create tensors (``arange``, ``.to``):
    read it from the first tensor input instead, so that ``sim.model.cuda()`` works."""
    inputs = [n for n in graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    if not inputs:
        return
    device_node = None

    def swap(a):
        return device_node if isinstance(a, torch.device) else a

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if not any(isinstance(a, torch.device) for a in list(node.args) + list(node.kwargs.values())):
            continue
        if device_node is None:
            with graph.inserting_after(inputs[-1]):
                device_node = graph.call_function(getattr, (inputs[0], "device"))
        node.args = tuple(swap(a) for a in node.args)
        node.kwargs = {k: swap(v) for k, v in node.kwargs.items()}


def capture_with_export(model: nn.Module, args: tuple) -> fx.GraphModule:
    """Capture ``model`` with ``torch.export`` and give module calls back (see the module doc).

    The GraphModule's submodules and parameters are ``model``'s own (shared, not copied).
    """
    program = export_program(model, args)
    unlifted = program.module()
    graph = copy.deepcopy(unlifted.graph)  # not owned by ``unlifted``: call_module targets are ``model``'s
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" or \
                node.op == "call_function" and node.target in _ASSERTS:
            if not node.users:
                graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.scaled_dot_product_attention.default:
            _decompose_attention(graph, node)

    _follow_input_device(graph)
    twins: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        found = _module_of_op(node, model)
        if found is None:
            continue
        path, data = found
        twins.setdefault(path, _plain_twin(_resolve(model, path)))
        with graph.inserting_before(node):
            call = graph.call_module(path, (node.args[data],))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    for node in reversed(list(graph.nodes)):  # weights now read by their modules, dead shape math
        if not node.users and (node.op == "get_attr" or node.op == "call_function" and not node.is_impure()):
            graph.erase_node(node)

    _guard_static_dims(graph)
    attrs: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in attrs:
            value = twins.get(node.target)
            if value is None:
                value = _resolve(model, node.target)
            if value is None:  # a constant the exporter lifted (not the user's): keep its copy
                value = _resolve(unlifted, node.target)
            attrs[node.target] = value
    gm = fx.GraphModule(attrs, graph, type(model).__name__)
    gm.train(model.training)
    return gm


def is_exported_graph(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` came from :func:`capture_with_export` (its ops are ATen overloads)."""
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)

