"""Placement: exact expected quantizer sites for each supergroup and op rule on tiny graphs."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_plugin import QuantSimModel
from helpers import calibrate, randomize_bn


def sites(sim, kind=None):
    return [(s.kind, s.op, s.where) for s in sim.quantizer_sites() if kind is None or s.kind == kind]


def quantized_nodes(sim):
    """(producer node name, quantizer target) for every quantizer call in the graph."""
    return [(n.args[0].name, n.target) for n in sim.model.graph.nodes
            if n.op == "call_module" and str(n.target).startswith("quantizers.")]


class ConvBnRelu(nn.Module):
    def __init__(self, depthwise=False, act=None):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=4 if depthwise else 1)
        self.bn = nn.BatchNorm2d(4)
        self.act = act if act is not None else nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


@pytest.mark.parametrize("act, op", [(nn.ReLU(), "Relu"), (nn.ReLU6(), "Clip"), (nn.Hardtanh(0, 4), "Clip")])
@pytest.mark.parametrize("depthwise", [False, True])
def test_conv_bn_act_has_one_output_quantizer_after_the_activation(act, op, depthwise):
    model = ConvBnRelu(depthwise, act).eval()
    sim = QuantSimModel(model, torch.randn(1, 4, 8, 8))
    assert sites(sim) == [
        ("input", "input", "input 'x'"),
        ("param", "Conv", "conv.weight"),
        ("output", f"Conv+BatchNormalization+{op}", "conv .. act"),
    ]
    # in the graph: x -> q -> conv -> act -> q ; nothing between conv and act, BN gone
    assert quantized_nodes(sim) == [("x", "quantizers.x_input"), ("act", "quantizers.act_output")]
    assert [n.target for n in sim.model.graph.nodes if n.op == "call_module"] == [
        "quantizers.x_input", "conv", "act", "quantizers.act_output"]


def test_depthwise_group_calibrates_on_post_relu_values_only():
    """The group's quantizer sees only ReLU outputs: offset 0, no levels wasted on negatives."""
    model = randomize_bn(ConvBnRelu(depthwise=True)).eval()
    sim = calibrate(QuantSimModel(model, torch.randn(1, 4, 8, 8), quant_scheme="tf"), torch.randn(16, 4, 8, 8))
    enc = sim.quantizers()["act_output"].encoding
    assert int(enc.offset) == 0 and float(enc.min) == 0.0
    with torch.no_grad():
        pre_relu = model.bn(model.conv(torch.randn(16, 4, 8, 8)))
    assert float(pre_relu.min()) < -0.5  # a shared conv/relu quantizer would have had to cover these


class Residual(nn.Module):
    def __init__(self, op="add", relu="module"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.op, self.relu_kind = op, relu
        self.relu = nn.ReLU()

    def forward(self, x):
        a, b = self.conv1(x), self.conv2(x)
        y = {"add": lambda: a + b, "torch.add": lambda: torch.add(a, b), "mul": lambda: a * b}[self.op]()
        if self.relu_kind == "module":
            return self.relu(y)
        if self.relu_kind == "functional":
            return F.relu(y)
        return y


@pytest.mark.parametrize("relu", ["module", "functional"])
@pytest.mark.parametrize("op", ["add", "torch.add"])
def test_add_relu_is_one_group(op, relu):
    sim = QuantSimModel(Residual(op, relu), torch.randn(1, 3, 4, 4))
    assert [(k, o) for k, o, _ in sites(sim)] == [
        ("input", "input"), ("param", "Conv"), ("output", "Conv"), ("param", "Conv"), ("output", "Conv"),
        ("output", "Add+Relu")]


def test_mul_requantizes_and_relu_after_mul_is_separate():
    sim = QuantSimModel(Residual("mul", "module"), torch.randn(1, 3, 4, 4))
    assert [o for k, o, _ in sites(sim, "output")] == ["Conv", "Conv", "Mul", "Relu"]


class Passthrough(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        y = self.pool(self.conv(x))  # conv output quantized, maxpool not
        y = F.pad(y, (1, 1, 1, 1))
        y = F.max_pool2d(y, 1)
        y = self.drop(self.ident(y))
        y = y.permute(0, 1, 3, 2).contiguous().reshape(y.shape[0], 8, -1)
        y = y.view(y.shape[0], -1)
        y = self.flat(y.unsqueeze(-1))
        return self.fc(y)


def test_value_preserving_ops_do_not_requantize():
    sim = QuantSimModel(Passthrough(), torch.randn(2, 3, 10, 10))
    assert sites(sim) == [
        ("input", "input", "input 'x'"), ("param", "Conv", "conv.weight"), ("output", "Conv", "conv"),
        ("param", "Gemm", "fc.weight"), ("output", "Gemm", "fc")]


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.avg = nn.AvgPool2d(2)

    def forward(self, x):
        y = self.avg(self.conv(x))
        return F.adaptive_avg_pool2d(y, 1).flatten(1), y.mean(dim=(2, 3))


def test_average_pooling_and_mean_requantize():
    sim = QuantSimModel(Pools(), torch.randn(1, 3, 9, 9))
    assert [o for k, o, _ in sites(sim, "output")] == ["Conv", "AveragePool", "GlobalAveragePool", "ReduceMean"]


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), F.max_pool2d(self.b(x), 1)], dim=1))


def test_concat_requantizes_in_the_default_preset():
    sim = QuantSimModel(Cat(), torch.randn(1, 3, 4, 4))
    assert [o for k, o, _ in sites(sim, "output")] == ["Conv", "Conv", "Concat", "Conv"]


def test_concat_shares_one_encoding_in_the_tensorrt_preset():
    sim = QuantSimModel(Cat(), torch.randn(1, 3, 4, 4), config_file="tensorrt", quant_scheme="tf")
    outs = [s for s in sim.quantizer_sites() if s.kind == "output"]
    assert [(s.op, s.nodes) for s in outs] == [("Conv|Conv", ("a", "b")), ("Conv", ("head",))]
    calibrate(sim, torch.randn(8, 3, 4, 4))
    # both concat inputs pass through the same quantizer module; the range covers both
    q = sim.quantizers()[outs[0].key]
    users = [n for n in sim.model.graph.nodes if n.op == "call_module" and n.target == f"quantizers.{outs[0].key}"]
    assert len(users) == 2
    with torch.no_grad():
        x = torch.randn(8, 3, 4, 4)
        both = torch.cat([sim.model.a(x), sim.model.b(x)])
    assert float(q.encoding.max) >= float(both.abs().max()) * 0.99


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 12))
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x):
        y = F.relu6(F.linear(x, self.w, self.b))
        z = torch.relu(y * 2.0)
        return F.hardtanh(z + x[:, :6], 0.0, 3.0)


def test_functional_forms_match_module_rules():
    sim = QuantSimModel(Functional(), torch.randn(2, 12))
    assert sites(sim) == [
        ("input", "input", "input 'x'"),
        ("param", "Gemm", "w"),
        ("output", "Gemm+Clip", "F.linear .. F.relu6"),
        ("output", "Mul", "operator.mul"),
        ("output", "Relu", "torch.relu"),
        ("output", "Add", "operator.add"),
        ("output", "Clip", "F.hardtanh"),
    ]
    calibrate(sim, torch.randn(16, 12))
    assert sim.quantizers()["w_param"].encoding.axis == 0


def test_model_output_can_stay_float():
    cfg = {"model_output": {"is_output_quantized": False}}
    sim = QuantSimModel(Cat(), torch.randn(1, 3, 4, 4), config_file=cfg)
    assert [o for k, o, _ in sites(sim, "output")] == ["Conv", "Conv", "Concat"]


def test_int32_bias_uses_input_times_weight_scale():
    cfg = {"params": {"bias": {"is_quantized": True}}}
    model = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    sim = calibrate(QuantSimModel(model, torch.randn(1, 3, 2, 2), config_file=cfg), torch.randn(4, 3, 2, 2))
    conv = sim.model.get_submodule("0")
    (inp,) = [x.key for x in sim.quantizer_sites() if x.kind == "input"]
    assert sim.plan.site("0.weight").bias_from == inp
    s = float(sim.quantizers()[inp].scale.detach()) * sim.quantizers()["0.weight"].scale.detach()
    qb = conv.quantized_bias().detach()
    assert torch.allclose(qb / s, torch.round(qb / s), atol=1e-3)
    assert torch.allclose(qb, conv.bias.detach(), atol=float(s.max()))


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.emb = nn.Embedding(10, 3)

    def forward(self, x):
        y = torch.cumsum(self.conv(x), dim=1)
        y = torch.sort(y, dim=1).values
        return self.conv(y)


def test_unknown_ops_warn_once_listing_all_and_stay_float():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim = QuantSimModel(Unknown(), torch.randn(1, 3, 4, 4))
    msgs = [str(w.message) for w in caught if "left in float" in str(w.message)]
    assert len(msgs) == 1 and "cumsum" in msgs[0] and "sort" in msgs[0]
    # the float output of sort is quantized for its consumer (the conv), not replaced
    kinds = [(s.kind, s.op) for s in sim.quantizer_sites()]
    assert ("input", "(float op)") in kinds


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, a, b):
        return self.fc(a) + b


def test_every_model_input_is_quantized():
    sim = QuantSimModel(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 4)))
    assert [w for k, o, w in sites(sim, "input")] == ["input 'a'", "input 'b'"]
    # input quantizers come after all placeholders
    ops = [n.op for n in sim.model.graph.nodes]
    assert ops[:2] == ["placeholder", "placeholder"]


def test_tensorrt_fuses_conv_add_relu():
    sim = QuantSimModel(Residual("add", "module"), torch.randn(1, 3, 4, 4), config_file="tensorrt")
    # conv2 -> add -> relu is one group; conv1's output still quantized as the add's other input
    assert [o for k, o, _ in sites(sim, "output")] == ["Conv", "Conv+Add+Relu"]
    assert all(s.symmetric for s in sim.quantizer_sites())


class EmbeddingReaders(nn.Module):
    """An embedding read by a Linear and by a sum; another one read by the sum only (BERT's)."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos, self.fc = nn.Embedding(10, 4), nn.Embedding(6, 4), nn.Linear(4, 4)

    def forward(self, ids, positions):
        e = self.emb(ids)
        return self.fc(e) + e + self.pos(positions)


def test_an_embedding_read_by_a_layer_is_quantized_for_that_layer_only():
    """A table's rows are each on their own grid (per-row weights): a Linear computing with them
    needs one grid, as an integer MatMul in the runtime does; a sum requantizes by itself."""
    ids, positions = torch.randint(0, 10, (2, 6)), torch.arange(6).expand(2, 6)
    sim = calibrate(QuantSimModel(EmbeddingReaders(), (ids, positions)), (ids, positions))
    site = sim.plan.site("emb_output")
    assert (site.kind, site.op, site.consumers, site.where) == ("output", "Gather", ("fc",), "emb")
    assert not [s for s in sim.quantizer_sites() if s.key.startswith("pos") and s.kind != "param"]
    assert sim.plan.site("fc.weight").bias_from == "emb_output"  # and the Linear's bias is int32
    nodes = {n.name: n for n in sim.model.graph.nodes}
    assert nodes["fc"].args[0].target == "quantizers.emb_output"
    assert nodes["add"].args[1].name == "emb"  # the sum reads the rows themselves


class FloatInputFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


def test_only_an_embedding_gets_a_site_for_its_layer_readers():
    """With model inputs left in float, a reshape of the input read by a Linear gets no site:
    only an embedding table's rows are handed a new grid for their layer readers."""
    sim = QuantSimModel(FloatInputFlatten(), torch.randn(2, 3, 2, 2),
                        config_file={"model_input": {"is_input_quantized": False}})
    assert [s.key for s in sim.quantizer_sites()] == ["fc.weight", "fc_output"]
