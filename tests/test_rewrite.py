"""The export's graph passes (qat_plugin.export.rewrite) on hand-built ONNX graphs.

Each pass is checked for what it rewrites (the integers, scales and attributes it writes, compared
with numpy or the simulation's own grid math) and for what it must leave alone, and ONNX Runtime
runs the graph before and after: a pass that changes the numbers fails here without an export."""
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qat_plugin.encoding import Encoding, int32_bias_grid
from qat_plugin.export.rewrite import (INTEGER_TYPES, finish, fold_weight_quantizers, fold_zero_pads,
                                       global_average_pools, int32_biases, integer_range, quantize_array)

FLOAT = TensorProto.FLOAT


def build(nodes, inputs, outputs, inits=(), opset=21, value_info=()):
    """A ModelProto from nodes and (name, shape) pairs for the float inputs and outputs."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits],
        value_info=[helper.make_tensor_value_info(n, FLOAT, s) for n, s in value_info])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def run(model, **feeds):
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ops(model):
    graph = model.graph
    return [n.op_type for n in (graph.node if isinstance(model, onnx.ModelProto) else graph)]


def inits(model: ir.Model):
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def enc(scale, offset, bitwidth, symmetric, axis=None):
    return Encoding(torch.as_tensor(scale, dtype=torch.float64), torch.as_tensor(offset, dtype=torch.float64),
                    bitwidth, symmetric, axis)


# ---- integer grids ------------------------------------------------------------------------------
@pytest.mark.parametrize("bw, symmetric, expected", [
    (4, True, (-8, 7)), (4, False, (0, 15)), (8, True, (-128, 127)), (8, False, (0, 255)),
    (16, True, (-32768, 32767)), (16, False, (0, 65535))])
def test_integer_range_is_onnx_view_of_the_grid(bw, symmetric, expected):
    e = enc(0.1, -(2 ** (bw - 1)) if symmetric else -3, bw, symmetric)
    assert integer_range(e) == expected
    assert expected[1] - expected[0] == 2**bw - 1


def ort_quantize(w, scale, zero_point, axis):
    """ONNX Runtime's QuantizeLinear of ``w`` (the output type follows the zero point's)."""
    model = build([helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=axis)], [("w", list(w.shape))], [],
                  [("s", scale), ("z", zero_point)])
    out_type = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    model.graph.output.append(helper.make_tensor_value_info("q", out_type, list(w.shape)))
    return run(model, w=w)[0]


@pytest.mark.parametrize("axis", [0, 1])
def test_quantize_array_equals_ort_quantize_linear(axis):
    """Ties (k + 0.5 steps), both ends and beyond, per channel along either axis: bit-exact."""
    scale = np.array([0.5, 0.25, 0.125], np.float32)
    zp = np.array([3, 0, 250], np.uint8)
    shape = [1, 1]
    shape[axis] = 3
    base = np.array([-1e3, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, 1e3], np.float32)
    w = np.stack([base * s for s in scale], axis=axis).astype(np.float32)
    q = quantize_array(w, scale, zp, axis, 0, 255)
    np.testing.assert_array_equal(q, ort_quantize(w, scale, zp, axis))
    assert q.min() == 0 and q.max() == 255  # clipped at both ends
    # half to even: -2.5 -> -2 and 2.5 -> 2, -1.5 -> -2, 1.5 -> 2, 0.5 -> 0 (plus the zero point)
    row = np.take(q, 0, axis=axis)
    np.testing.assert_array_equal(row, [0, 1, 1, 3, 3, 5, 5, 6, 255])


def test_quantize_array_divides_in_float32_as_ort_does():
    """w / scale in float32 lands on a tie that float64 does not see (52.5 vs 52.50001): ORT rounds
    the float32 quotient, and so must the file's integers."""
    w, scale = np.array([0.64575, 0.42435, 1.27305], np.float32), np.array(0.0123, np.float32)
    q = quantize_array(w, scale, np.array(0, np.int8), 1, -128, 127)
    np.testing.assert_array_equal(q, ort_quantize(w, scale, np.array(0, np.int8), 1))
    np.testing.assert_array_equal(q, [52, 34, 104])  # float64 division gives 53, 35, 103


def test_quantize_array_per_tensor_signed():
    q = quantize_array(np.array([-300.0, -0.75, -0.25, 0.25, 300.0], np.float32), np.array(0.5, np.float32),
                       np.array(0, np.int8), 1, -128, 127)
    np.testing.assert_array_equal(q, [-128, -2, 0, 0, 127])


# ---- fold_weight_quantizers ---------------------------------------------------------------------
def conv_qdq_graph(weight_bw=8, *, w_axis=0, symmetric=True, extra_names=(), axis_attr=True, narrow=1.0):
    """x -> Q/DQ (activation) -> Conv(w -> Q/DQ per channel) -> y."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    lo, hi = integer_range(enc(1.0, -(2 ** (weight_bw - 1)) if symmetric else 0, weight_bw, symmetric))
    w_scale = (np.abs(w).reshape(3, -1).max(1) / hi).astype(np.float32) if symmetric else \
        ((w.reshape(3, -1).max(1) - w.reshape(3, -1).min(1)) / (hi - lo)).astype(np.float32)
    w_zp = np.zeros(3, np.int8 if symmetric else np.uint8) if symmetric else \
        np.rint(-w.reshape(3, -1).min(1) / w_scale).astype(np.uint8)
    w_scale = (w_scale / narrow).astype(np.float32)  # narrow > 1: the grid clips the largest weights
    q_attrs = {"axis": w_axis} if axis_attr else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["wq"], **q_attrs),
             helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wd"], **q_attrs),
             helper.make_node("Conv", ["xd", "wd"], ["y"])]
    init = [("x_scale", np.array(0.05, np.float32)), ("x_zp", np.array(128, np.uint8)),
            ("w", w), ("w_scale", w_scale), ("w_zp", w_zp)] + [(n, np.zeros(1, np.float32)) for n in extra_names]
    return build(nodes, [("x", [1, 2, 5, 5])], [("y", [1, 3, 3, 3])], init), w, w_scale, w_zp


def weight_sites(bw=8, symmetric=True):
    w_enc = enc([0.1] * 3, [-(2 ** (bw - 1)) if symmetric else 0] * 3, bw, symmetric, axis=0)
    return {"x_scale": ("x_input", enc(0.05, -128, 8, False)), "w_scale": ("conv.weight", w_enc)}


@pytest.mark.parametrize("symmetric, taken, name", [
    (True, ["w_quantized", "w_quantized_1"], "w_quantized_2"),
    (False, ["w_quantized"], "w_quantized_1"),
    (True, ["w_quantized", "w_quantized_2"], "w_quantized_1"),
])
def test_weights_become_integer_initializers_with_the_same_outputs(symmetric, taken, name):
    proto, w, w_scale, w_zp = conv_qdq_graph(symmetric=symmetric, extra_names=taken)
    x = np.random.default_rng(1).normal(size=(1, 2, 5, 5)).astype(np.float32)
    before = run(proto, x=x)[0]
    model = ir.from_proto(proto)
    sites = fold_weight_quantizers(model, weight_sites(symmetric=symmetric), param_keys=["conv.weight"])
    assert sites == {"x": "x_input", "w": "conv.weight"}
    assert ops(model) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv"]
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear"][1]
    qw = dq.inputs[0]
    assert qw.name == name  # a fresh name: the first free suffix
    assert qw.const_value.dtype == (ir.DataType.INT8 if symmetric else ir.DataType.UINT8)
    np.testing.assert_array_equal(qw.const_value.numpy(), quantize_array(w, w_scale, w_zp, 0, *(
        (-128, 127) if symmetric else (0, 255))))
    np.testing.assert_array_equal(run(model, x=x)[0], before)  # DQ(int8 init) == DQ(Q(float init))


def test_weight_quantizer_without_axis_uses_onnx_default_axis_1():
    proto, w, w_scale, w_zp = conv_qdq_graph(axis_attr=False)
    # per-channel along axis 1 needs 2 scales: build a per-input-channel weight grid
    for t in proto.graph.initializer:
        if t.name == "w_scale":
            t.CopyFrom(numpy_helper.from_array(np.array([0.01, 0.02], np.float32), "w_scale"))
        if t.name == "w_zp":
            t.CopyFrom(numpy_helper.from_array(np.zeros(2, np.int8), "w_zp"))
    x = np.ones((1, 2, 5, 5), np.float32)
    before = run(proto, x=x)[0]
    model = ir.from_proto(proto)
    fold_weight_quantizers(model, weight_sites(), param_keys=["conv.weight"])
    q = inits(model)["w_quantized"]
    np.testing.assert_array_equal(q, quantize_array(w, np.array([0.01, 0.02], np.float32), np.zeros(2), 1, -128, 127))
    np.testing.assert_array_equal(run(model, x=x)[0], before)


@pytest.mark.parametrize("symmetric", [True, False])
def test_four_bit_weights_get_int4_zero_points_and_values(symmetric):
    proto, w, w_scale, w_zp = conv_qdq_graph(weight_bw=4, symmetric=symmetric, narrow=2.0)
    model = ir.from_proto(proto)
    sites = weight_sites(4, symmetric)
    fold_weight_quantizers(model, sites, param_keys=["conv.weight"])
    low = INTEGER_TYPES[(4, symmetric)]
    assert low == (ir.DataType.INT4 if symmetric else ir.DataType.UINT4)
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear"][1]
    assert dq.inputs[0].const_value.dtype == low and dq.inputs[2].const_value.dtype == low
    assert dq.inputs[2].name == "w_zp_int4"
    lo, hi = (-8, 7) if symmetric else (0, 15)
    q = dq.inputs[0].const_value.numpy()
    np.testing.assert_array_equal(q, quantize_array(w, w_scale, w_zp, 0, lo, hi))
    assert q.min() == lo and q.max() == hi  # the 4-bit grid's ends are reached (clipped), not the 8-bit ones
    onnx.checker.check_model(ir.to_proto(model))
    x = np.random.default_rng(2).normal(size=(1, 2, 5, 5)).astype(np.float32)
    out = run(model, x=x)[0]
    xd = np.clip(np.rint(x / 0.05) + 128, 0, 255).astype(np.float32) - 128
    wd = (q.astype(np.float32) - (w_zp.astype(np.float32).reshape(-1, 1, 1, 1) if not symmetric else 0)) \
        * w_scale.reshape(-1, 1, 1, 1)
    expected = torch.nn.functional.conv2d(torch.from_numpy(xd * np.float32(0.05)), torch.from_numpy(wd)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_two_four_bit_weights_sharing_a_zero_point_get_one_each():
    w = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    nodes = [helper.make_node("QuantizeLinear", [f"w{i}", "s", "z"], [f"q{i}"]) for i in (1, 2)]
    nodes += [helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"d{i}"]) for i in (1, 2)]
    nodes.append(helper.make_node("Add", ["d1", "d2"], ["y"]))
    proto = build(nodes, [], [("y", [2, 4])], [("w1", w), ("w2", -w), ("s", np.array(0.125, np.float32)),
                                                ("z", np.array(0, np.int8))])
    model = ir.from_proto(proto)
    e = enc(0.125, -8, 4, True)
    fold_weight_quantizers(model, {"s": ("w", e)}, param_keys=["w"])
    zero_points = sorted(n.inputs[2].name for n in model.graph if n.op_type == "DequantizeLinear")
    assert zero_points == ["z_int4", "z_int4_1"]
    grid = lambda v: np.clip(np.rint(v / 0.125), -8, 7) * 0.125  # noqa: E731 - the 4-bit grid: +1 clips to 0.875
    np.testing.assert_array_equal(run(model)[0], grid(w) + grid(-w))


def test_four_bit_activation_quantizer_is_retyped_on_q_and_dq():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"])]
    proto = build(nodes, [("x", [4])], [("y", [4])], [("s", np.array(0.5, np.float32)), ("z", np.array(3, np.uint8))])
    model = ir.from_proto(proto)
    sites = fold_weight_quantizers(model, {"s": ("act", enc(0.5, -3, 4, False))})
    assert sites == {"x": "act"}
    q, dq = list(model.graph)
    assert q.inputs[2] is dq.inputs[2] and q.inputs[2].const_value.dtype == ir.DataType.UINT4
    assert q.outputs[0].dtype == ir.DataType.UINT4
    out = run(model, x=np.array([-10, -1.5, 0.26, 100], np.float32))[0]
    np.testing.assert_array_equal(out, [-1.5, -1.5, 0.5, 6.0])  # the 4-bit grid: (0 - 3) .. (15 - 3) x 0.5


def test_unknown_scales_and_other_domains_are_left_alone():
    proto, *_ = conv_qdq_graph()
    proto.graph.node[2].domain = "com.microsoft"
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model = ir.from_proto(proto)
    sites = fold_weight_quantizers(model, {"w_scale": weight_sites()["w_scale"]})
    assert sites == {} and ops(model).count("QuantizeLinear") == 2
    with pytest.raises(RuntimeError, match=r"\['conv.weight', 'x_input'\] did not become integer initializers"):
        fold_weight_quantizers(model, weight_sites(), param_keys=["conv.weight", "x_input"])


def test_a_quantizer_of_unknown_scale_before_a_weight_is_skipped_not_an_end():
    proto, *_ = conv_qdq_graph()
    model = ir.from_proto(proto)
    assert fold_weight_quantizers(model, {"w_scale": weight_sites()["w_scale"]},
                                  param_keys=["conv.weight"]) == {"w": "conv.weight"}
    assert ops(model).count("QuantizeLinear") == 1  # the activation's stays


def test_a_second_grid_on_one_tensor_is_keyed_by_what_its_consumers_read():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s8", "z8"], ["q8"]),
             helper.make_node("DequantizeLinear", ["q8", "s8", "z8"], ["d8"]),
             helper.make_node("QuantizeLinear", ["x", "s16", "z16"], ["q16"]),
             helper.make_node("DequantizeLinear", ["q16", "s16", "z16"], ["d16"]),
             helper.make_node("Add", ["d8", "d16"], ["y"])]
    proto = build(nodes, [("x", [4])], [("y", [4])], [
        ("s8", np.array(0.1, np.float32)), ("z8", np.array(0, np.int8)),
        ("s16", np.array(0.001, np.float32)), ("z16", np.array(0, np.int16))])
    sites = fold_weight_quantizers(ir.from_proto(proto), {"s8": ("ln", enc(0.1, -128, 8, True)),
                                                          "s16": ("ln_split", enc(0.001, -32768, 16, True))})
    assert sites == {"x": "ln", "d16": "ln_split"}
    # the same key twice on one tensor is one entry
    nodes[2] = helper.make_node("QuantizeLinear", ["x", "s8", "z8"], ["q16"])
    proto = build(nodes, [("x", [4])], [("y", [4])], [("s8", np.array(0.1, np.float32)), ("z8", np.array(0, np.int8)),
                                                       ("s16", np.array(0.1, np.float32)), ("z16", np.array(0, np.int8))])
    assert fold_weight_quantizers(ir.from_proto(proto), {"s8": ("ln", enc(0.1, -128, 8, True))}) == {"x": "ln"}


def test_a_second_grid_without_dequantize_is_keyed_by_its_quantize_output():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q1"]),
             helper.make_node("QuantizeLinear", ["x", "t", "z"], ["q2"])]
    proto = build(nodes, [("x", [4])], [], [("s", np.array(0.1, np.float32)), ("t", np.array(0.2, np.float32)),
                                            ("z", np.array(0, np.int8))])
    sites = fold_weight_quantizers(ir.from_proto(proto), {"s": ("a", enc(0.1, -128, 8, True)),
                                                          "t": ("b", enc(0.2, -128, 8, True))})
    assert sites == {"x": "a", "q2": "b"}


# ---- fold_zero_pads -----------------------------------------------------------------------------
def pad_conv(pads, *, value=None, mode=None, axes=None, conv_attrs=None, users=("Conv",), out_is_pad=False,
             pad_input_is_init=True, opset=21):
    """x -> Pad -> Conv(s); returns the model and a feed."""
    pad_inputs = ["x", "p", "v" if value is not None else "", "a" if axes is not None else ""]
    while pad_inputs[-1] == "":
        pad_inputs.pop()
    nodes = [helper.make_node("Pad", pad_inputs, ["xp"], **({"mode": mode} if mode else {}))]
    init = [("w", np.random.default_rng(0).normal(size=(2, 2, 3, 3)).astype(np.float32))]
    if pad_input_is_init:
        init.append(("p", np.asarray(pads, np.int64)))
    else:
        nodes.insert(0, helper.make_node("Shape", ["x"], ["p0"]))
        nodes.insert(1, helper.make_node("Concat", ["p0", "p0"], ["p"], axis=0))
    if value is not None:
        init.append(("v", np.array(value, np.float32)))
    if axes is not None:
        init.append(("a", np.asarray(axes, np.int64)))
    outputs = []
    for i, kind in enumerate(users):
        out = f"y{i}"
        if kind == "Conv":
            nodes.append(helper.make_node("Conv", ["xp", "w"], [out], **(conv_attrs or {})))
        elif kind == "ConvWeight":  # the pad feeds a conv's weight input
            nodes.append(helper.make_node("Conv", ["w", "xp"], [out]))
        else:
            nodes.append(helper.make_node(kind, ["xp"], [out]))
        outputs.append((out, None))
    if out_is_pad:
        outputs.append(("xp", None))
    return build(nodes, [("x", [1, 2, 6, 6])], outputs, init, opset=opset), \
        np.random.default_rng(3).normal(size=(1, 2, 6, 6)).astype(np.float32)


def then_a_foldable_pad(model):
    """Append a zero Pad of ``x`` read by a Conv with weight ``w`` (which the pass folds), so that a
    test sees the pass go on after a pad it leaves."""
    model.graph.node.extend([helper.make_node("Pad", ["x", "p_ok"], ["xp_ok"]),
                             helper.make_node("Conv", ["xp_ok", "w"], ["y_ok"])])
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "p_ok"))
    model.graph.output.append(helper.make_tensor_value_info("y_ok", FLOAT, None))


@pytest.mark.parametrize("pads, axes, conv_attrs, expected", [
    ([0, 0, 1, 2, 0, 0, 3, 0], None, None, [1, 2, 3, 0]),
    ([0, 0, 2, 1, 0, 0, 0, 3], "value", None, [2, 1, 0, 3]),                 # an explicit zero value
    ([0, 0, 1, 1, 0, 0, 1, 1], None, {"pads": [1, 0, 0, 2]}, [2, 1, 1, 3]),   # added to the conv's own
    ([0, 0, 1, 1, 0, 0, 0, 0], None, {"auto_pad": "VALID"}, [1, 1, 0, 0]),
    ([2, 1, 0, 3], [2, 3], None, [2, 1, 0, 3]),                            # axes: H, W
    ([1, 2, 0, 0], [-1, 2], None, [2, 1, 0, 0]),                           # negative axes, any order
])
def test_zero_pads_go_into_the_conv(pads, axes, conv_attrs, expected):
    if axes == "value":
        axes, value = None, 0.0
    else:
        value = 0.0 if axes else None
    model, x = pad_conv(pads, axes=axes, conv_attrs=conv_attrs, value=value)
    before = run(model, x=x)
    assert fold_zero_pads(model) == 1
    assert ops(model) == ["Conv"]
    conv = model.graph.node[0]
    assert conv.input[0] == "x"
    attrs = {a.name: a for a in conv.attribute}
    assert list(attrs["pads"].ints) == expected and "auto_pad" not in attrs
    np.testing.assert_allclose(run(model, x=x)[0], before[0], rtol=0, atol=1e-5)


def test_a_zero_pad_shared_by_convs_goes_into_each():
    model, x = pad_conv([0, 0, 1, 0, 0, 0, 0, 1], users=("Conv", "Conv"), conv_attrs={"pads": [0, 1, 0, 1]})
    before = run(model, x=x)
    assert fold_zero_pads(model) == 1 and ops(model) == ["Conv", "Conv"]
    assert [list(n.attribute[0].ints) for n in model.graph.node] == [[1, 1, 0, 2], [1, 1, 0, 2]]
    for a, b in zip(run(model, x=x), before):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", [
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.5),                           # not a zero pad
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"),
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="edge"),
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], users=("Conv", "Relu")),              # another consumer
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], users=("ConvWeight",)),               # read as a weight
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], users=()),                            # no consumer
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], out_is_pad=True),                     # the pad is a graph output
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], pad_input_is_init=False),             # pads not constant
    dict(pads=[0, 0, -1, 1, 0, 0, 1, 1]),                                     # a crop
    dict(pads=[0, 1, 1, 1, 0, 0, 1, 1]),                                      # channels
    dict(pads=[1, 0, 1, 1, 0, 0, 1, 1]),                                      # batch
    dict(pads=[0, 0, 1, 1, 0, 1, 1, 1]),                                      # channels, at the end
    dict(pads=[0, 0, 1, 1, 1, 0, 1, 1]),                                      # batch, at the end
    dict(pads=[1, 1], axes=[1]),                                              # channels via axes
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], conv_attrs={"auto_pad": "SAME_UPPER"}),
])
def test_pads_that_are_not_a_convs_zero_padding_stay(case):
    users = case.pop("users", ("Conv",))
    if "axes" in case:
        case["value"] = 0.0
    model, x = pad_conv(users=users, **case)
    before = [n.op_type for n in model.graph.node]
    # then a foldable pad + conv: a skipped pad must not end the pass
    then_a_foldable_pad(model)
    assert fold_zero_pads(model) == 1
    assert ops(model) == before + ["Conv"]
    assert model.graph.node[-1].input[0] == "x"


def test_a_zero_pad_goes_into_a_1d_conv():
    nodes = [helper.make_node("Pad", ["x", "p"], ["xp"]), helper.make_node("Conv", ["xp", "w"], ["y"])]
    model = build(nodes, [("x", [1, 2, 6])], [("y", None)], [("p", np.array([0, 0, 2, 0, 0, 1], np.int64)),
                                                             ("w", np.ones((1, 2, 3), np.float32))])
    x = np.arange(12, dtype=np.float32).reshape(1, 2, 6)
    before = run(model, x=x)[0]
    assert fold_zero_pads(model) == 1 and ops(model) == ["Conv"]
    assert list(model.graph.node[0].attribute[0].ints) == [2, 1]
    np.testing.assert_array_equal(run(model, x=x)[0], before)


def test_pads_of_a_rank_two_tensor_stay():
    nodes = [helper.make_node("Pad", ["x", "p"], ["xp"]), helper.make_node("Conv", ["xp", "w"], ["y"])]
    model = build(nodes, [("x", [2, 3])], [("y", None)], [("p", np.array([0, 1, 0, 1], np.int64)),
                                                          ("w", np.ones((1, 1, 1), np.float32))])
    assert fold_zero_pads(model) == 0


def test_a_pad_whose_axes_are_not_constant_stays():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "zero", "one"], ["a"]),   # a computed axes input: not a constant
             helper.make_node("Pad", ["x", "p", "", "a"], ["xp"]), helper.make_node("Conv", ["xp", "w"], ["y"])]
    model = build(nodes, [("x", [1, 2, 6, 6])], [("y", None)], [
        ("p", np.array([1, 1], np.int64)), ("w", np.ones((2, 2, 3, 3), np.float32)),
        ("zero", np.array([0], np.int64)), ("one", np.array([1], np.int64))])
    then_a_foldable_pad(model)
    assert fold_zero_pads(model) == 1 and ops(model).count("Pad") == 1  # the computed-axes pad stays


def test_fold_zero_pads_on_onnx_ir_counts_every_pad():
    a, x = pad_conv([0, 0, 1, 1, 0, 0, 1, 1])
    model = ir.from_proto(a)
    # a second, independent pad + conv on the same input
    pad2 = ir.node("Pad", [model.graph.inputs[0], model.graph.initializers["p"]], num_outputs=1, name="pad2")
    conv2 = ir.node("Conv", [pad2.outputs[0], model.graph.initializers["w"]], num_outputs=1, name="conv2")
    model.graph.extend([pad2, conv2])
    conv2.outputs[0].name = "y_extra"
    model.graph.outputs.append(conv2.outputs[0])
    assert fold_zero_pads(model) == 2 and ops(model) == ["Conv", "Conv"]


# ---- int32_biases -------------------------------------------------------------------------------
S_IN = np.float32(0.02)


def biased(op="Conv", *, bias=None, s_w=None, names=("layer.bias",), transpose=False, bias_slot=1,
           mm_users=1, mm_is_output=False, input_dq=True, s_in=S_IN, add_op="Add", then_good=False):
    """DQ(x) and DQ(w) feeding a Conv/Gemm with a bias, or a MatMul + Add."""
    rng = np.random.default_rng(4)
    bias = np.array([0.5, -1.25, 3.0], np.float32) if bias is None else bias
    s_w = np.array([0.01, 0.02, 0.005], np.float32) if s_w is None else s_w
    n_out = bias.shape[-1]
    if op in ("Conv", "ConvTranspose"):
        w_shape, x_shape = ((n_out, 2, 3, 3) if op == "Conv" else (2, n_out, 3, 3)), [1, 2, 5, 5]
    elif op == "Gemm":
        w_shape, x_shape = (n_out, 4), [2, 4]
    else:
        w_shape, x_shape = ((n_out, 4) if transpose else (4, n_out)), [2, 3, 4]
    w = rng.integers(-127, 128, size=w_shape).astype(np.int8)
    init = [("s_in", np.asarray(s_in, np.float32)), ("z_in", np.zeros(np.shape(s_in), np.uint8)),
            ("w_q", w), ("s_w", s_w), ("layer.bias", bias)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["xd"])] if input_dq else \
        [helper.make_node("Relu", ["x"], ["xd"])]
    w_axis = 1 if op == "ConvTranspose" or (op == "MatMul" and not transpose) else 0
    nodes.append(helper.make_node("DequantizeLinear", ["w_q", "s_w"], ["wd"], axis=w_axis if s_w.ndim else 1))
    outputs = [("y", None)]
    if op in ("Conv", "Gemm", "ConvTranspose"):
        nodes.append(helper.make_node(op, ["xd", "wd", "layer.bias"], ["y"], name="the_layer",
                                      **({"transB": 1} if op == "Gemm" else {})))
    else:
        if transpose:
            nodes.append(helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["xd", "wt" if transpose else "wd"], ["mm"], name="mm"))
        add_in = ["mm", "layer.bias"] if bias_slot == 1 else ["layer.bias", "mm"]
        nodes.append(helper.make_node(add_op, add_in, ["y"], name="the_layer"))
        if mm_users > 1:
            nodes.append(helper.make_node("Relu", ["mm"], ["other"]))
            outputs.append(("other", None))
        if mm_is_output:
            outputs.append(("mm", None))
    inputs = [("x", x_shape)]
    if then_good:  # a second layer, on the int32 grid, after the first
        nodes += [helper.make_node("QuantizeLinear", ["x2", "s_in2", "z_in2"], ["x2q"]),
                  helper.make_node("DequantizeLinear", ["x2q", "s_in2", "z_in2"], ["x2d"]),
                  helper.make_node("DequantizeLinear", ["w2_q", "s_w2"], ["w2d"], axis=0),
                  helper.make_node("Gemm", ["x2d", "w2d", "ok.bias"], ["y2"], name="good", transB=1)]
        init += [("s_in2", np.array(0.5, np.float32)), ("z_in2", np.array(0, np.uint8)),
                 ("w2_q", np.ones((2, 4), np.int8)), ("s_w2", np.array([0.25, 0.125], np.float32)),
                 ("ok.bias", np.array([1.0, -1.0], np.float32))]
        inputs.append(("x2", [2, 4]))
        outputs.append(("y2", None))
        names = tuple(names) + ("ok.bias",)
    model = ir.from_proto(build(nodes, inputs, outputs, init))
    return model, np.random.default_rng(5).uniform(0, 3, size=x_shape).astype(np.float32), frozenset(names)


def bias_dq(model):
    return next((n for n in model.graph if n.op_type == "DequantizeLinear" and n.name == "the_layer_bias_dq"), None)


@pytest.mark.parametrize("op, kwargs", [
    ("Conv", {}), ("Gemm", {}), ("ConvTranspose", {}),
    ("MatMul", {}), ("MatMul", {"transpose": True}), ("MatMul", {"bias_slot": 0}),
    ("Conv", {"s_w": np.array(0.01, np.float32)}),                         # per-tensor weights
])
def test_biases_on_the_int32_grid_are_written_as_int32(op, kwargs):
    model, x, names = biased(op, **kwargs)
    before = run(model, x=x)[0]
    int32_biases(model, names)
    dq = bias_dq(model)
    assert dq is not None and ir.convenience.get_const_tensor(dq.inputs[0]).dtype == ir.DataType.INT32
    assert len(dq.inputs) == 2 and dq.attributes["axis"].value == 0 and dq.inputs[0].name == "layer.bias_quantized"
    assert dq.outputs[0].name == "layer.bias_dequantized_the_layer"
    layer = next(n for n in model.graph if n.name == "the_layer")
    assert dq.outputs[0] in layer.inputs
    assert list(model.graph).index(dq) < list(model.graph).index(layer)
    bias = np.array([0.5, -1.25, 3.0], np.float32)
    s_w = kwargs.get("s_w", np.array([0.01, 0.02, 0.005], np.float32))
    _, expected_scale = int32_bias_grid(torch.from_numpy(bias), torch.tensor(S_IN), torch.from_numpy(s_w))
    scale = dq.inputs[1].const_value.numpy()
    assert scale.dtype == np.float32 and scale.shape == (3,)
    np.testing.assert_array_equal(scale, expected_scale.numpy() * np.ones(3, np.float32))
    np.testing.assert_array_equal(dq.inputs[0].const_value.numpy(), np.rint(bias / scale).astype(np.int32))
    after = run(model, x=x)[0]
    np.testing.assert_allclose(after, before, rtol=0, atol=float(scale.max()))  # the bias moved by < 1/2 step


def test_an_overflowing_bias_lands_on_the_raised_grid():
    """|bias| / (s_in x s_w) = 1e24 would pass int32: the grid's raised scale (int32_bias_grid, the
    simulation's own) puts the largest bias at 2**30 exactly."""
    model, _, names = biased(bias=np.array([1e9, -1e9, 0.0], np.float32), s_w=np.array(1e-3, np.float32),
                             s_in=np.float32(1e-12))
    int32_biases(model, names)
    q = bias_dq(model).inputs[0].const_value.numpy()
    assert q.dtype == np.int32 and q.tolist() == [2**30, -(2**30), 0]


@pytest.mark.parametrize("op, kwargs", [
    ("Conv", {"names": ()}),                                                # not on the grid in the sim
    ("Conv", {"input_dq": False}),                                          # the input is not a DQ
    ("Conv", {"s_in": np.array([0.02, 0.03], np.float32)}),                 # a per-channel input scale
    ("Conv", {"s_w": np.array([0.01, 0.02], np.float32)}),                  # weight channels != bias
    ("Conv", {"bias": np.ones((1, 3), np.float32)}),                        # not a vector
    ("MatMul", {"mm_users": 2}),
    ("MatMul", {"mm_is_output": True}),
    ("MatMul", {"add_op": "Mul"}),                                         # a scale, not a bias
    ("MatMul", {"add_op": "Sub"}),
])
def test_biases_off_the_int32_grid_stay_float(op, kwargs):
    model, _, names = biased(op, then_good=True, **kwargs)
    int32_biases(model, names)
    assert bias_dq(model) is None
    assert "layer.bias" in [v.name for n in model.graph for v in n.inputs if v is not None]
    good = next(n for n in model.graph if n.name == "good")  # the layer after it still converts
    assert good.inputs[2].producer().op_type == "DequantizeLinear"
    np.testing.assert_array_equal(good.inputs[2].producer().inputs[0].const_value.numpy(), [8, -16])


def test_an_add_of_two_initializers_or_a_non_matmul_is_not_a_bias():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "layer.bias"], ["y"], name="the_layer")]
    model = ir.from_proto(build(nodes, [("x", [2, 3])], [("y", None)], [("layer.bias", np.ones(3, np.float32))]))
    int32_biases(model, frozenset({"layer.bias"}))
    assert bias_dq(model) is None and ops(model) == ["Relu", "Add"]


def test_a_gemm_without_bias_or_with_a_computed_bias_is_left_alone():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="the_layer"),
             helper.make_node("Relu", ["x2"], ["b"]), helper.make_node("Gemm", ["x", "w", "b"], ["y2"], name="g2")]
    model = ir.from_proto(build(nodes, [("x", [2, 3]), ("x2", [3])], [("y", None), ("y2", None)],
                                [("w", np.ones((3, 3), np.float32))]))
    int32_biases(model, frozenset({"b", "w"}))
    assert ops(model) == ["Gemm", "Relu", "Gemm"]


# ---- global_average_pools -----------------------------------------------------------------------
def mean_graph(*, op="ReduceMean", axes=(2, 3), keepdims=1, opset=18, shape=(1, 2, 4, 4), y_scale=0.1,
               x_scale=0.1, consumer="QuantizeLinear", axes_as_input=True, producer="DequantizeLinear",
               then_good=False):
    attrs = {}
    inputs = ["xd" if producer == "DequantizeLinear" else ("xr" if producer == "Relu" else "x")]
    init = [("s", np.array(x_scale, np.float32)), ("z", np.array(0, np.int8)), ("sy", np.array(y_scale, np.float32))]
    if op == "ReduceMean":
        if keepdims is not None:
            attrs["keepdims"] = keepdims
        if axes is not None:
            if axes_as_input:
                inputs.append("axes")
                init.append(("axes", np.array(axes, np.int64)))
            else:
                attrs["axes"] = list(axes)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Relu", ["x"], ["xr"]),
             helper.make_node(op, inputs, ["m"], name="mean", **attrs)]
    if consumer == "QuantizeLinear":
        nodes += [helper.make_node("QuantizeLinear", ["m", "sy", "z"], ["mq"]),
                  helper.make_node("DequantizeLinear", ["mq", "sy", "z"], ["y"])]
    else:
        nodes.append(helper.make_node(consumer, ["m"], ["y"]))
    inputs, outputs, value_info = [("x", list(shape))], [("y", None)], [("xd", list(shape)), ("xr", list(shape))]
    if then_good:  # a second mean, which converts, after the first
        nodes += [helper.make_node("QuantizeLinear", ["x2", "s", "z"], ["x2q"]),
                  helper.make_node("DequantizeLinear", ["x2q", "s", "z"], ["x2d"]),
                  helper.make_node("ReduceMean", ["x2d", "axes2"], ["m2"], name="good"),
                  helper.make_node("QuantizeLinear", ["m2", "s", "z"], ["m2q"])]
        init.append(("axes2", np.array([2, 3], np.int64)))
        inputs.append(("x2", [1, 2, 4, 4]))
        value_info.append(("x2d", [1, 2, 4, 4]))
        outputs.append(("m2", None))
    model = build(nodes, inputs, outputs, init, opset=opset, value_info=value_info)
    return ir.from_proto(model), np.random.default_rng(6).normal(size=[d if isinstance(d, int) else 3 for d in shape]).astype(np.float32)


def mean_node(model, name="mean"):
    return next(n for n in model.graph if n.name == name)


@pytest.mark.parametrize("kwargs", [
    {}, {"axes": (3, 2)}, {"axes": (-2, -1)}, {"opset": 13, "axes_as_input": False},
    {"shape": (1, 2, 4, 4, 2), "axes": (2, 3, 4)}, {"shape": (1, 2, 4), "axes": (2,)},
    {"consumer": "Relu"},                                          # no Q after it: nothing to check
    {"keepdims": None},                                            # keepdims defaults to 1
    {"producer": "Relu", "y_scale": 1e-9},                         # no DQ before it: nothing to check
    {"producer": "input", "y_scale": 1e-9},                        # a graph input
    {"x_scale": 1.0, "y_scale": 2.0**28},                          # m = x / (y x 16) = 2**-32: the lowest ORT takes
    {"x_scale": 1.0, "y_scale": 2.0**-12 * 1.0001},                # m just under 256
])
def test_a_spatial_mean_becomes_global_average_pool(kwargs):
    model, x = mean_graph(**kwargs)
    before = run(model, x=x)[0]
    global_average_pools(model)
    node = mean_node(model)
    assert node.op_type == "GlobalAveragePool" and len(node.inputs) == 1 and not node.attributes
    np.testing.assert_allclose(run(model, x=x)[0], before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs", [
    {"keepdims": 0}, {"axes": (1, 2, 3)}, {"axes": (2,)}, {"axes": None}, {"shape": (2, 4), "axes": (1,)},
])
def test_other_means_stay(kwargs):
    model, _ = mean_graph(then_good=True, **kwargs)
    global_average_pools(model)
    assert mean_node(model).op_type == "ReduceMean"
    assert mean_node(model, "good").op_type == "GlobalAveragePool"  # a mean that stays does not end the pass


def test_a_mean_over_computed_axes_stays():
    model, _ = mean_graph()
    node = mean_node(model)
    axes = ir.Value(name="runtime_axes", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.INT64))
    model.graph.inputs.append(axes)
    node.replace_input_with(1, axes)
    global_average_pools(model)
    assert node.op_type == "ReduceMean"


def test_a_mul_by_a_constant_is_not_a_mean():
    nodes = [helper.make_node("Mul", ["x", "c"], ["y"], name="mul")]
    model = ir.from_proto(build(nodes, [("x", [1, 2, 4])], [("y", None)], [("c", np.array([2.0], np.float32))]))
    global_average_pools(model)
    assert ops(model) == ["Mul"]


def test_a_mean_over_dynamic_spatial_dims_is_pooled_when_the_size_is_unknown():
    """(ORT checks the scales at run time; an unknown image size cannot be checked here)"""
    model, _ = mean_graph(shape=(1, 2, "h", 4), y_scale=1e-9)
    global_average_pools(model)
    assert mean_node(model).op_type == "GlobalAveragePool"


@pytest.mark.parametrize("x_scale, y_scale", [
    (1.0, 1e-4),          # m = 625
    (1.0, 2.0**-12),      # m = 256 exactly
    (1.0, 2.0**29),       # m = 2**-33
])
def test_a_mean_whose_scales_ort_refuses_stays_reduce_mean(x_scale, y_scale):
    model, x = mean_graph(y_scale=y_scale, x_scale=x_scale, then_good=True)
    global_average_pools(model)
    assert mean_node(model).op_type == "ReduceMean"
    assert mean_node(model, "good").op_type == "GlobalAveragePool"


@pytest.mark.parametrize("opset, shape", [(13, (1, 2, 4, 4)), (18, (1, 2, 4, 4)), (18, (1, 2, 16))])
def test_an_exporters_global_average_pool_with_refused_scales_becomes_reduce_mean(opset, shape):
    model, x = mean_graph(op="GlobalAveragePool", y_scale=1e-5, x_scale=1.0, opset=opset, shape=shape)
    before = run(model, x=x)[0]
    global_average_pools(model)
    node = mean_node(model)
    spatial = list(range(2, len(shape)))
    assert node.op_type == "ReduceMean" and node.attributes["keepdims"].value == 1
    if opset >= 18:
        assert len(node.inputs) == 2 and node.inputs[1].const_value.numpy().tolist() == spatial
        assert node.inputs[1].const_value.dtype == ir.DataType.INT64 and "axes" not in node.attributes
    else:
        assert len(node.inputs) == 1 and list(node.attributes["axes"].value) == spatial
    np.testing.assert_array_equal(run(model, x=x)[0], before)


def test_an_exporters_global_average_pool_with_good_scales_stays():
    model, _ = mean_graph(op="GlobalAveragePool", then_good=True)
    global_average_pools(model)
    assert mean_node(model).op_type == "GlobalAveragePool"
    assert len(mean_node(model).inputs) == 1
    assert mean_node(model, "good").op_type == "GlobalAveragePool"  # the pass went on after it


def test_a_huge_image_is_not_pooled_in_integers():
    model, _ = mean_graph(shape=(1, 1, 4096, 4096))
    global_average_pools(model)
    assert mean_node(model).op_type == "ReduceMean"
    model, _ = mean_graph(shape=(1, 1, 4096, 4095), y_scale=0.1 / 2**20)
    global_average_pools(model)
    assert mean_node(model).op_type == "GlobalAveragePool"


def test_a_per_channel_input_scale_counts_as_fine():
    model, _ = mean_graph(y_scale=1e-9)
    model.graph.initializers["s"].const_value = ir.tensor(np.full(2, 0.1, np.float32), name="s")
    global_average_pools(model)
    assert mean_node(model).op_type == "GlobalAveragePool"


def test_a_computed_input_scale_counts_as_fine():
    model, _ = mean_graph(y_scale=1e-9)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    scale_in = ir.Value(name="s_runtime", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    model.graph.inputs.append(scale_in)
    dq.replace_input_with(1, scale_in)
    global_average_pools(model)
    assert mean_node(model).op_type == "GlobalAveragePool"


def test_per_channel_or_non_constant_scales_count_as_fine():
    model, _ = mean_graph(consumer="QuantizeLinear", y_scale=1e-9)
    mean_node(model)  # a non-scalar y scale: unknown to the check
    model.graph.initializers["sy"].const_value = ir.tensor(np.full(2, 1e-9, np.float32), name="sy")
    global_average_pools(model)
    assert mean_node(model).op_type == "GlobalAveragePool"


# ---- finish -------------------------------------------------------------------------------------
def test_finish_drops_dead_nodes_and_debug_metadata():
    nodes = [helper.make_node("Relu", ["x"], ["y"], doc_string="stack trace"),
             helper.make_node("Neg", ["x"], ["dead"])]
    proto = build(nodes, [("x", [2])], [("y", [2])], [("unused", np.ones(3, np.float32))])
    proto.graph.node[0].metadata_props.add(key="pkg.torch.onnx.stack_trace", value="...")
    out = finish(ir.from_proto(proto))
    assert isinstance(out, onnx.ModelProto)
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    assert not out.graph.node[0].doc_string and not out.graph.node[0].metadata_props
    assert not out.graph.initializer
