"""The op vocabulary: which ONNX-style op type an fx node is.

Runtime configs speak ONNX op types (``Conv``, ``Relu``, ``Add``, ...). This module maps
torch modules, functions, tensor methods and ATen ops (graphs captured by ``torch.export``) onto
them, so that ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()`` and ``aten.relu`` all become
``Relu``.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

#: Ops that only move, select or reorder values: their output is on the input's grid, so
#: they never re-quantize unless a config says so explicitly.
VALUE_PRESERVING = frozenset({
    "MaxPool", "Reshape", "Flatten", "Transpose", "Dropout", "Identity", "Pad", "Slice",
    "Squeeze", "Unsqueeze", "Split", "Expand", "Gather",
})

#: Ops that combine a value with an attention mask (``masked_fill``, ``where``): the result holds
#: -inf or a huge negative number where masked, so it is never quantized; the consumer (Softmax)
#: takes it in float, as runtimes do.
MASKING = frozenset({"Where"})

#: Ops that produce new values.
VALUE_CHANGING = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Relu", "Clip", "LeakyRelu",
    "PRelu", "Add", "Sub", "Mul", "Div", "Concat", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Silu", "Gelu", "Softmax", "LayerNormalization",
    "Erf", "Sqrt", "Pow", "Exp", "Custom",
})

OP_TYPES = VALUE_PRESERVING | VALUE_CHANGING | MASKING

#: Op types whose module carries a weight to quantize, and the weight's channel axis (for
#: Gather, an embedding table: one encoding per row, i.e. per token).
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0, "Gather": 0}

_MODULES: list[tuple[type, str]] = [
    (nn.Conv1d, "Conv"), (nn.Conv2d, "Conv"), (nn.Conv3d, "Conv"),
    (nn.ConvTranspose1d, "ConvTranspose"), (nn.ConvTranspose2d, "ConvTranspose"),
    (nn.ConvTranspose3d, "ConvTranspose"), (nn.Linear, "Gemm"),
    (nn.modules.batchnorm._BatchNorm, "BatchNormalization"),
    (nn.ReLU, "Relu"), (nn.ReLU6, "Clip"), (nn.Hardtanh, "Clip"), (nn.LeakyReLU, "LeakyRelu"),
    (nn.PReLU, "PRelu"), (nn.Sigmoid, "Sigmoid"), (nn.Tanh, "Tanh"), (nn.Hardsigmoid, "HardSigmoid"),
    (nn.Hardswish, "HardSwish"), (nn.SiLU, "Silu"), (nn.GELU, "Gelu"), (nn.Softmax, "Softmax"),
    (nn.LayerNorm, "LayerNormalization"),
    (nn.MaxPool1d, "MaxPool"), (nn.MaxPool2d, "MaxPool"), (nn.MaxPool3d, "MaxPool"),
    (nn.AdaptiveMaxPool2d, "MaxPool"),
    (nn.AvgPool1d, "AveragePool"), (nn.AvgPool2d, "AveragePool"), (nn.AvgPool3d, "AveragePool"),
    (nn.AdaptiveAvgPool1d, "GlobalAveragePool"), (nn.AdaptiveAvgPool2d, "GlobalAveragePool"),
    (nn.AdaptiveAvgPool3d, "GlobalAveragePool"),
    (nn.Flatten, "Flatten"), (nn.Unflatten, "Reshape"), (nn.Dropout, "Dropout"),
    (nn.Dropout1d, "Dropout"), (nn.Dropout2d, "Dropout"), (nn.Dropout3d, "Dropout"),
    (nn.Identity, "Identity"), (nn.ZeroPad2d, "Pad"), (nn.ConstantPad2d, "Pad"),
    (nn.Embedding, "Gather"),
]

_FUNCTIONS: dict = {
    operator.add: "Add", operator.iadd: "Add", torch.add: "Add",
    operator.sub: "Sub", operator.isub: "Sub", torch.sub: "Sub",
    operator.mul: "Mul", operator.imul: "Mul", torch.mul: "Mul",
    operator.truediv: "Div", torch.div: "Div",
    operator.matmul: "MatMul", torch.matmul: "MatMul", torch.bmm: "MatMul",
    torch.cat: "Concat", torch.concat: "Concat",
    F.relu: "Relu", torch.relu: "Relu", F.relu6: "Clip", F.hardtanh: "Clip",
    torch.clamp: "Clip", torch.clip: "Clip", F.leaky_relu: "LeakyRelu",
    torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", torch.tanh: "Tanh", F.tanh: "Tanh",
    F.hardsigmoid: "HardSigmoid", F.hardswish: "HardSwish", F.silu: "Silu", F.gelu: "Gelu",
    F.softmax: "Softmax", torch.softmax: "Softmax", F.layer_norm: "LayerNormalization",
    F.linear: "Gemm", F.conv1d: "Conv", F.conv2d: "Conv", F.conv3d: "Conv",
    F.max_pool1d: "MaxPool", F.max_pool2d: "MaxPool", F.max_pool3d: "MaxPool",
    F.avg_pool1d: "AveragePool", F.avg_pool2d: "AveragePool", F.avg_pool3d: "AveragePool",
    F.adaptive_avg_pool1d: "GlobalAveragePool", F.adaptive_avg_pool2d: "GlobalAveragePool",
    F.adaptive_avg_pool3d: "GlobalAveragePool", torch.mean: "ReduceMean",
    torch.flatten: "Flatten", torch.reshape: "Reshape", torch.permute: "Transpose",
    torch.transpose: "Transpose", torch.squeeze: "Squeeze", torch.unsqueeze: "Unsqueeze",
    F.dropout: "Dropout", F.pad: "Pad", operator.getitem: "Slice", getattr: "Slice",
    torch.split: "Split", torch.chunk: "Split", torch.where: "Where", torch.masked_fill: "Where",
}

_METHODS: dict[str, str] = {
    "add": "Add", "add_": "Add", "sub": "Sub", "mul": "Mul", "mul_": "Mul", "div": "Div",
    "matmul": "MatMul", "relu": "Relu", "relu_": "Relu", "clamp": "Clip", "clip": "Clip",
    "sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax", "mean": "ReduceMean",
    "view": "Reshape", "reshape": "Reshape", "flatten": "Flatten", "permute": "Transpose",
    "transpose": "Transpose", "contiguous": "Identity", "squeeze": "Squeeze",
    "unsqueeze": "Unsqueeze", "expand": "Expand", "split": "Split", "chunk": "Split",
    "masked_fill": "Where", "masked_fill_": "Where", "where": "Where",
}

aten = torch.ops.aten
_ATEN: dict = {
    aten.add.Tensor: "Add", aten.add.Scalar: "Add", aten.sub.Tensor: "Sub", aten.rsub.Scalar: "Sub",
    aten.mul.Tensor: "Mul", aten.mul.Scalar: "Mul", aten.div.Tensor: "Div", aten.div.Scalar: "Div",
    aten.matmul.default: "MatMul", aten.bmm.default: "MatMul", aten.mm.default: "MatMul",
    aten.cat.default: "Concat", aten.relu.default: "Relu", aten.relu_.default: "Relu",
    aten.hardtanh.default: "Clip", aten.hardtanh_.default: "Clip", aten.clamp.default: "Clip",
    aten.leaky_relu.default: "LeakyRelu", aten.sigmoid.default: "Sigmoid", aten.tanh.default: "Tanh",
    aten.hardsigmoid.default: "HardSigmoid", aten.hardswish.default: "HardSwish", aten.hardswish_.default: "HardSwish",
    aten.silu.default: "Silu", aten.silu_.default: "Silu", aten.gelu.default: "Gelu",
    aten.softmax.int: "Softmax", aten._softmax.default: "Softmax", aten.layer_norm.default: "LayerNormalization",
    aten.linear.default: "Gemm", aten.conv1d.default: "Conv", aten.conv2d.default: "Conv", aten.conv3d.default: "Conv",
    aten.embedding.default: "Gather", aten.batch_norm.default: "BatchNormalization",
    aten.max_pool1d.default: "MaxPool", aten.max_pool2d.default: "MaxPool", aten.max_pool3d.default: "MaxPool",
    aten.avg_pool1d.default: "AveragePool", aten.avg_pool2d.default: "AveragePool", aten.avg_pool3d.default: "AveragePool",
    aten.adaptive_avg_pool1d.default: "GlobalAveragePool", aten.adaptive_avg_pool2d.default: "GlobalAveragePool",
    aten.adaptive_avg_pool3d.default: "GlobalAveragePool", aten.mean.dim: "ReduceMean",
    aten.view.default: "Reshape", aten.reshape.default: "Reshape", aten._unsafe_view.default: "Reshape",
    aten.unflatten.int: "Reshape", aten.flatten.using_ints: "Flatten", aten.permute.default: "Transpose",
    aten.transpose.int: "Transpose", aten.t.default: "Transpose", aten.squeeze.dim: "Squeeze",
    aten.squeeze.default: "Squeeze", aten.squeeze.dims: "Squeeze", aten.unsqueeze.default: "Unsqueeze",
    aten.expand.default: "Expand", aten.contiguous.default: "Identity", aten.clone.default: "Identity",
    aten.alias.default: "Identity", aten.dropout.default: "Dropout", aten.select.int: "Slice",
    aten.slice.Tensor: "Slice", aten.narrow.default: "Slice", aten.split.Tensor: "Split",
    aten.split_with_sizes.default: "Split", aten.chunk.default: "Split", aten.unbind.int: "Split",
    aten.roll.default: "Slice", aten.masked_fill.Scalar: "Where", aten.where.self: "Where",
    aten.erf.default: "Erf", aten.sqrt.default: "Sqrt", aten.pow.Tensor_Scalar: "Pow", aten.exp.default: "Exp",
}

#: ``aten.pad`` / ``aten.constant_pad_nd`` are value-preserving only when they pad with zeros
#: (zero is on every grid); another constant is a value-changing op.
_PADS = {aten.pad.default, aten.constant_pad_nd.default}

#: Functional weighted ops: the index of the weight argument.
FUNCTIONAL_WEIGHT_ARG = {F.linear: 1, F.conv1d: 1, F.conv2d: 1, F.conv3d: 1, aten.linear.default: 1,
                         aten.conv1d.default: 1, aten.conv2d.default: 1, aten.conv3d.default: 1,
                         aten.embedding.default: 0}


def op_type_of(node: fx.Node, modules: dict[str, nn.Module], leaf_names: frozenset[str] = frozenset()) -> Optional[str]:
    """The op type of ``node``, ``"Custom"`` for a user's leaf module, ``None`` if unknown."""
    if node.op == "call_module":
        if node.target in leaf_names:
            return "Custom"
        mod = modules[node.target]
        for cls, name in _MODULES:
            if type(mod) is cls or (cls is nn.modules.batchnorm._BatchNorm and isinstance(mod, cls)) \
                    or (cls is nn.Linear and isinstance(mod, cls) and type(mod).forward is nn.Linear.forward):
                return name
        return None
    if node.op == "call_function":
        if node.target in _PADS:
            value = node.args[3] if node.target is aten.pad.default and len(node.args) > 3 else \
                node.args[2] if node.target is aten.constant_pad_nd.default and len(node.args) > 2 else 0
            mode = node.args[2] if node.target is aten.pad.default and len(node.args) > 2 else "constant"
            return "Pad" if mode == "constant" and not value else None
        return _FUNCTIONS.get(node.target) or _ATEN.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def describe(node: fx.Node) -> str:
    """A short human name of what a node calls (``layer1.0.conv1``, ``torch.cat``, ``.mean``)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        if isinstance(node.target, torch._ops.OpOverload):  # torch.export: say in which module it runs
            stack = node.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else ""
            op = f"aten.{name.removesuffix('.default')}"
            return f"{path}: {op}" if path else op
        for prefix, namespace in (("F", F), ("torch", torch), ("operator", operator)):
            if getattr(namespace, name, None) is node.target:
                return f"{prefix}.{name}"
        return f"{getattr(node.target, '__module__', '') or ''}.{name}".lstrip(".")
    return node.name
