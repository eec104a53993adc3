"""The op vocabulary: which ONNX-style op type an fx node is.

Runtime configs speak ONNX op types (``Conv``, ``Relu``, ``Add``, ...). This module maps
torch modules, functions and tensor methods onto them, so that ``nn.ReLU``, ``F.relu``,
``torch.relu`` and ``x.relu()`` all become ``Relu``.
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
    "Squeeze", "Unsqueeze", "Split", "Expand",
})

#: Ops that produce new values.
VALUE_CHANGING = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Relu", "Clip", "LeakyRelu",
    "PRelu", "Add", "Sub", "Mul", "Div", "Concat", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Silu", "Gelu", "Softmax", "LayerNormalization",
    "Custom",
})

OP_TYPES = VALUE_PRESERVING | VALUE_CHANGING

#: Op types whose module carries a weight to quantize, and the weight's output-channel axis.
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0}

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
    torch.split: "Split", torch.chunk: "Split",
}

_METHODS: dict[str, str] = {
    "add": "Add", "add_": "Add", "sub": "Sub", "mul": "Mul", "mul_": "Mul", "div": "Div",
    "matmul": "MatMul", "relu": "Relu", "relu_": "Relu", "clamp": "Clip", "clip": "Clip",
    "sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax", "mean": "ReduceMean",
    "view": "Reshape", "reshape": "Reshape", "flatten": "Flatten", "permute": "Transpose",
    "transpose": "Transpose", "contiguous": "Identity", "squeeze": "Squeeze",
    "unsqueeze": "Unsqueeze", "expand": "Expand", "split": "Split", "chunk": "Split",
}

#: Functional weighted ops: the index of the weight argument.
FUNCTIONAL_WEIGHT_ARG = {F.linear: 1, F.conv1d: 1, F.conv2d: 1, F.conv3d: 1}


def op_type_of(node: fx.Node, modules: dict[str, nn.Module], leaf_names: frozenset[str] = frozenset()) -> Optional[str]:
    """The op type of ``node``, ``"Custom"`` for a user's leaf module, ``None`` if unknown."""
    if node.op == "call_module":
        if node.target in leaf_names:
            return "Custom"
        mod = modules[node.target]
        for cls, name in _MODULES:
            if type(mod) is cls or (cls is nn.modules.batchnorm._BatchNorm and isinstance(mod, cls)):
                return name
        return None
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
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
        for prefix, namespace in (("F", F), ("torch", torch), ("operator", operator)):
            if getattr(namespace, name, None) is node.target:
                return f"{prefix}.{name}"
        return f"{getattr(node.target, '__module__', '') or ''}.{name}".lstrip(".")
    return node.name
