"""ONNX export: ORT runs integer kernels and agrees with the simulation."""
import json
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from qat_plugin import NotCalibratedError, QuantConfigError, QuantSimModel
from qat_plugin.export import load_encodings, verify
from qat_plugin.export.verify import main as verify_main
from helpers import calibrate, randomize_bn

pytestmark = pytest.mark.filterwarnings("ignore:.*left in float.*")


class ConvBnRelu(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = act
        self.dw = nn.Conv2d(16, 16, 3, groups=16)
        self.dwbn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16 * 6 * 6, 10)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        y = self.act(self.dwbn(self.dw(y)))
        return self.head(torch.flatten(y, 1))


class AddRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = F.relu(self.a(x) + self.b(x))
        y = self.pool(y)
        y = F.adaptive_avg_pool2d(y, 1)
        return self.fc(y.flatten(1))


class CatPoolLinearRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        y = self.avg(torch.cat([self.a(x), F.relu(self.b(x))], dim=1))
        y = F.relu(self.fc1(y.reshape(y.shape[0], -1)))
        return self.fc2(y)


TINY = {
    "conv-bn-relu": lambda: ConvBnRelu(nn.ReLU()),
    "conv-bn-relu6": lambda: ConvBnRelu(nn.ReLU6()),
    "add-relu+maxpool+gap": AddRelu,
    "concat+avgpool+linear-relu": CatPoolLinearRelu,
}


def exported(tmp_path, model, x, name="m", **kwargs):
    sim = calibrate(QuantSimModel(randomize_bn(model).eval(), x[:2], **kwargs), x)
    return sim, sim.export(str(tmp_path), name, x[:1], export_fp32=True)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_groups_run_as_integer_kernels_and_match(tmp_path, name):
    x = torch.randn(64, 3, 8, 8)
    sim, res = exported(tmp_path, TINY[name](), x)
    report = verify(res.onnx_path, sim, torch.randn(256, 3, 8, 8))
    assert report.n_inputs == 256
    # judged against the simulation's own noise floor measured in this run (59-69 dB on these
    # graphs; ORT vs simulation measures inf: bit-exact), not against a fixed 35 dB
    assert report.within_floor and report.top1_agreement >= 0.995, str(report)
    assert report.perturbed_sqnr_db > 50, str(report)  # the floor itself is finite and high
    assert report.float_compute_ops == 0 and report.unfused_qdq == 0, str(report)
    assert report.op_counts.get("QuantizeLinear") == 1 and report.op_counts.get("DequantizeLinear") == 1
    assert not {"Relu", "Clip"} & set(report.op_counts)  # no float activation islands after fused convs


def test_weights_are_int8_initializers_and_biases_int32(tmp_path):
    x = torch.randn(16, 3, 8, 8)
    sim, res = exported(tmp_path, ConvBnRelu(nn.ReLU()), x)
    model = onnx.load(res.onnx_path)
    inits = {t.name: t for t in model.graph.initializer}
    dq_inputs = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    weights = [inits[i] for i in dq_inputs if i.endswith("weight_quantized")]
    biases = [inits[i] for i in dq_inputs if i.endswith("bias_quantized")]
    assert len(weights) == 3 and all(t.data_type == onnx.TensorProto.INT8 for t in weights)
    assert len(biases) == 3 and all(t.data_type == onnx.TensorProto.INT32 for t in biases)
    assert not any(t.data_type == onnx.TensorProto.FLOAT and t.name.endswith("weight") for t in inits.values())
    # per-channel axis on conv weights
    conv_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "conv.weight_quantized"]
    assert [a.i for a in conv_dq[0].attribute if a.name == "axis"] == [0]
    # the INT8 weights are exactly the simulation's integers
    w = onnx.numpy_helper.to_array(inits["conv.weight_quantized"]).astype(np.float64)
    scale = sim.quantizers()["conv.weight"].scale.detach().double().numpy().reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(w * scale, sim.model.conv.quantized_weight().detach().double().numpy(), rtol=1e-6)
    assert onnx.checker.check_model(model) is None


def test_dynamic_batch_axis(tmp_path):
    x = torch.randn(16, 3, 8, 8)
    sim, res = exported(tmp_path, AddRelu(), x)
    for batch in (1, 3, 7):
        report = verify(res.onnx_path, sim, torch.randn(batch, 3, 8, 8))
        assert report.n_inputs == batch and report.within_floor, str(report)


def test_encodings_file_is_aimet_format_keyed_by_onnx_names(tmp_path):
    x = torch.randn(16, 3, 8, 8)
    sim, res = exported(tmp_path, CatPoolLinearRelu(), x)
    data = json.load(open(res.encodings_path))
    assert data["version"] == "0.6.1"
    model = onnx.load(res.onnx_path)
    tensors = {i for n in model.graph.node for i in n.input} | {i.name for i in model.graph.input}
    fp32_tensors = {o for n in onnx.load(res.fp32_path).graph.node for o in n.output} | {"x"}
    for name, entries in data["activation_encodings"].items():
        assert name in tensors and name in fp32_tensors, name
        assert set(entries[0]) == {"bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale"}
        assert entries[0]["is_symmetric"] in ("True", "False")
    assert len(data["param_encodings"]["b.weight"]) == 4  # per channel
    loaded = load_encodings(res.encodings_path)
    enc = sim.quantizers()["b.weight"].encoding
    torch.testing.assert_close(loaded.param_encodings["b.weight"].scale, enc.scale)
    assert loaded.param_encodings["b.weight"].axis == 0
    x_enc = loaded.activation_encodings["x"]
    assert float(x_enc.scale) == pytest.approx(float(sim.quantizers()["x_input"].scale))
    assert int(x_enc.offset) == int(sim.quantizers()["x_input"].encoding.offset)


def test_fp32_file_has_no_qdq_and_matches_the_folded_model(tmp_path):
    x = torch.randn(16, 3, 8, 8)
    sim, res = exported(tmp_path, AddRelu(), x)
    ops = {n.op_type for n in onnx.load(res.fp32_path).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    for q in sim.quantizers().values():
        q.enabled = False
    report = verify(res.fp32_path, sim, torch.randn(32, 3, 8, 8))
    assert report.max_abs_diff < 1e-4


def test_export_uncalibrated_raises(tmp_path):
    sim = QuantSimModel(AddRelu(), torch.randn(2, 3, 8, 8))
    with pytest.raises(NotCalibratedError, match="compute_encodings"):
        sim.export(str(tmp_path), "m", torch.randn(1, 3, 8, 8))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("pbw, abw", [(4, 8), (8, 16)])
def test_sub_and_wide_bitwidths_need_opset_21(tmp_path, pbw, abw):
    x = torch.randn(16, 3, 8, 8)
    sim = calibrate(QuantSimModel(AddRelu(), x[:2], default_param_bw=pbw, default_output_bw=abw), x)
    with pytest.raises(QuantConfigError, match="from opset 21"):
        sim.export(str(tmp_path), "m", x[:1], opset_version=20)
    res = sim.export(str(tmp_path), "m", x[:1])  # picks opset 21 by itself
    assert res.opset == 21
    report = verify(res.onnx_path, sim, torch.randn(64, 3, 8, 8))
    assert report.sqnr_db > 60  # ORT executes these grids in float: the same arithmetic as the simulation
    kinds = {t.data_type for t in onnx.load(res.onnx_path).graph.initializer if t.name.endswith("_quantized")}
    assert (onnx.TensorProto.INT4 in kinds) == (pbw == 4)


def test_bitwidth_onnx_cannot_express(tmp_path):
    x = torch.randn(16, 3, 8, 8)
    sim = calibrate(QuantSimModel(AddRelu(), x[:2], default_param_bw=6), x)
    with pytest.raises(QuantConfigError, match="6-bit"):
        sim.export(str(tmp_path), "m", x[:1])


def test_verify_cli(tmp_path, capsys):
    x = torch.randn(16, 3, 8, 8)
    _, res = exported(tmp_path, AddRelu(), x)
    assert verify_main([res.onnx_path, "--n", "32", "--min-sqnr", "30", "--max-below-floor", "100"]) == 0
    out = capsys.readouterr().out
    assert "logit SQNR (dB)" in out and "QLinearConv=" in out and "inputs compared" in out
    assert "reference noise floor (dB)" in out and "ORT vs floor" in out


def test_verify_flags_a_file_below_the_simulations_noise_floor(tmp_path):
    """One activation encoding off by 0.1% between the file and the simulation: ORT vs sim falls
    far below the floor measured in the same run, and the report says so."""
    x = torch.randn(64, 3, 8, 8)
    sim, res = exported(tmp_path, AddRelu(), x)
    test = torch.randn(128, 3, 8, 8)
    good = verify(res.onnx_path, sim, test)
    assert good.within_floor, str(good)
    q = sim.quantizers()["x_input"]
    with torch.no_grad():
        q.scale.mul_(1.001)
    bad = verify(res.onnx_path, sim, test)
    assert bad.floor_sqnr_db > 50 and bad.sqnr_db < bad.floor_sqnr_db - 10, str(bad)
    assert bad.within_floor is False and "BELOW the floor" in str(bad)
    assert verify(res.onnx_path, sim, test, floor=False).within_floor is None


def _torchvision(name, trained_steps=0):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    if trained_steps:
        from qat_plugin.data import digits_tensors
        model = getattr(torchvision.models, name)(num_classes=10)
        x, y, _, _ = digits_tensors()
        opt = torch.optim.Adam(model.parameters(), 2e-3)
        for i in range(trained_steps):
            idx = torch.randint(0, len(y), (64,))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(); loss.backward(); opt.step()
        return model.eval(), x
    return model.eval(), torch.randn(64, 3, 32, 32)


@pytest.mark.parametrize("name", ["resnet18", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_torchvision_export_is_int8_fused_and_small(tmp_path, name):
    """(mobilenet_v2 is slow: 18 s; by default its export is checked by tests/test_examples.py's
    export_and_verify: integer, fused, at the floor)"""
    model, data = _torchvision(name)
    sim = calibrate(QuantSimModel(model, data[:2]), data[:32])
    res = sim.export(str(tmp_path), name, data[:1], export_fp32=True)
    report = verify(res.onnx_path, sim, torch.randn(256, 3, 32, 32))
    # ORT vs sim is at the floor here (benchmarks/verify_floor.py: resnet18 41.9 dB vs floor 42.2 dB,
    # mobilenet_v2 58.2 dB vs 56.3 dB); a fixed 35 dB would let a 7-23 dB regression pass
    assert report.within_floor, str(report)
    assert report.float_compute_ops == 0 and report.unfused_qdq == 0, str(report)
    assert os.path.getsize(res.onnx_path) <= 0.27 * os.path.getsize(res.fp32_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_trained_torchvision_top1_agreement(tmp_path, name):
    model, data = _torchvision(name, trained_steps=60)
    sim = calibrate(QuantSimModel(model, data[:2]), data[:256])
    res = sim.export(str(tmp_path), name, data[:1])
    report = verify(res.onnx_path, sim, data[:512])
    assert report.n_inputs >= 256
    assert report.within_floor and report.top1_agreement >= 0.995, str(report)


# ---- added for issue 13's mutation run of export/onnx.py ------------------------------------------
def _quantize_zero_point_types(path):
    model = onnx.load(path)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t.data_type for n in model.graph.node if n.op_type == "Constant"}
    return {inits.get(n.input[2], consts.get(n.input[2])) for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("config, zero_point_type", [("tensorrt", onnx.TensorProto.INT16),
                                                     ("default", onnx.TensorProto.UINT16)])
def test_16_bit_activations_keep_their_sign_in_the_file(tmp_path, config, zero_point_type):
    """Symmetric 16-bit activations (TensorRT preset) quantize to INT16, asymmetric ones to UINT16, and
    ORT runs either at the simulation's arithmetic."""
    x = torch.randn(16, 3, 8, 8)
    sim = calibrate(QuantSimModel(AddRelu(), x[:2], default_output_bw=16, config_file=config), x)
    res = sim.export(str(tmp_path), "m", x[:1])
    assert _quantize_zero_point_types(res.onnx_path) == {zero_point_type}
    assert verify(res.onnx_path, sim, torch.randn(64, 3, 8, 8)).sqnr_db > 60
