"""What ``sim.export`` promises, checked on two exports made once per module.

One image net has every rewrite the export owns (a zero pad, simulated BN folding, a max-pool
passthrough, 4-bit weights, a split site at 16 bits, Conv / Gemm / MatMul+Add int32 biases, a
global average pool); one token net has integer inputs, a batch-1 dummy, a disabled weight
quantizer and one never calibrated. The checks read the files, ONNX Runtime runs them against
the simulation, and the simulation itself must come out of the export untouched."""
import contextlib
import copy
import io
import json
import os
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_plugin import NotCalibratedError, QuantConfigError, QuantSimModel
from qat_plugin.encoding import Encoding, int32_bias_grid
from qat_plugin.export import load_encodings, verify
from qat_plugin.export.onnx import quantize_dequantize
from qat_plugin.export.verify import session
from helpers import calibrate, randomize_bn, once_per_module

TYPES = onnx.TensorProto


class Kitchen(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)  # reads a zero pad: folded into its pads
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)  # 4-bit weights
        self.skip = nn.Conv2d(8, 8, 1)  # with conv2, the max-pool's only readers: layers
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)  # on (batch, tokens, channels): MatMul + Add
        self.head = nn.Linear(8, 5)  # Gemm
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)  # per-channel weights along axis 1

    def forward(self, x):
        y = self.pool(F.relu(self.bn(self.conv(F.pad(x, (1, 1, 1, 1))))))
        y = F.relu(self.conv2(y)) + self.skip(y)
        t = self.norm(y.flatten(2).transpose(1, 2))
        t = self.proj(t) + t
        u = F.adaptive_avg_pool2d(F.relu(self.up(y)), 1).flatten(1)
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1) + t.mean(1) + u)


class Tokens(nn.Module):
    """An embedding read directly by a Linear layer, and a mask."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, ids, mask):
        return self.fc2(F.relu(self.fc1(self.emb(ids)))) * mask.unsqueeze(-1)


def images(seed, n):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def tokens(seed, batch, length):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (batch, length), generator=g), (torch.rand(batch, length, generator=g) > 0.2).long()


def ort(path, *inputs, optimize=True):
    sess = session(path, optimize=optimize, threads=1)
    return sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})[0]


@pytest.fixture(scope=once_per_module)
def kitchen(tmp_path_factory):
    torch.manual_seed(0)
    sim = QuantSimModel(randomize_bn(Kitchen()).eval(), images(0, 2), bn_folding="simulated")
    assert sim.set_precision("conv2.weight", param_bw=4) == ["conv2.weight"]
    add = next(n for n in sim.site_consumers("norm_output") if n != "proj")
    split = sim.split_site("norm_output", [add], output_bw=16)
    calibrate(sim, images(1, 64))
    x = images(2, 16)
    with torch.no_grad():
        before = sim.model(x)
    path = tmp_path_factory.mktemp("kitchen") / "new" / "dir"  # made by the export
    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        res = sim.export(path, "k", images(3, 1), export_fp32=True, input_names=["image"], output_names=["logits"])
    assert printed.getvalue() == ""  # the exporter's progress lines stay out of the user's output
    return sim, res, split, path, x, before, caught


@pytest.fixture(scope=once_per_module)
def token_export(tmp_path_factory):
    torch.manual_seed(0)
    sim = QuantSimModel(Tokens().eval(), tokens(0, 2, 5))
    sim.quantizers()["fc2.weight"].enabled = False
    never = "emb_output"  # the embedding's rows on one grid, for fc1
    sim.quantizers()[never].enabled = False  # disabled before calibration: no encoding, and none needed
    calibrate(sim, tokens(1, 32, 5))
    path = tmp_path_factory.mktemp("tokens")
    res = sim.export(path, "t", tokens(2, 1, 5), input_names=["token_ids", "attention_mask"], output_names=["out"])
    wide = calibrate(QuantSimModel(Tokens().eval(), tokens(0, 2, 5), default_output_bw=16, config_file="tensorrt"),
                     tokens(1, 32, 5))
    static = wide.export(path, "static", tokens(2, 1, 5), dynamic_batch=False)
    return sim, res, (wide, static), never


def refused_before_writing(sim, path, dummy, error, match, **kwargs):
    """``sim.export`` raises ``error`` matching ``match`` and leaves ``path`` empty."""
    with pytest.raises(error, match=match):
        sim.export(path, "refused", dummy, **kwargs)
    assert not os.listdir(path)


def nodes_of(path):
    return list(onnx.load(path).graph.node)


def initializers(path):
    return {t.name: t for t in onnx.load(path).graph.initializer}


# ---- the custom op ------------------------------------------------------------------------------
def test_quantize_dequantize_op_is_onnx_arithmetic():
    """Half to even at ties, both ends, per channel along axis 1, the input's dtype kept."""
    scale, zero_point = torch.tensor([0.5, 0.25]), torch.tensor([10, 0], dtype=torch.uint8)
    x = torch.tensor([[-100.0, -0.25], [0.75, 0.375], [1.25, 100.0]])
    out = quantize_dequantize(x, scale, zero_point, 1, 0, 255)
    # column 0: (clip(rint(x / 0.5) + 10, 0, 255) - 10) * 0.5; column 1 the same with 0.25 and 0
    expected = torch.tensor([[-5.0, 0.0], [1.0, 0.5], [1.0, 63.75]])
    assert torch.equal(out, expected)
    per_tensor = quantize_dequantize(x.half(), torch.tensor(0.5), torch.tensor(0, dtype=torch.int8), 0, -128, 127)
    assert per_tensor.dtype == torch.float16
    assert per_tensor.float().tolist() == [[-64.0, -0.0], [1.0, 0.5], [1.0, 63.5]]


def test_quantize_dequantize_op_equals_the_encodings_reference():
    enc = Encoding.from_min_max(torch.tensor([-1.0, -0.3, 0.0]), torch.tensor([1.0, 2.0, 0.5]), 8, False, axis=0)
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 2
    out = quantize_dequantize(x, enc.scale.float(), enc.onnx_zero_point().to(torch.uint8), 0, 0, 255)
    torch.testing.assert_close(out.double(), enc.quantize_dequantize(x), rtol=0, atol=1e-6)


# ---- the image net ------------------------------------------------------------------------------
def test_files_paths_and_opset(kitchen):
    sim, res, _, path, *_ = kitchen
    assert res.onnx_path == os.path.join(str(path), "k.onnx") and os.path.isfile(res.onnx_path)
    assert res.encodings_path == os.path.join(str(path), "k.encodings") and os.path.isfile(res.encodings_path)
    assert res.fp32_path == os.path.join(str(path), "k_fp32.onnx") and os.path.isfile(res.fp32_path)
    assert res.opset == 21  # picked by itself: 4-bit weights and a 16-bit activation
    model = onnx.load(res.onnx_path)
    assert model.producer_name == "qat_plugin"
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    onnx.checker.check_model(model, full_check=True)


def test_ort_runs_the_file_as_the_simulation_computes(kitchen):
    sim, res, _, _, x, before, _ = kitchen
    expected = before.numpy()
    for optimize in (False, True):
        out = ort(res.onnx_path, x, optimize=optimize)
        assert out.shape == (16, 5)
        # measured: max |ORT - sim| 4.8e-7 on outputs of about 1 (float ops in another order)
        np.testing.assert_allclose(out, expected, rtol=0, atol=5e-6)
    for batch in (1, 3):  # the batch axis is dynamic though the dummy had one sample
        np.testing.assert_allclose(ort(res.onnx_path, x[:batch]), expected[:batch], rtol=0, atol=5e-6)


def test_export_leaves_the_simulation_untouched(kitchen):
    sim, res, split, _, x, before, _ = kitchen
    with torch.no_grad():
        assert torch.equal(sim.model(x), before)
    assert sim.model.conv.bn is not None  # simulated folding stays simulated in the sim
    assert type(sim.model.conv.param_quantizers["weight"]).__name__ != "_ExportQDQ"
    assert all(type(q).__name__ != "_ExportQDQ" for q in sim.quantizers().values())


def test_every_weight_is_an_integer_initializer_of_its_bitwidth(kitchen):
    sim, res, *_ = kitchen
    inits = initializers(res.onnx_path)
    weights = {n.input[0]: inits[n.input[0]].data_type for n in nodes_of(res.onnx_path)
               if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")}
    assert weights == {"conv.weight_quantized": TYPES.INT8, "conv2.weight_quantized": TYPES.INT4,
                       "proj.weight_quantized": TYPES.INT8, "head.weight_quantized": TYPES.INT8,
                       "up.weight_quantized": TYPES.INT8, "skip.weight_quantized": TYPES.INT8}
    float_weights = {t.name for t in inits.values() if t.data_type == TYPES.FLOAT and t.name.endswith("weight")}
    assert float_weights == {"norm.weight"}  # LayerNorm's scale is not quantized
    # the integers are the simulation's: folded BN, per-channel scale, the 4-bit grid
    for layer, shape in (("conv", (-1, 1, 1, 1)), ("conv2", (-1, 1, 1, 1)), ("up", (1, -1, 1, 1))):
        module = sim.model.get_submodule(layer)
        q = onnx.numpy_helper.to_array(inits[f"{layer}.weight_quantized"]).astype(np.float64)
        scale = module.weight_encoding().scale.double().numpy().reshape(shape)
        np.testing.assert_allclose(q * scale, module.quantized_weight().detach().double().numpy(), rtol=1e-6, atol=0)
    assert np.abs(onnx.numpy_helper.to_array(inits["conv2.weight_quantized"])).max() <= 8


def test_the_zero_pad_is_in_the_conv_and_bn_is_folded(kitchen):
    _, res, *_ = kitchen
    ops = [n.op_type for n in nodes_of(res.onnx_path)]
    assert "Pad" not in ops and "BatchNormalization" not in ops
    nodes = nodes_of(res.onnx_path)
    producer = {o: n for n in nodes for o in n.output}
    conv = next(n for n in nodes if n.op_type == "Conv" and producer[n.input[1]].input[0] == "conv.weight_quantized")
    assert [list(a.ints) for a in conv.attribute if a.name == "pads"] == [[1, 1, 1, 1]]


def test_max_pool_reads_and_writes_one_grid(kitchen):
    _, res, *_ = kitchen
    nodes = nodes_of(res.onnx_path)
    producer = {o: n for n in nodes for o in n.output}
    pool = next(n for n in nodes if n.op_type == "MaxPool")
    dq_in = producer[pool.input[0]]
    q_out = next(n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0])
    inits = initializers(res.onnx_path)
    assert dq_in.op_type == "DequantizeLinear"
    assert onnx.numpy_helper.to_array(inits[dq_in.input[1]]) == onnx.numpy_helper.to_array(inits[q_out.input[1]])


def test_every_layer_reads_its_data_from_a_dequantize(kitchen):
    """What ORT needs to run each layer in integers (the max-pool's two readers are layers only)."""
    _, res, *_ = kitchen
    nodes = nodes_of(res.onnx_path)
    producer = {o: n for n in nodes for o in n.output}
    layers = [n for n in nodes if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    assert len(layers) == 6  # conv, conv2, skip, up, proj (MatMul), head (Gemm)
    assert all(producer[n.input[0]].op_type == "DequantizeLinear" for n in layers), \
        [(n.op_type, producer[n.input[0]].op_type) for n in layers]


def test_biases_are_int32_on_the_simulations_grid(kitchen):
    sim, res, *_ = kitchen
    inits = initializers(res.onnx_path)
    biases = {n.input[0]: n for n in nodes_of(res.onnx_path)
              if n.op_type == "DequantizeLinear" and n.input[0].endswith("bias_quantized")}
    assert sorted(biases) == ["conv.bias_quantized", "conv2.bias_quantized", "head.bias_quantized",
                              "proj.bias_quantized", "skip.bias_quantized", "up.bias_quantized"]
    for layer in ("conv", "conv2", "proj", "head", "up", "skip"):
        module = sim.model.get_submodule(layer)
        dq = biases[f"{layer}.bias_quantized"]
        assert inits[dq.input[0]].data_type == TYPES.INT32
        in_scale = sim.quantizers()[sim.plan.site(f"{layer}.weight").bias_from].scale
        _, bias_scale = int32_bias_grid(module.bias, in_scale, module.weight_encoding().scale)
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]])
        np.testing.assert_array_equal(scale, (bias_scale * torch.ones(module.bias.shape[0])).detach().numpy())
        np.testing.assert_allclose(onnx.numpy_helper.to_array(inits[dq.input[0]]) * scale.astype(np.float64),
                                   module.quantized_bias().detach().double().numpy(), rtol=1e-6, atol=0)


def test_the_means_are_global_average_pools(kitchen):
    _, res, *_ = kitchen
    assert [n.op_type for n in nodes_of(res.onnx_path)].count("GlobalAveragePool") == 2


def test_per_channel_axes_reach_the_file(kitchen):
    _, res, *_ = kitchen
    nodes = nodes_of(res.onnx_path)
    axis = {n.input[0]: [a.i for a in n.attribute if a.name == "axis"] for n in nodes if n.op_type == "DequantizeLinear"}
    assert axis["up.weight_quantized"] == [1] and axis["conv.weight_quantized"] == [0]


def test_zero_point_types_follow_each_grid(kitchen):
    sim, res, split, *_ = kitchen
    inits = initializers(res.onnx_path)
    nodes = nodes_of(res.onnx_path)
    consts = {n.output[0]: n.attribute[0].t for n in nodes if n.op_type == "Constant"}

    def zero_point(node):
        t = inits.get(node.input[2]) or consts[node.input[2]]
        return t.data_type, int(onnx.numpy_helper.to_array(t).reshape(-1)[0])

    quantize = [n for n in nodes if n.op_type == "QuantizeLinear"]
    types = {zero_point(n)[0] for n in quantize}
    assert types == {TYPES.UINT8, TYPES.UINT16}  # asymmetric activations, one of them 16-bit
    enc = sim.quantizers()["x_input"].encoding
    first = next(n for n in quantize if n.input[0] == "image")
    assert zero_point(first) == (TYPES.UINT8, -int(enc.offset))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[first.input[1]]), enc.scale.float().numpy())
    axes = {a.i for n in quantize for a in n.attribute if a.name == "axis"}
    assert axes <= {0, 1}  # per-tensor: ONNX ignores it


def test_the_split_site_has_both_grids_in_the_file(kitchen):
    sim, res, split, *_ = kitchen
    assert split in res.tensor_sites.values() and "norm_output" in res.tensor_sites.values()
    data = json.load(open(res.encodings_path))
    split_name = next(t for t, k in res.tensor_sites.items() if k == split)
    assert data["activation_encodings"][split_name][0]["bitwidth"] == 16


def test_tensor_sites_cover_every_enabled_quantizer(kitchen):
    sim, res, *_ = kitchen
    assert set(res.tensor_sites.values()) == {k for k, q in sim.quantizers().items() if q.enabled}
    params = {t for t, k in res.tensor_sites.items() if sim.plan.site(k).kind == "param"}
    assert params == {"conv.weight", "conv2.weight", "proj.weight", "head.weight", "up.weight", "skip.weight"}


def test_encodings_file_matches_the_simulation(kitchen):
    sim, res, split, *_ = kitchen
    data = json.load(open(res.encodings_path))
    meta = data["quantizer_args"] if "quantizer_args" in data else data
    assert meta["activation_bitwidth"] == 8 and meta["param_bitwidth"] == 8 and meta["opset"] == 21
    assert meta["quant_scheme"] == sim.quant_scheme and meta["param_quant_scheme"] == sim.param_quant_scheme
    assert meta["config"] == sim.config.name and meta["dtype"] == "int"
    assert meta["per_channel_quantization"] == sim.config.per_channel_quantization
    loaded = load_encodings(res.encodings_path)
    assert set(loaded.param_encodings) == {"conv.weight", "conv2.weight", "proj.weight", "head.weight", "up.weight",
                                           "skip.weight"}
    assert loaded.param_encodings["up.weight"].axis == 1
    assert loaded.param_encodings["conv2.weight"].bitwidth == 4
    for name, e in loaded.param_encodings.items():
        layer = sim.model.get_submodule(name.rsplit(".", 1)[0])
        torch.testing.assert_close(e.scale, layer.weight_encoding().scale.double(), rtol=1e-6, atol=0)
    for name, e in loaded.activation_encodings.items():
        ref = sim.quantizers()[res.tensor_sites[name]].encoding
        torch.testing.assert_close(e.scale, ref.scale.double(), rtol=1e-6, atol=0)
        assert e.bitwidth == ref.bitwidth and int(e.offset) == int(ref.offset)


def test_the_fp32_file_is_the_folded_float_model(kitchen):
    sim, res, _, _, x, *_ = kitchen
    fp32 = onnx.load(res.fp32_path)
    assert {o.domain: o.version for o in fp32.opset_import}[""] == res.opset  # the QDQ file's opset
    assert [i.name for i in fp32.graph.input] == ["image"] and [o.name for o in fp32.graph.output] == ["logits"]
    ops = {n.op_type for n in nodes_of(res.fp32_path)}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "BatchNormalization"}
    enabled = {k: q.enabled for k, q in sim.quantizers().items()}
    try:
        for q in sim.quantizers().values():
            q.enabled = False
        with torch.no_grad():
            ref = sim.model(x).numpy()
    finally:
        for k, q in sim.quantizers().items():
            q.enabled = enabled[k]
    np.testing.assert_allclose(ort(res.fp32_path, x), ref, rtol=0, atol=1e-5)  # measured 1.2e-6


def test_raised_scales_warn_only_when_raised(kitchen):
    *_, caught = kitchen
    assert not [w for w in caught if "int32 bias overflow" in str(w.message)]


def test_an_opset_too_low_for_the_grids_is_refused_before_writing(kitchen, tmp_path):
    sim = kitchen[0]
    refused_before_writing(sim, tmp_path, images(3, 1), QuantConfigError,
                           r"'conv2.weight' is 4-bit, .* from opset 21; export with opset_version=21 or later "
                           r"\(asked for 20\)", opset_version=20)


# ---- the token net ------------------------------------------------------------------------------
def test_token_inputs_have_dynamic_batch_and_sequence(token_export):
    sim, res, static, _ = token_export
    model = onnx.load(res.onnx_path)
    assert [i.name for i in model.graph.input] == ["token_ids", "attention_mask"]
    assert model.graph.output[0].name == "out" and res.fp32_path is None
    for i in model.graph.input:
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "sequence"], i
    assert res.opset == 20 and {o.domain: o.version for o in model.opset_import}[""] == 20
    ids, mask = tokens(5, 3, 7)
    with torch.no_grad():
        expected = sim.model(ids, mask).numpy()
    # unoptimized ORT runs the simulation's arithmetic: measured 0
    np.testing.assert_array_equal(ort(res.onnx_path, ids, mask, optimize=False), expected)
    # fc1 reads the embedding in float (its quantizer is disabled), so ORT (level ALL) fuses fc1's int8
    # weight into MatMulNBits with
    # accuracy_level 4, which quantizes that input to int8 at run time: measured 4 of 84 outputs one
    # step of fc2's grid away. The session option below turns that off, and ORT is exact again.
    step = float(sim.quantizers()["fc2_output"].scale)
    out = ort(res.onnx_path, ids, mask)
    np.testing.assert_allclose(out, expected, rtol=0, atol=step * 1.0001)
    assert (np.abs(out - expected) > 1e-6).sum() <= 8
    report = str(verify(res.onnx_path, sim, (ids, mask), threads=1, floor=False))
    assert "MatMulNBits (int8 weights on float inputs)  1: ORT quantizes those inputs" in report
    exact = session(res.onnx_path, threads=1, config={"session.qdq_matmulnbits_accuracy_level": "1"})
    np.testing.assert_array_equal(exact.run(None, {"token_ids": ids.numpy(), "attention_mask": mask.numpy()})[0],
                                  expected)


def test_image_inputs_have_a_dynamic_batch_only(kitchen):
    _, res, *_ = kitchen
    model = onnx.load(res.onnx_path)
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 8, 8]
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["logits"]


def test_static_export_keeps_the_dummys_shapes_and_16_bit_symmetric_grids(token_export):
    _, _, (sim, static), _ = token_export
    model = onnx.load(static.onnx_path)
    assert [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input] == [[1, 5], [1, 5]]
    assert static.opset == 21
    inits = initializers(static.onnx_path)
    zero_points = {inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_points == {TYPES.INT16}  # TensorRT's activations are symmetric: signed 16-bit
    ids, mask = tokens(6, 1, 5)
    with torch.no_grad():
        expected = sim.model(ids, mask).numpy()
    np.testing.assert_array_equal(ort(static.onnx_path, ids, mask, optimize=False), expected)  # measured 0
    # optimized, ORT turns fc1 (16-bit input, int8 weight) into MatMulNBits, which quantizes that input to
    # int8 at run time (measured 4.4e-4 off with onnxruntime 1.31, 2.7e-3 with 1.32); with the session
    # entry that keeps float inputs float, the optimized graph is exact again
    exact = session(static.onnx_path, threads=1, config={"session.qdq_matmulnbits_accuracy_level": "1"})
    feeds = {i.name: t.numpy() for i, t in zip(exact.get_inputs(), (ids, mask))}
    np.testing.assert_array_equal(exact.run(None, feeds)[0], expected)


def test_disabled_quantizers_leave_float_and_need_no_encoding(token_export):
    sim, res, _, never = token_export
    assert not sim.quantizers()[never].is_initialized()
    assert set(res.tensor_sites.values()) == {k for k, q in sim.quantizers().items() if q.enabled}
    inits = initializers(res.onnx_path)
    assert "fc2.weight_quantized" not in inits and "fc2.bias_quantized" not in inits
    float_weights = [i for n in nodes_of(res.onnx_path) if n.op_type in ("MatMul", "Gemm") for i in n.input
                     if i in inits and inits[i].data_type == TYPES.FLOAT]
    assert len(float_weights) == 1  # fc2's, transposed by the exporter
    assert inits["fc1.weight_quantized"].data_type == TYPES.INT8
    data = json.load(open(res.encodings_path))
    assert set(data["param_encodings"]) == {"emb.weight", "fc1.weight"}


def test_uncalibrated_export_names_the_count_and_a_site(tmp_path):
    sim = QuantSimModel(Tokens().eval(), tokens(0, 2, 5))
    n = sum(q.enabled for q in sim.quantizers().values())
    first = next(iter(sim.quantizers()))
    sim.quantizers()[first].enabled = False
    second = next(k for k in sim.quantizers() if k != first)
    refused_before_writing(sim, tmp_path, tokens(0, 1, 5), NotCalibratedError,
                           rf"cannot export: {n - 1} quantizer\(s\) have no encoding \(e.g. '{second}'\); "
                           r"call sim.compute_encodings")


def test_a_bitwidth_onnx_cannot_express_is_refused(tmp_path):
    sim = calibrate(QuantSimModel(Tokens().eval(), tokens(0, 2, 5), default_param_bw=6), tokens(1, 8, 5))
    sim.quantizers()["emb.weight"].enabled = False  # a disabled 6-bit site is fine; the next one is not
    refused_before_writing(sim, tmp_path, tokens(0, 1, 5), QuantConfigError,
                           r"quantizer 'fc1.weight' is 6-bit: ONNX QuantizeLinear expresses 4-bit and 16-bit grids "
                           r"\(opset 21 and later\) and 8-bit grids only")


def test_four_bit_weights_alone_pick_opset_21(tmp_path):
    sim = calibrate(QuantSimModel(Tokens().eval(), tokens(0, 2, 5), default_param_bw=4), tokens(1, 8, 5))
    res = sim.export(tmp_path, "t", tokens(0, 1, 5))
    assert res.opset == 21 and {o.domain: o.version for o in onnx.load(res.onnx_path).opset_import}[""] == 21


# ---- layers with equal weights ------------------------------------------------------------------
class Clones(nn.Module):
    """Two deep-copied layers, as an untrained ``nn.TransformerEncoder`` has: equal weights and, on
    one input, equal outputs and encodings."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = copy.deepcopy(self.a)
        self.c = copy.deepcopy(self.a)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(torch.relu(x))


def test_layers_with_equal_weights_export(tmp_path):
    """The exporter's optimizer merges initializers of equal content; before the weights were folded
    first, the second layer's weight site was lost ('did not become integer initializers')."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    sim = calibrate(QuantSimModel(Clones().eval(), x[:2]), x)
    res = sim.export(tmp_path, "clones", x[:1])
    params = {k for k in res.tensor_sites.values() if sim.plan.site(k).kind == "param"}
    assert params == {"a.weight", "b.weight", "c.weight"}
    assert set(load_encodings(res.encodings_path).param_encodings) == {"a.weight", "b.weight", "c.weight"}
    # a(x) and b(x) are one computation in the file now; c(relu(x)) is another
    model = onnx.load(res.onnx_path)
    assert sum(n.op_type in ("Gemm", "MatMul") for n in model.graph.node) == 2
    assert not [t for t in model.graph.initializer if t.data_type == TYPES.FLOAT and t.dims == [8, 8]]
    with torch.no_grad():
        expected = sim.model(x).numpy()
    np.testing.assert_allclose(ort(res.onnx_path, x), expected, rtol=0, atol=1e-6)
