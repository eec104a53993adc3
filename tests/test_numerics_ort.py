"""The simulation's numbers are ONNX Runtime's numbers, bit for bit.

Every quantize path of ``QuantizeDequantize`` (fixed grid and learned/LSQ; asymmetric and
symmetric; per-tensor and per-channel; 4, 8 and 16 bits) is compared with a one-node ONNX
``QuantizeLinear -> DequantizeLinear`` model run in ONNX Runtime, on inputs exactly on ties
(``k + 0.5`` steps), one float32 ulp either side of them, on the grid's ends, just outside and
far outside, and on random values. Equality is exact (``np.array_equal`` on float32): no
tolerance. The same holds for the int32 bias grid and the (BN-folded) integer weights that the
export writes.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qat_plugin import QuantizeDequantize, QuantSimModel
from qat_plugin.encoding import Encoding, num_steps
from helpers import calibrate, randomize_bn, once_per_module

pytestmark = pytest.mark.filterwarnings("ignore:.*left in float.*")

_ZP_TYPE = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4, (8, True): TensorProto.INT8,
            (8, False): TensorProto.UINT8, (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_qdq(x: np.ndarray, enc: Encoding) -> np.ndarray:
    """``DequantizeLinear(QuantizeLinear(x))`` in ONNX Runtime with ``enc``'s float32 scale and
    ONNX zero point (opset 21 for 4/16 bits, 20 for 8 bits, as the export)."""
    signed = enc.onnx_signed()
    scale = enc.scale.float().numpy()
    zp = enc.onnx_zero_point().numpy()
    axis = enc.axis if enc.axis is not None else 1
    inits = [numpy_helper.from_array(scale, "scale"),
             helper.make_tensor("zp", _ZP_TYPE[(enc.bitwidth, signed)], list(zp.shape), zp.reshape(-1).tolist())]
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], axis=axis),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], axis=axis)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits)
    opset = 20 if enc.bitwidth == 8 else 21
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return _session(model).run(None, {"x": x})[0]


def ort_dequantize(q: np.ndarray, scale: np.ndarray, axis: int = 0) -> np.ndarray:
    """ONNX Runtime ``DequantizeLinear`` of an integer initializer (zero point omitted: 0)."""
    nodes = [helper.make_node("DequantizeLinear", ["q", "scale"], ["y"], axis=axis)]
    graph = helper.make_graph(nodes, "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(q.shape))],
                              [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return _session(model).run(None, {})[0]


def _levels(bitwidth: int) -> np.ndarray:
    """Integer positions (in steps, before the offset) to test: all of them up to 8 bits."""
    n = num_steps(bitwidth)
    if bitwidth <= 8:
        return np.arange(n + 1, dtype=np.float64)
    rng = np.random.default_rng(bitwidth)
    return np.unique(np.concatenate([np.arange(0, 300), np.arange(n - 300, n + 1), rng.integers(0, n + 1, 600)]))


def probe_values(scale: float, offset: float, bitwidth: int, seed: int) -> np.ndarray:
    """float32 inputs for one grid: ties, their float32 neighbours, grid ends, outside, random."""
    n = num_steps(bitwidth)
    k = _levels(bitwidth) + offset  # signed levels
    ties = (k[:-1] + 0.5) * scale
    lo, hi = offset * scale, (offset + n) * scale
    ends = np.array([lo, hi, lo - 0.5 * scale, hi + 0.5 * scale, lo - 0.49 * scale, hi + 0.49 * scale,
                     lo - 0.51 * scale, hi + 0.51 * scale, lo - scale, hi + scale, -1e6 * scale, 1e6 * scale,
                     0.0, -0.0])  # not 1e30: ONNX Runtime 1.31's int4 per-channel QuantizeLinear wraps it to -8
    rng = np.random.default_rng(seed)
    rand = rng.uniform(lo - 3 * scale, hi + 3 * scale, 2000)
    x = np.concatenate([ties, k * scale, ends, rand]).astype(np.float32)
    return np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))])


# channel grids: power-of-two scales put x / scale exactly on the ties; the others are arbitrary
_SCALES = [2.0**-5, 2.0**-9, 0.0123456789, 1.7]


def _offsets(bitwidth: int, symmetric: bool) -> list[float]:
    n = num_steps(bitwidth)
    if symmetric:
        return [-(2.0 ** (bitwidth - 1))] * len(_SCALES)
    return [0.0, -float(n), -float(n // 3), -1.0]


def make_quantizer(bitwidth, symmetric, per_channel, learned, channel):
    """A calibrated quantizer: per-channel over all of ``_SCALES`` (axis 1), or one of them."""
    offsets = _offsets(bitwidth, symmetric)
    if per_channel:
        scale, offset, axis, shape = torch.tensor(_SCALES, dtype=torch.float64), torch.tensor(offsets, dtype=torch.float64), 1, (len(_SCALES),)
    else:
        scale, offset = torch.tensor(_SCALES[channel], dtype=torch.float64), torch.tensor(offsets[channel], dtype=torch.float64)
        axis, shape = None, ()
    q = QuantizeDequantize(shape, bitwidth, symmetric, axis, learnable=learned, name="q")
    q.set_encoding(Encoding(scale, offset, bitwidth, symmetric, axis))
    return q


def inputs_for(q: QuantizeDequantize, seed: int) -> np.ndarray:
    """Per-tensor: a 1-D probe. Per-channel: (N, C) with each column probing its own channel."""
    enc = q.encoding
    if enc.axis is None:
        return probe_values(float(enc.scale.float()), float(enc.offset), q.bitwidth, seed)[None, :]
    cols = [probe_values(float(s), float(o), q.bitwidth, seed + c)
            for c, (s, o) in enumerate(zip(enc.scale.float().tolist(), enc.offset.tolist()))]
    n = min(len(c) for c in cols)
    return np.stack([c[:n] for c in cols], axis=1)


@pytest.mark.parametrize("bitwidth", [4, 8, 16])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned"])
def test_quantizer_is_bit_exact_with_onnx_runtime(bitwidth, symmetric, per_channel, learned):
    channels = [0] if per_channel else range(len(_SCALES))
    for channel in channels:
        q = make_quantizer(bitwidth, symmetric, per_channel, learned, channel)
        x = inputs_for(q, seed=bitwidth + channel)
        expected = ort_qdq(x, q.encoding)
        got = q(torch.from_numpy(x))
        if learned:  # the learned path's output keeps its graph: same values, with gradients
            assert got.requires_grad
        got = got.detach().numpy()
        assert got.dtype == np.float32
        bad = np.flatnonzero(got.reshape(-1) != expected.reshape(-1))
        assert bad.size == 0, (f"{bad.size} of {x.size} values differ from ONNX Runtime, e.g. "
                               f"x={x.reshape(-1)[bad[:3]]} sim={got.reshape(-1)[bad[:3]]} ort={expected.reshape(-1)[bad[:3]]}")


@pytest.mark.parametrize("bitwidth", [8, 16])
def test_frozen_learned_quantizer_is_bit_exact_with_onnx_runtime(bitwidth):
    """A learned range that drifted (negative scale, fractional offset) and was then frozen."""
    q = make_quantizer(bitwidth, False, True, True, 0)
    with torch.no_grad():
        q.scale.mul_(torch.tensor([1.0, -1.0, 1.0, -1.0]))
        q.offset.add_(torch.tensor([0.3, -0.4, 0.0, 0.2]))
    before = q.encoding
    q.freeze()
    assert torch.equal(q.encoding.scale, before.scale) and torch.equal(q.encoding.offset, before.offset)
    x = inputs_for(q, seed=3)
    assert np.array_equal(q(torch.from_numpy(x)).numpy(), ort_qdq(x, q.encoding))


def test_ties_round_half_to_even():
    """Hand-checkable: at scale 1 the ties 0.5, 1.5, 2.5, -0.5, -1.5 go to 0, 2, 2, -0, -2."""
    enc = Encoding(torch.tensor(1.0, dtype=torch.float64), torch.tensor(-128.0, dtype=torch.float64), 8, True)
    q = QuantizeDequantize((), 8, True)
    q.set_encoding(enc)
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, -128.5]], dtype=np.float32)
    assert q(torch.from_numpy(x)).tolist() == [[0.0, 2.0, 2.0, 0.0, -2.0, 126.0, 127.0, -128.0]]
    assert np.array_equal(ort_qdq(x, enc), q(torch.from_numpy(x)).numpy())


# ---- what the export writes: BN-folded integer weights and the int32 bias grid ----------------

class ConvBnLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _exported_integers(res):
    """{weight name: (int initializer, its DQ scale initializer, axis)} and the same for biases."""
    model = onnx.load(res.onnx_path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            out[n.input[0]] = (inits[n.input[0]], inits[n.input[1]], axis)
    return out


@pytest.fixture(scope=once_per_module, params=["static", pytest.param("simulated", marks=pytest.mark.slow)])
def exported_conv_bn(request, tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(ConvBnLinear()).eval()
    x = torch.randn(32, 3, 4, 4)
    sim = QuantSimModel(model, x[:2], bn_folding=request.param)
    calibrate(sim, x)
    sim.model.eval()
    res = sim.export(str(tmp_path_factory.mktemp(request.param)), "m", x[:1])
    return sim, _exported_integers(res)


def test_exported_bn_folded_weights_are_the_simulations_integers(exported_conv_bn):
    sim, ints = exported_conv_bn
    for layer_name in ("conv", "fc"):
        layer = sim.model.get_submodule(layer_name)
        q, scale, axis = ints[f"{layer_name}.weight_quantized"]
        assert q.dtype == np.int8 and axis == 0
        wq = layer.param_quantizers["weight"]
        with torch.no_grad():
            sim_w = layer.quantized_weight()
            shape = [-1] + [1] * (sim_w.dim() - 1)
            sim_int = torch.round(layer.folded_weight() / wq.scale.reshape(shape)) + wq.encoding.onnx_zero_point().reshape(shape)
        assert np.array_equal(scale, wq.scale.detach().numpy())
        assert np.array_equal(q.astype(np.float32), sim_int.clamp(-128, 127).numpy()), layer_name
        assert np.array_equal(ort_dequantize(q, scale, axis), sim_w.numpy()), layer_name


def test_exported_int32_biases_are_the_simulations_bias_grid(exported_conv_bn):
    sim, ints = exported_conv_bn
    for layer_name in ("conv", "fc"):
        layer = sim.model.get_submodule(layer_name)
        q, scale, _ = next(v for k, v in ints.items() if k.startswith(f"{layer_name}.") and k.endswith("bias_quantized"))
        assert q.dtype == np.int32
        with torch.no_grad():
            sim_bias = layer.quantized_bias()
        assert not torch.equal(sim_bias, layer.folded_bias())  # the bias really is on a grid
        assert np.array_equal(ort_dequantize(q, scale), sim_bias.numpy()), layer_name


def test_exported_weights_and_biases_on_ties_round_half_to_even(tmp_path):
    """Weights and biases placed on ties of power-of-two grids: the export rounds as ONNX does
    (half to even), and ONNX Runtime's dequantized weights and int32 biases are the simulation's."""
    conv = nn.Conv2d(16, 2, 1)
    ties = torch.arange(-8, 7, dtype=torch.float32) + 0.5  # -7.5 ... 6.5, even and odd k
    with torch.no_grad():  # channel scale 2^-6 exactly (absmax 127 * 2^-6); the other weights are ties
        w = torch.stack([torch.cat([torch.tensor([127.0]), ties]), torch.cat([torch.tensor([-127.0]), -ties])])
        conv.weight.copy_((w * 2.0**-6).reshape(conv.weight.shape))
    x = torch.randn(8, 16, 3, 3)
    sim = calibrate(QuantSimModel(nn.Sequential(conv).eval(), x[:2], quant_scheme="tf"), x)
    layer = sim.model.get_submodule("0")
    assert torch.equal(sim.quantizers()["0.weight"].encoding.scale, torch.full((2,), 2.0**-6, dtype=torch.float64))
    act = Encoding(torch.tensor(2.0**-5, dtype=torch.float64), torch.tensor(-128.0, dtype=torch.float64), 8, False)
    for key, q in sim.quantizers().items():
        if key != "0.weight":
            q.set_encoding(act)
    with torch.no_grad():  # bias grid: 2^-5 * 2^-6; biases on its ties (k = 2 is even, k = 3 odd)
        layer.bias.copy_(torch.tensor([2.5, -3.5]) * 2.0**-11)
    res = sim.export(str(tmp_path), "m", x[:1])
    ints = _exported_integers(res)
    q, scale, axis = ints["0.weight_quantized"]
    assert np.array_equal(q.reshape(2, -1).astype(np.float32), torch.round(w).numpy())  # torch.round: half to even
    assert np.array_equal(ort_dequantize(q, scale, axis), layer.quantized_weight().detach().numpy())
    qb, bscale, _ = next(v for k, v in ints.items() if k.endswith("bias_quantized"))
    assert qb.tolist() == [2, -4] and np.array_equal(bscale, np.full(2, 2.0**-11, dtype=np.float32))
    assert np.array_equal(ort_dequantize(qb, bscale), layer.quantized_bias().detach().numpy())
