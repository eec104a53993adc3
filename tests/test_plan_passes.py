"""Each pass of the placement plan on a tiny graph (qat_plugin/graph/plan.py).

Given a captured graph with shapes propagated, each pass is a pure function: BN folds,
supergroups, value origins (data / mask / constant), sites, model outputs, shared encodings,
bias sources.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from qat_plugin.config import load_config
from qat_plugin.graph.plan import (ACTIVATION, CONSTANT, MASK, _PlanGraph, bias_sources, drop_model_outputs,
                                   fold_batch_norms, make_plan, match_supergroups, place_sites, share_encodings,
                                   value_origins)
from qat_plugin.graph.trace import capture, propagate_shapes


def graph_of(model, *args):
    gm = capture(model)
    propagate_shapes(gm, args)
    return _PlanGraph(gm, frozenset())


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        z = self.conv2(y)
        return self.bn2(z) + z  # conv2 has two users: its BN is not folded


def test_fold_batch_norms_folds_only_single_user_pairs():
    g = graph_of(ConvBnRelu().eval(), torch.randn(1, 3, 8, 8))
    assert {c.name: b.name for c, b in fold_batch_norms(g).items()} == {"conv": "bn"}


def test_match_supergroups_takes_the_longest_chain_with_the_folded_bn():
    g = graph_of(ConvBnRelu().eval(), torch.randn(1, 3, 8, 8))
    folds = fold_batch_norms(g)
    group_of, groups = match_supergroups(g, load_config("default"), folds)
    assert [tuple(n.name for n in grp) for grp in groups] == [("conv", "bn", "relu")]
    assert group_of[next(n for n in g.nodes if n.name == "relu")][0].name == "conv"


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 4))

    def forward(self, x, mask):
        additive = (1.0 - mask[:, None, :].float()) * torch.finfo(torch.float32).min
        scores = x @ x.transpose(-1, -2)
        return torch.softmax(scores + additive + self.table, -1)


def test_value_origins_tell_data_masks_and_constants_apart():
    g = graph_of(Masked().eval(), torch.randn(2, 4, 3), torch.ones(2, 4, dtype=torch.long))
    origin = {n.name: o for n, o in value_origins(g).items()}
    assert origin["x"] == ACTIVATION and origin["mask"] == MASK
    assert origin["mul"] == MASK  # the additive mask, made from the int mask only
    assert origin["table"] == CONSTANT and origin["matmul"] == ACTIVATION


def test_place_sites_keeps_masks_and_their_sums_out_of_every_quantizer():
    g = graph_of(Masked().eval(), torch.randn(2, 4, 3), torch.ones(2, 4, dtype=torch.long))
    cfg = load_config("default")
    folds = fold_batch_norms(g)
    group_of, _ = match_supergroups(g, cfg, folds)
    walk = place_sites(g, cfg, folds, group_of, value_origins(g), param_bw=8, output_bw=8)
    quantized = {name for s in walk.sites.values() for name in s.nodes}
    assert quantized == {"x", "matmul", "softmax"}  # not mul (the mask), add, add_1 (scores + mask + table)


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        return y, self.b(y)


def test_drop_model_outputs_keeps_a_site_for_its_other_consumers():
    g = graph_of(TwoOutputs().eval(), torch.randn(2, 4))
    cfg = load_config({"model_output": {"is_output_quantized": False}})
    folds = fold_batch_norms(g)
    group_of, _ = match_supergroups(g, cfg, folds)
    walk = place_sites(g, cfg, folds, group_of, value_origins(g), param_bw=8, output_bw=8)
    sites = drop_model_outputs(g, cfg, walk.sites, walk.source, folds)
    assert sites["a_output"].consumers == ("b",)  # the model output 'a' itself stays float
    assert "b_output" not in sites


class Cat(nn.Module):
    def forward(self, x, y):
        return torch.cat([torch.relu(x), torch.sigmoid(y)], 1)


def test_share_encodings_merges_a_tensorrt_concat_into_one_site():
    g = graph_of(Cat(), torch.randn(1, 2), torch.randn(1, 2))
    cfg = load_config("tensorrt")
    folds = fold_batch_norms(g)
    group_of, _ = match_supergroups(g, cfg, folds)
    walk = place_sites(g, cfg, folds, group_of, value_origins(g), param_bw=8, output_bw=8)
    merged = share_encodings(walk.sites, walk.uf)
    shared = [s for s in merged.values() if len(s.nodes) > 1]
    assert len(shared) == 1 and set(shared[0].nodes) == {"relu", "sigmoid"}


def test_bias_sources_point_each_bias_at_its_input_site():
    g = graph_of(ConvBnRelu().eval(), torch.randn(1, 3, 8, 8))
    cfg = load_config("default")
    folds = fold_batch_norms(g)
    group_of, _ = match_supergroups(g, cfg, folds)
    walk = place_sites(g, cfg, folds, group_of, value_origins(g), param_bw=8, output_bw=8)
    merged = bias_sources(g, cfg, share_encodings(walk.sites, walk.uf), walk, folds)
    assert merged["conv.weight"].bias_from == "x_input" and merged["conv2.weight"].bias_from == "relu_output"
    no_bias = load_config({"params": {"bias": {"is_quantized": False}}})
    assert bias_sources(g, no_bias, merged, walk, folds) == merged and \
        all(s.bias_from is None for s in share_encodings(walk.sites, walk.uf).values())


def test_passes_are_pure():
    model = ConvBnRelu().eval()
    g = graph_of(model, torch.randn(1, 3, 8, 8))
    before = [(n.name, n.op, str(n.target)) for n in g.nodes]
    cfg = load_config("default")
    folds = fold_batch_norms(g)
    match_supergroups(g, cfg, folds)
    place_sites(g, cfg, folds, match_supergroups(g, cfg, folds)[0], value_origins(g), param_bw=8, output_bw=8)
    assert [(n.name, n.op, str(n.target)) for n in g.nodes] == before
    assert isinstance(fx.GraphModule, type)


class Scores(nn.Module):
    """Attention scores ``x x^T * 0.125`` (+ a constant bias) into a Softmax, with different tails."""

    def __init__(self, variant):
        super().__init__()
        self.variant, self.bias = variant, nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        if self.variant == "divided, minus a bias":
            return torch.softmax((x @ x.transpose(-1, -2)) / 8.0 - self.bias, -1)
        s = (x @ x.transpose(-1, -2)) * 0.125
        if self.variant == "softmax":
            return torch.softmax(s + self.bias, -1)
        if self.variant == "reshape":
            return torch.softmax((s + self.bias).reshape(2, 16), -1)
        if self.variant == "also an output":
            return torch.softmax(s + self.bias, -1), s
        if self.variant == "softmax, then relu":
            t = s + self.bias
            return torch.softmax(t, -1) + torch.relu(t)
        return torch.softmax(torch.relu(s), -1)


@pytest.mark.parametrize("variant, quantized", [
    ("softmax", {"x", "matmul", "softmax"}),  # the scale and the bias add go to Softmax in float
    ("reshape", {"x", "matmul", "softmax"}),  # through a reshape too
    ("divided, minus a bias", {"x", "matmul", "softmax"}),  # Div and Sub forms
    ("also an output", {"x", "matmul", "mul", "softmax"}),  # the scaled scores are a model output
    ("softmax, then relu", {"x", "matmul", "mul", "add", "softmax", "relu", "add_1"}),  # a user that is no Softmax
    ("relu", {"x", "matmul", "mul", "relu", "softmax"}),  # a value-changing op between scale and Softmax
])
def test_scores_reach_softmax_in_float_only_when_softmax_is_all_they_feed(variant, quantized):
    gm = capture(Scores(variant).eval())
    propagate_shapes(gm, (torch.randn(2, 4, 3),))
    plan = make_plan(gm, load_config("default"))
    assert {n for s in plan.sites for n in s.nodes} == quantized


class NestedFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = nn.Linear(4, 3)

    def forward(self, x):
        return F.linear(x, self.sub.weight, self.sub.bias)


def test_functional_weight_of_a_submodule_is_a_per_channel_param_site():
    gm = capture(NestedFunctional().eval())
    propagate_shapes(gm, (torch.randn(2, 4),))
    plan = make_plan(gm, load_config("default"))
    (w,) = plan.by_kind("param")
    assert (w.key, w.nodes, w.where, w.axis, w.channels, w.module) == ("sub_weight_param", ("sub_weight",), "sub.weight",
                                                                      0, 3, None)
    assert [s.key for s in plan.by_kind("input")] == ["x_input"] and [s.key for s in plan.by_kind("output")] == \
        ["linear_output"]
    assert {s.bitwidth for s in plan.sites} == {8}  # make_plan's defaults: W8A8
    mixed = make_plan(gm, load_config("default"), param_bw=4, output_bw=16)
    assert {s.key: s.bitwidth for s in mixed.sites} == {"x_input": 16, "sub_weight_param": 4, "linear_output": 16}


class PadThenConv(nn.Module):
    def __init__(self, pad, conv=None, functional_conv=False):
        super().__init__()
        self.pad, self.conv, self.functional_conv = pad, conv or nn.Conv2d(3, 4, 3), functional_conv

    def forward(self, x):
        y = self.pad(x)
        return F.conv2d(y, self.conv.weight, self.conv.bias) if self.functional_conv else self.conv(y)


class _F(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


PADS = {
    "ZeroPad2d, asymmetric": (PadThenConv(nn.ZeroPad2d((0, 1, 0, 1))), True),
    "ConstantPad2d of 0": (PadThenConv(nn.ConstantPad2d(1, 0.0)), True),
    "ConstantPad2d of 0.5": (PadThenConv(nn.ConstantPad2d(1, 0.5)), False),
    "conv with reflect padding_mode": (PadThenConv(nn.ZeroPad2d(1), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), False),
    "conv with padding='same'": (PadThenConv(nn.ZeroPad2d(1), nn.Conv2d(3, 4, 3, padding="same")), False),
    "conv with padding='valid'": (PadThenConv(nn.ZeroPad2d(1), nn.Conv2d(3, 4, 3, padding="valid")), True),
    "F.pad positional mode and value": (PadThenConv(_F(lambda x: F.pad(x, (1, 1, 1, 1), "constant", 0.0))), True),
    "F.pad positional mode": (PadThenConv(_F(lambda x: F.pad(x, (1, 1, 1, 1), "constant"))), True),
    "F.pad positional reflect": (PadThenConv(_F(lambda x: F.pad(x, (1, 1, 1, 1), "reflect"))), False),
    "F.pad positional value 0.5": (PadThenConv(_F(lambda x: F.pad(x, (1, 1, 1, 1), "constant", 0.5))), False),
    "F.pad keywords, int 0": (PadThenConv(_F(lambda x: F.pad(x, pad=(1, 1, 1, 1), value=0))), True),
    "F.pad of 0.5": (PadThenConv(_F(lambda x: F.pad(x, (1, 1, 1, 1), value=0.5))), False),
    "F.pad replicate": (PadThenConv(_F(lambda x: F.pad(x, (1, 1, 1, 1), mode="replicate"))), False),
    "F.pad with a zero channel pad": (PadThenConv(_F(lambda x: F.pad(x, (1, 1, 1, 1, 0, 0)))), True),
}


@pytest.mark.parametrize("case", list(PADS) + ["functional conv"])  # fx: the weight's shape is meta['qat_shape']
def test_fold_zero_pads_on_module_and_functional_pads(case):
    """Pass 4 on torch.fx captures: constant zero pads with static amounts on the spatial dims, owned by
    a zero-padding conv, fold (no site and no passthrough after them); anything else stays."""
    model, folded = PADS[case] if case in PADS else (PadThenConv(_F(lambda x: F.pad(x, (1, 1, 1, 1))),
                                                                 functional_conv=True), True)
    gm = capture(model.eval())
    propagate_shapes(gm, (torch.randn(1, 3, 8, 8),))
    plan = make_plan(gm, load_config("default"))
    conv = "conv2d" if case == "functional conv" else "conv"
    assert plan.pad_folds == ((("pad", conv),) if folded else ())
    # a pad that stays is value-preserving: the input's encoding is repeated after it
    assert plan.passthrough == (() if folded else (("pad", "x_input"),))
    assert {s.key for s in plan.sites if s.kind != "param"} == {"x_input", f"{conv}_output"}


@pytest.mark.parametrize("target, args, folded", [
    ("constant_pad_nd", ([1, 1, 1, 1], 0.0), True), ("constant_pad_nd", ([0, 1, 0, 1], 0), True),
    ("pad", ([1, 1, 1, 1], "constant", 0.5), False),
    ("pad", ([1, 1, 1, 1], "constant", None), True), ("constant_pad_nd", ([1, -1, 1, 1],), False)])
def test_fold_zero_pads_reads_explicit_aten_pad_values(target, args, folded):
    """torch.export's pads with the value written out (0, 0.0, None fold; 0.5 and negative amounts do not)."""
    g = fx.Graph()
    x = g.placeholder("x")
    pad = g.call_function(getattr(torch.ops.aten, target).default, (x,) + args)
    g.output(g.call_module("conv", (pad,)))
    gm = fx.GraphModule(nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3, 2)}), g)
    propagate_shapes(gm, (torch.randn(1, 3, 8, 8),))
    plan = make_plan(gm, load_config("default"))
    assert plan.pad_folds == (((pad.name, "conv"),) if folded else ())


class ThreePads(nn.Module):
    """A pad feeding a ReLU, a pad before a reflect-padded conv, then a pad owned by a plain conv:
    only the last folds (the pass goes on past the pads it leaves)."""

    def __init__(self):
        super().__init__()
        self.p1, self.p2, self.p3 = nn.ZeroPad2d(1), nn.ZeroPad2d(1), nn.ZeroPad2d(1)
        self.reflect = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(self.p3(self.reflect(self.p2(torch.relu(self.p1(x))))))


def test_fold_zero_pads_goes_on_past_pads_it_leaves():
    gm = capture(ThreePads().eval())
    propagate_shapes(gm, (torch.randn(1, 3, 8, 8),))
    plan = make_plan(gm, load_config("default"))
    assert plan.pad_folds == (("p3", "conv"),)


def test_make_plan_records_groups_and_folds():
    gm = capture(ConvBnRelu().eval())
    propagate_shapes(gm, (torch.randn(1, 3, 8, 8),))
    plan = make_plan(gm, load_config("default"))
    assert plan.groups == (("conv", "bn", "relu"),) and plan.bn_folds == (("conv", "bn"),)


@pytest.mark.parametrize("conv_args, meta, folded", [
    ((), True, True), (("b", [2, 2]), True, True), (("b", [1, 1], [0, 0]), True, True),
    (("b", [1, 1], [0, 0]), False, False)])
def test_fold_zero_pads_into_a_functional_aten_conv(conv_args, meta, folded):
    """torch.export's ``aten.conv2d(input, weight, bias?, stride?, padding?)`` with a parameter weight:
    the pad folds when the weight's value (``meta['val']``, as torch.export records it) gives the
    spatial rank (or, for torch.fx, ``meta['qat_shape']`` from propagate_shapes); without any shape
    the pass leaves the pad."""
    root = nn.Module()
    root.w, root.b = nn.Parameter(torch.randn(4, 3, 3, 3)), nn.Parameter(torch.randn(4))
    g = fx.Graph()
    x = g.placeholder("x")
    pad = g.call_function(torch.ops.aten.constant_pad_nd.default, (x, [1, 1, 1, 1]))
    w = g.get_attr("w")
    rest = tuple(g.get_attr("b") if a == "b" else a for a in conv_args)
    conv = g.call_function(torch.ops.aten.conv2d.default, (pad, w) + rest)
    g.output(conv)
    gm = fx.GraphModule(root, g)
    propagate_shapes(gm, (torch.randn(1, 3, 8, 8),))
    if meta:
        w.meta["val"] = root.w.detach()
    else:
        w.meta.pop("qat_shape")  # no shape recorded at all (neither torch.export's nor propagate_shapes')
    plan = make_plan(gm, load_config("default"))
    assert plan.pad_folds == (((pad.name, conv.name),) if folded else ())


def _plan(model, args, config="default"):
    gm = capture(model.eval())
    propagate_shapes(gm, args)
    return make_plan(gm, load_config(config))


class ConvBn(nn.Module):
    def __init__(self, bias=True, relu=True):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def test_a_supergroup_written_with_batchnorm_matches_the_folded_pair():
    plan = _plan(ConvBn(), (torch.randn(1, 3, 8, 8),), {"supergroups": [{"op_list": ["Conv", "BatchNormalization", "Relu"]}]})
    assert plan.groups == (("conv", "bn", "relu"),) and [s.key for s in plan.by_kind("output")] == ["relu_output"]


def test_a_folded_conv_without_bias_gets_an_int32_bias_from_its_input():
    plan = _plan(ConvBn(bias=False), (torch.randn(1, 3, 8, 8),))
    assert plan.site("conv.weight").bias_from == "x_input"


def test_bias_quantized_without_weight_sites():
    config = {"defaults": {"params": {"is_quantized": False}}, "params": {"bias": {"is_quantized": True}}}
    plan = _plan(ConvBn(), (torch.randn(1, 3, 8, 8),), config)
    assert plan.by_kind("param") == [] and {s.key for s in plan.sites} == {"x_input", "conv_output", "relu_output"}


@pytest.mark.parametrize("config, symmetric, per_channel", [
    ({"defaults": {"params": {"is_symmetric": False}, "per_channel_quantization": False}}, False, False),
    ({"op_type": {"Conv": {"per_channel_quantization": False}}}, True, False),
    ("default", True, True)])
def test_weight_site_follows_the_config(config, symmetric, per_channel):
    w = _plan(ConvBn(), (torch.randn(1, 3, 8, 8),), config).site("conv.weight")
    assert (w.symmetric, w.axis, w.channels) == (symmetric, 0 if per_channel else None, 4 if per_channel else 0)


class Lookup(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 4), nn.Linear(4, 2)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def test_an_embedding_read_by_a_layer_gets_a_site_for_it():
    plan = _plan(Lookup(), (torch.tensor([[1, 2, 3]]),))
    # the lookup's rows are on the table's per-row grids; fc needs them on one grid (an integer MatMul
    # in the runtime), so they get a site for fc, which then has an int32 bias on it
    assert [(s.key, s.bias_from) for s in plan.sites] == [
        ("emb.weight", None), ("emb_output", None), ("fc.weight", "emb_output"), ("fc_output", None)]
    assert plan.site("emb_output").consumers == ("fc",)


class KeywordWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))

    def forward(self, x):
        return F.linear(x, weight=self.w, bias=self.b) + F.linear(x, self.w * 2)


def test_functional_weight_by_keyword_and_computed_weights():
    plan = _plan(KeywordWeights(), (torch.randn(2, 4),))
    assert [(s.key, s.nodes) for s in plan.by_kind("param")] == [("w_param", ("w",))]  # w * 2 has no weight site
    # w * 2 is a constant computed by a known op: quantized as that op's output (it is no mask)
    assert [s.key for s in plan.sites] == ["x_input", "w_param", "linear_output", "mul_output", "linear_1_output",
                                           "add_output"]


class Outputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x, mask):
        return self.bn(self.conv(x)), mask.float(), x


def test_float_model_outputs_drop_folded_outputs_and_keep_input_sites():
    plan = _plan(Outputs(), (torch.randn(1, 3, 8, 8), torch.ones(2, dtype=torch.long)),
                 {"model_output": {"is_output_quantized": False}})
    assert [(s.key, s.consumers) for s in plan.sites] == [("x_input", None), ("conv.weight", None)]


class Cat3(nn.Module):
    def forward(self, a, b, c):
        return torch.cat([torch.relu(a), torch.sigmoid(b), torch.tanh(c)], 1).reshape(-1)


def test_three_way_shared_concat_is_one_site():
    plan = _plan(Cat3(), (torch.randn(1, 2),) * 3, "tensorrt")
    (shared,) = plan.by_kind("output")
    assert shared.nodes == ("relu", "sigmoid", "tanh") and shared.op == "Relu|Sigmoid|Tanh"
    assert plan.passthrough == (("reshape", "relu_output"),)  # the concat's value is on the shared encoding


def test_an_op_without_output_quantization_hands_nothing_on():
    config = {"defaults": {"ops": {"is_output_quantized": True}, "params": {"is_quantized": True, "is_symmetric": True}},
              "op_type": {"Relu": {"is_output_quantized": False}}}
    plan = _plan(LinearReluSigmoid(), (torch.randn(2, 3),), config)
    assert [s.key for s in plan.sites] == ["x_input", "fc.weight", "fc_output", "sigmoid_output"]
    assert plan.passthrough == () and plan.unsupported == ()


class ComputedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        return torch.sigmoid(F.linear(x, torch.cumsum(self.w, 0)))


def test_unknown_ops_on_constants_are_folded_and_placement_goes_on():
    plan = _plan(ComputedWeight(), (torch.randn(2, 3),))
    assert [s.key for s in plan.sites] == ["x_input", "linear_output", "sigmoid_output"] and plan.unsupported == ()


@pytest.mark.parametrize("target, args", [("masked_fill", "Scalar"), ("where", "self")])
def test_aten_masking_ops_reach_softmax_in_float(target, args):
    """torch.export's ``aten.masked_fill`` / ``aten.where`` on attention scores: no site on them."""
    g = fx.Graph()
    x, mask = g.placeholder("x"), g.placeholder("mask")
    scores = g.call_function(torch.ops.aten.matmul.default, (x, g.call_function(torch.ops.aten.transpose.int, (x, -1, -2))))
    keep = g.call_function(torch.ops.aten.gt.Scalar, (mask, 0))
    if target == "masked_fill":
        masked = g.call_function(torch.ops.aten.masked_fill.Scalar, (scores, keep, float("-inf")))
    else:
        masked = g.call_function(torch.ops.aten.where.self, (keep, scores, g.call_function(
            torch.ops.aten.full_like.default, (scores, -1e9))))
    softmax = g.call_function(torch.ops.aten.softmax.int, (masked, -1))
    g.output(softmax)
    gm = fx.GraphModule(nn.Module(), g)
    propagate_shapes(gm, (torch.randn(2, 4, 4), torch.ones(2, 4, 4, dtype=torch.long)))
    plan = make_plan(gm, load_config("default"))
    assert {n for s in plan.sites for n in s.nodes} == {x.name, scores.name, softmax.name}


class FxMasked(nn.Module):
    def forward(self, x, mask):
        scores = x @ x.transpose(-1, -2)
        return torch.softmax(scores.masked_fill(mask[:, None, :] == 0, float("-inf")), -1)


def test_fx_masked_fill_reaches_softmax_in_float():
    """torch.fx captures Tensor.masked_fill as a method call: it is 'Where' like the ATen form, so
    the masked scores reach the Softmax in float (before, an unknown-op site quantized them)."""
    plan = _plan(FxMasked(), (torch.randn(2, 4, 3), torch.ones(2, 4, dtype=torch.long)))
    assert {n for s in plan.sites for n in s.nodes} == {"x", "matmul", "softmax"}


class UnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        y = torch.cumsum(x, -1)
        return self.fc(y), y.reshape(-1), y


@pytest.mark.filterwarnings("ignore:.*left in float.*")
def test_an_unknown_op_is_quantized_for_its_computing_consumers_only():
    plan = _plan(UnknownOp(), (torch.randn(2, 3),))
    site = plan.site("cumsum_float_output")
    assert (site.kind, site.op, site.where, site.consumers) == ("input", "(float op)", "torch.cumsum", ("fc",))
    assert plan.unsupported == ("torch.cumsum (call_function 'cumsum')",)


class LinearReluSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return torch.sigmoid(torch.relu(self.fc(x)))


def test_activation_symmetry_is_per_op_type():
    config = {"defaults": {"ops": {"is_output_quantized": True, "is_symmetric": False},
                           "params": {"is_quantized": True, "is_symmetric": True}},
              "op_type": {"Relu": {"is_symmetric": True}}}
    plan = _plan(LinearReluSigmoid(), (torch.randn(2, 3),), config)
    assert [(s.key, s.symmetric) for s in plan.sites] == [("x_input", False), ("fc.weight", True), ("fc_output", False),
                                                          ("relu_output", True), ("sigmoid_output", False)]


SHAPE_ONLY = {
    "new_zeros": lambda s: s.new_zeros(s.shape), "new_ones": lambda s: s.new_ones(s.shape),
    "new_full": lambda s: s.new_full(s.shape, -100.0), "new_empty": lambda s: s.new_empty(s.shape).zero_(),
    "zeros_like": torch.zeros_like, "ones_like": torch.ones_like, "full_like": lambda s: torch.full_like(s, -100.0),
}


class ShapeOnlyMask(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, x):
        scores = x @ x.transpose(-1, -2)
        return torch.softmax(scores + self.make(scores), -1)


@pytest.mark.parametrize("name", list(SHAPE_ONLY))
def test_shape_only_constructors_make_constants_that_reach_softmax_in_float(name):
    """A mask built with new_zeros / zeros_like / ... from the scores' shape is a constant, not data:
    scores + mask feeds the Softmax in float (Swin's shifted-window mask)."""
    plan = _plan(ShapeOnlyMask(SHAPE_ONLY[name]), (torch.randn(2, 4, 3),))
    assert {n for s in plan.sites for n in s.nodes} == {"x", "matmul", "softmax"}


def test_longest_supergroup_wins():
    config = {"defaults": {"ops": {"is_output_quantized": True}, "params": {"is_quantized": True, "is_symmetric": True}},
              "supergroups": [{"op_list": ["Gemm", "Relu"]}, {"op_list": ["Gemm", "Relu", "Sigmoid"]}]}
    plan = _plan(LinearReluSigmoid(), (torch.randn(2, 3),), config)
    assert plan.groups == (("fc", "relu", "sigmoid"),)
    assert [s.key for s in plan.by_kind("output")] == ["sigmoid_output"]


class PadThenFunctionalConv(nn.Module):
    def __init__(self, pad, conv):
        super().__init__()
        self.pad, self.conv, self.w = pad, conv, nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return self.conv(self.pad(x), self.w)


FUNCTIONAL = {
    "padding='same'": (lambda y, w: F.conv2d(y, w, padding="same"), False),
    "padding='valid'": (lambda y, w: F.conv2d(y, w, padding="valid"), True),
    "positional padding": (lambda y, w: F.conv2d(y, w, None, 1, 0), True),
    "positional 'same'": (lambda y, w: F.conv2d(y, w, None, 1, "same"), False),
    "weight by keyword": (lambda y, w: F.conv2d(y, weight=w), True),
}


@pytest.mark.parametrize("case", FUNCTIONAL)
def test_fold_zero_pads_before_functional_convs(case):
    conv, folded = FUNCTIONAL[case]
    plan = _plan(PadThenFunctionalConv(_F(lambda x: F.pad(x, (1, 1, 1, 1))), conv), (torch.randn(1, 3, 8, 8),))
    assert plan.pad_folds == ((("pad", "conv2d"),) if folded else ())


class ChannelPadThenSamePadThenFold(nn.Module):
    """A channel pad (stays), a pad before a 'same'-padded functional conv (stays), then a foldable
    pad: the pass goes on past the functional convs it leaves."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = (nn.Parameter(torch.randn(3, 4, 3, 3)), nn.Parameter(torch.randn(3, 3, 3, 3)),
                                     nn.Parameter(torch.randn(4, 3, 3, 3)))

    def forward(self, x):
        y = F.conv2d(F.pad(x, (1, 1, 1, 1, 0, 1)), self.w1)
        y = F.conv2d(F.pad(y, (1, 1, 1, 1)), self.w2, padding="same")
        return F.conv2d(F.pad(y, (1, 1, 1, 1)), self.w3)


def test_fold_zero_pads_goes_on_past_functional_convs_it_leaves():
    plan = _plan(ChannelPadThenSamePadThenFold(), (torch.randn(1, 3, 8, 8),))
    assert plan.pad_folds == (("pad_2", "conv2d_2"),)
