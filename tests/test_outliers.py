"""Outlier-heavy sites of transformers: 16-bit residual stream and split LayerNorm outputs.

Given a post-LayerNorm block (a LayerNorm output feeding a Linear layer and a residual sum),
``split_site`` gives the sum its own 16-bit copy while the Linear layer keeps its 8-bit input;
ONNX Runtime runs the export equal to the simulation, and the encodings file carries both grids.
"""
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from helpers import calibrate
from qat_plugin import QuantConfigError, QuantSimModel
from qat_plugin.export.verify import session
from qat_plugin.outliers import residual_stream_sites, set_residual_stream_precision

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


class PostNormBlock(nn.Module):
    """BERT's pattern: ``y = LN(x)``; ``LN2(fc(y) + y)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.fc, self.norm2 = nn.LayerNorm(16), nn.Linear(16, 16), nn.LayerNorm(16)
        with torch.no_grad():
            self.norm.weight[:2] = 20.0  # two outlier channels, as in BERT's LayerNorm outputs

    def forward(self, x):
        y = self.norm(x)
        return self.norm2(self.fc(y) + y)


def data(seed, n=32):
    return torch.randn(n, 5, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def split_sim():
    sim = QuantSimModel(PostNormBlock(), data(0, 2), quant_scheme="tf")
    new = sim.split_site("norm_output", ["add"], output_bw=16)
    calibrate(sim, data(1), data(2))
    return sim, new


def test_split_site_moves_only_the_named_consumers_to_a_finer_grid(split_sim):
    sim, new = split_sim
    assert new == "norm_output_to_add"
    sites = {s.key: s for s in sim.quantizer_sites()}
    assert (sites["norm_output"].bitwidth, sites["norm_output"].consumers) == (8, ("fc",))
    assert (sites[new].bitwidth, sites[new].consumers) == (16, ("add",))
    nodes = {n.name: n for n in sim.model.graph.nodes}
    assert nodes["fc"].args[0].target == "quantizers.norm_output"
    assert {a.target for a in nodes["add"].all_input_nodes} >= {f"quantizers.{new}"}
    # both grids cover the same range: the 16-bit one is 257x finer (65535 vs 255 steps)
    q8, q16 = sim.quantizers()["norm_output"].encoding, sim.quantizers()[new].encoding
    assert float(q8.scale / q16.scale) == pytest.approx(65535 / 255, rel=1e-5)
    # the sum now reads LN(x) within half a 16-bit step
    x = data(3, 4)
    with torch.no_grad():
        y = sim.model.norm(x)
        assert float((sim.quantizers()[new](y) - y).abs().max()) <= float(q16.scale) / 2 * (1 + 1e-5)


def test_split_site_export_runs_in_ort_equal_to_the_sim_with_both_grids(split_sim, tmp_path):
    sim, new = split_sim
    res = sim.export(tmp_path, "split", data(0, 2))
    model = onnx.load(res.onnx_path)
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    ln_out = [n for n in model.graph.node if n.op_type == "LayerNormalization"][0].output[0]
    zero_point_types = sorted(inits[n.input[2]].data_type if n.input[2] in inits else
                              producers[n.input[2]].attribute[0].t.data_type
                              for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == ln_out)
    assert zero_point_types == sorted([onnx.TensorProto.UINT8, onnx.TensorProto.UINT16])
    x = data(4, 8)
    out = session(res.onnx_path).run(None, {session(res.onnx_path).get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = sim.model(x).numpy()
    assert np.abs(out - ref).max() <= 1e-5  # measured: bit-identical
    with open(res.encodings_path) as f:
        acts = json.load(f)["activation_encodings"]
    assert sorted(e[0]["bitwidth"] for name, e in acts.items() if res.tensor_sites[name] in ("norm_output", new)) == [8, 16]


class DropoutBlock(PostNormBlock):
    """BERT's embeddings: the LayerNorm output passes a Dropout before it fans out."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = self.drop(self.norm(x))
        return self.norm2(self.fc(y) + y)


def test_split_site_moves_the_quantizer_past_dropout_to_reach_the_fan_out():
    sim = QuantSimModel(DropoutBlock().eval(), data(0, 2), quant_scheme="tf")
    with pytest.raises(QuantConfigError, match=r"its users are \['fc', 'add'\]"):
        sim.split_site("norm_output", ["fc2"])  # checked before the quantizer moves: nothing changed
    assert {n.name: n for n in sim.model.graph.nodes}["drop"].args[0].target == "quantizers.norm_output"
    assert sim.site_consumers("norm_output") == ["fc", "add"]
    new = sim.split_site("norm_output", ["add"], output_bw=16)
    nodes = {n.name: n for n in sim.model.graph.nodes}
    assert nodes["drop"].args[0].name == "norm"  # the dropout reads the float LayerNorm output...
    assert nodes["fc"].args[0].target == "quantizers.norm_output"  # ...and both grids read the dropout
    assert nodes["fc"].args[0].args[0].name == "drop" and nodes["add"].args[1].args[0].name == "drop"
    calibrate(sim, data(1), data(2))
    plain = QuantSimModel(PostNormBlock(), data(0, 2), quant_scheme="tf")
    plain.split_site("norm_output", ["add"], output_bw=16)
    calibrate(plain, data(1), data(2))
    with torch.no_grad():  # in eval the dropout is the identity: the same model as without it
        assert torch.equal(sim.model.eval()(data(5)), plain.model(data(5)))
        sim.model.train()
        torch.manual_seed(0)
        a = sim.model(data(5))
        assert not torch.equal(a, plain.model(data(5)))  # dropout acts in training
    assert new in sim.quantizers()


def test_split_site_errors_name_the_way_out():
    sim = QuantSimModel(PostNormBlock(), data(0, 2))
    with pytest.raises(QuantConfigError, match="users are"):
        sim.split_site("norm_output", ["fc2"])
    with pytest.raises(QuantConfigError, match="use set_precision"):
        sim.split_site("norm_output", ["fc", "add"])
    with pytest.raises(QuantConfigError, match="weight"):
        sim.split_site("fc.weight", ["add"])
    with pytest.raises(QuantConfigError, match="Did you mean"):
        sim.split_site("norm_outptu", ["add"])
    with pytest.raises(QuantConfigError, match="6"):
        sim.split_site("norm_output", ["add"], output_bw=6)
    assert [s.key for s in sim.quantizer_sites()].count("norm_output_to_add") == 0  # nothing half-done


def test_residual_stream_precision_splits_the_layernorm_outputs_of_a_post_norm_model():
    sim = QuantSimModel(PostNormBlock(), data(0, 2), quant_scheme="tf")
    assert residual_stream_sites(sim) == ["fc_output", "add_output"]
    keys = set_residual_stream_precision(sim)
    assert keys == ["fc_output", "add_output", "norm_output_to_add"]
    assert {s.key: s.bitwidth for s in sim.quantizer_sites() if s.kind != "param"} == {
        "x_input": 8, "norm_output": 8, "fc_output": 16, "add_output": 16, "norm_output_to_add": 16,
        "norm2_output": 8}
    calibrate(sim, data(1), data(2))
    with torch.no_grad():
        ref = PostNormBlock()(data(5))
        split_err = float((sim.model(data(5)) - ref).pow(2).mean())
    unsplit = QuantSimModel(PostNormBlock(), data(0, 2), quant_scheme="tf")
    for key in residual_stream_sites(unsplit):
        unsplit.set_precision(key, output_bw=16)
    calibrate(unsplit, data(1), data(2))
    with torch.no_grad():
        unsplit_err = float((unsplit.model(data(5)) - ref).pow(2).mean())
    assert split_err < 0.45 * unsplit_err  # measured 0.37x: the 8-bit LN output no longer reaches the sum


def test_residual_stream_precision_on_bert_splits_each_layernorm_feeding_a_sum_and_exports_integer(tmp_path):
    """A 2-layer BERT (torch.export capture): the embeddings LayerNorm and the attention and
    output LayerNorms feeding a later sum are split (4); the last one feeds only the pooler and
    the output. ORT runs every Linear and attention matmul as an integer kernel, equal to the sim."""
    pytest.importorskip("transformers")
    from test_transformer import token_batch, tiny_bert
    from qat_plugin.export.verify import optimized_graph_stats

    sim = QuantSimModel(tiny_bert(dropout=0.0), token_batch(2, 16, 0), quant_scheme="tf")
    keys = set_residual_stream_precision(sim)
    split = sorted(k for k in keys if "_to_" in k)
    assert [k.split("_to_")[0] for k in split] == [
        "embeddings_layer_norm_output", "encoder_layer_0_attention_output_layer_norm_output",
        "encoder_layer_0_output_layer_norm_output", "encoder_layer_1_attention_output_layer_norm_output"]
    calibrate(sim, *[token_batch(8, 16, s) for s in range(1, 4)])
    res = sim.export(tmp_path, "bert", token_batch(2, 16, 0))
    counts, float_ops, _ = optimized_graph_stats(res.onnx_path)
    assert float_ops == 0, counts
    sess = session(res.onnx_path)
    ids, mask = token_batch(4, 16, 21)
    out = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], (ids.numpy(), mask.numpy()))))[0]
    with torch.no_grad():
        ref = sim.model(ids, mask).last_hidden_state.numpy()
    assert np.abs(out - ref).max() <= 1e-5


def test_callback_rejects_a_residual_stream_bitwidth_onnx_cannot_hold():
    from qat_plugin.callbacks import QuantizationAwareTraining

    with pytest.raises(QuantConfigError, match="residual_stream_bw=6 cannot be exported"):
        QuantizationAwareTraining(residual_stream_bw=6)
