"""Capture through torch.export, transformer placement, masks, and integer transformer export.

Given tiny models (a BERT-style encoder from transformers with a padding mask, a torch
``nn.TransformerEncoderLayer``, torchvision's ViT and a TF-style SAME-padding CNN), the
simulation quantizes every Linear and both attention matmuls, keeps masks out of every grid,
and ONNX Runtime runs the export with integer MatMul/Gemm kernels, equal to the simulation.
"""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import calibrate, once_per_module
from qat_plugin import QuantSimModel, UnsupportedModelError
from qat_plugin.export.verify import optimized_graph_stats, session

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

transformers = pytest.importorskip("transformers")


def tiny_bert(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=dropout)
    return transformers.BertModel(cfg).eval()


def token_batch(b, s, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for i in range(1, b):  # row 0 unpadded, the others padded at the end
        mask[i, int(torch.randint(s // 2, s, (), generator=g)):] = 0
    return ids, mask


@pytest.fixture(scope=once_per_module)
def bert_sim():
    model = tiny_bert()
    sim = QuantSimModel(model, token_batch(2, 16, 0), quant_scheme="tf")
    calibrate(sim, *[token_batch(8, 16, s) for s in range(1, 4)])
    return model, sim


@pytest.fixture(scope=once_per_module)
def bert_onnx(bert_sim, tmp_path_factory):
    _, sim = bert_sim
    return sim.export(tmp_path_factory.mktemp("bert"), "bert", token_batch(2, 16, 0)).onnx_path


def sites_by_op(sim, kind="output"):
    return [s.op for s in sim.quantizer_sites() if s.kind == kind]


def test_bert_captures_with_the_users_module_paths(bert_sim):
    _, sim = bert_sim
    keys = {s.key for s in sim.quantizer_sites()}
    assert "encoder.layer.0.attention.self.query.weight" in keys
    assert "embeddings.word_embeddings.weight" in keys
    per_layer = [s for s in sim.quantizer_sites() if "encoder.layer.0." in s.where]
    # query/key/value/attention-output/intermediate/output: 6 weights, 6 Linear outputs, 2 LayerNorms
    assert sum(s.kind == "param" for s in per_layer) == 6
    assert sum(s.op == "LayerNormalization" for s in per_layer) == 2
    assert sum(s.op == "Gelu" for s in per_layer) == 1


def test_attention_matmuls_have_both_inputs_quantized_and_softmax_output_quantized(bert_sim):
    _, sim = bert_sim
    ops = sites_by_op(sim)
    assert ops.count("MatMul") == 4 and ops.count("Softmax") == 2  # q.k^T and attn.v per layer
    gm = sim.model
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.matmul.default:
            for a in node.args:  # through transposes/views, each input comes from a quantizer
                while a.op == "call_function" and a.target in (torch.ops.aten.transpose.int, torch.ops.aten.view.default,
                                                               torch.ops.aten.permute.default):
                    a = a.args[0]
                assert a.op == "call_module" and a.target.startswith("quantizers."), (node.name, a.name)


def test_embeddings_are_weight_only(bert_sim):
    _, sim = bert_sim
    gather = [s for s in sim.quantizer_sites() if s.op == "Gather"]
    assert len(gather) == 3 and all(s.kind == "param" and s.symmetric and s.axis == 0 for s in gather)
    emb = sim.model.get_submodule("embeddings.word_embeddings")
    ids = torch.arange(10)[None]
    w = emb.param_quantizers["weight"].encoding.quantize_dequantize(emb.weight.detach().double()).float()
    assert torch.equal(emb(ids), w[ids])  # the rows are the table's integers times their scales


def test_the_mask_never_enters_a_quantizer(bert_sim):
    _, sim = bert_sim
    for key, q in sim.quantizers().items():
        enc = q.encoding
        assert torch.isfinite(enc.min).all() and float(enc.min.min()) > -100, key  # finfo.min / -inf never observed
    assert "Where" not in sites_by_op(sim)


def test_padding_does_not_change_unpadded_tokens(bert_sim):
    """The mask path is exact: padding a sequence leaves its real tokens' outputs unchanged."""
    _, sim = bert_sim
    ids, mask = token_batch(1, 10, 7)
    pad_ids = torch.cat([ids, torch.zeros(1, 6, dtype=ids.dtype)], 1)
    pad_mask = torch.cat([mask, torch.zeros(1, 6, dtype=mask.dtype)], 1)
    with torch.no_grad():
        a = sim.model(ids, mask).last_hidden_state
        b = sim.model(pad_ids, pad_mask).last_hidden_state[:, :10]
    assert torch.equal(a, b)


def test_sim_follows_fp32_dynamic_batch_and_sequence(bert_sim):
    model, sim = bert_sim
    for b, s in [(3, 12), (5, 24)]:
        ids, mask = token_batch(b, s, 11)
        with torch.no_grad():
            ref, out = model(ids, mask).last_hidden_state, sim.model(ids, mask).last_hidden_state
        cos = F.cosine_similarity(ref.flatten(1), out.flatten(1)).min()
        assert cos > 0.999, cos  # measured 0.9998 at W8A8 on random weights


def test_train_and_eval_switch_dropout(bert_sim):
    _, sim = bert_sim
    ids, mask = token_batch(2, 16, 5)
    sim.model.train()
    try:
        torch.manual_seed(0)
        a = sim.model(ids, mask).last_hidden_state
        torch.manual_seed(1)
        b = sim.model(ids, mask).last_hidden_state
    finally:
        sim.model.eval()
    c, d = (sim.model(ids, mask).last_hidden_state for _ in range(2))
    assert not torch.equal(a, b) and torch.equal(c, d)


def test_state_dict_round_trip_and_user_model_untouched():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sim = QuantSimModel(model, token_batch(2, 16, 0), quant_scheme="tf")
    calibrate(sim, token_batch(8, 16, 1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("quantizers" in n for n, _ in model.named_modules())
    fresh = QuantSimModel(tiny_bert(seed=3), token_batch(2, 16, 0), quant_scheme="tf")
    fresh.model.load_state_dict(sim.model.state_dict())
    ids, mask = token_batch(2, 16, 9)
    with torch.no_grad():
        assert torch.equal(fresh.model(ids, mask).last_hidden_state, sim.model(ids, mask).last_hidden_state)


def test_float_dummy_input_for_a_token_model_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="token ids"):
        QuantSimModel(tiny_bert(), torch.randn(2, 16))


def test_bert_export_runs_integer_matmuls_in_ort_and_equals_the_sim(bert_sim, bert_onnx):
    _, sim = bert_sim
    counts, float_ops, _ = optimized_graph_stats(bert_onnx)
    assert float_ops == 0, counts
    assert counts["QLinearMatMul"] == 4  # both attention matmuls of both layers
    assert counts["MatMulIntegerToFloat"] + counts.get("QGemm", 0) == 13  # 12 encoder Linears + pooler
    sess = session(bert_onnx)
    names = [i.name for i in sess.get_inputs()]
    for b, s in [(4, 16), (3, 24)]:  # dynamic batch and sequence
        ids, mask = token_batch(b, s, 21)
        out = sess.run(None, dict(zip(names, (ids.numpy(), mask.numpy()))))[0]
        with torch.no_grad():
            ref = sim.model(ids, mask).last_hidden_state.numpy()
        # measured: bit-identical (max |diff| 0.0); 1e-5 leaves room for float summation order
        assert np.abs(out - ref).max() <= 1e-5


class MhaNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.layer(self.proj(x)).mean(1))


def test_multihead_attention_is_opened_up_not_left_opaque(tmp_path):
    torch.manual_seed(0)
    model = MhaNet().eval()
    sim = QuantSimModel(model, torch.randn(2, 6, 8), quant_scheme="tf")
    assert sim.plan.unsupported == ()
    keys = {s.key for s in sim.quantizer_sites()}
    assert "layer.self_attn.out_proj.weight" in keys  # called functionally by MHA, found by its weight
    assert sites_by_op(sim).count("MatMul") == 2 and sites_by_op(sim).count("Softmax") == 1
    calibrate(sim, *[torch.randn(8, 6, 8) for _ in range(3)])
    res = sim.export(tmp_path, "mha", torch.randn(2, 6, 8))
    counts, float_ops, _ = optimized_graph_stats(res.onnx_path)
    assert float_ops == 0, counts
    x = torch.randn(16, 6, 8)
    out = session(res.onnx_path).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = sim.model(x).numpy()
    assert np.abs(out - ref).max() <= 1e-5


class SameConv(nn.Conv2d):
    """TF-style SAME padding computed from the input's shape (torch.fx cannot trace it)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def same_net():
    torch.manual_seed(0)
    net = nn.Sequential(SameConv(3, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU6(), SameConv(8, 8, 3, 1, groups=8),
                        nn.BatchNorm2d(8), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    return net.eval()


def test_shape_dependent_padding_builds_without_leaf_modules_and_quantizes_every_conv():
    net = same_net()
    sim = QuantSimModel(net, torch.randn(1, 3, 17, 17), quant_scheme="tf")
    params = [s.key for s in sim.quantizer_sites() if s.kind == "param"]
    assert params == ["0.weight", "3.weight", "8.weight"]
    assert len(sim.plan.bn_folds) == 2  # BN folded into each SAME conv
    calibrate(sim, torch.randn(8, 3, 17, 17))
    x = torch.randn(4, 3, 17, 17)
    with torch.no_grad():
        ref, out = net(x), sim.model(x)
    assert float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())) > 30  # measured 36.5 dB
    with pytest.raises(ValueError, match="dummy_input of the size you run"):
        sim.model(torch.randn(2, 3, 20, 20))  # captured at 17x17: pads were computed for it


def test_vit_attention_is_quantized_and_exports_integer(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10).eval()
    nn.init.normal_(vit.heads.head.weight, std=0.2)  # torchvision zero-initializes the head
    sim = QuantSimModel(vit, torch.randn(2, 3, 32, 32), quant_scheme="tf")
    assert sites_by_op(sim).count("MatMul") == 4 and sim.plan.unsupported == ()
    calibrate(sim, *[torch.randn(8, 3, 32, 32) for _ in range(3)])
    res = sim.export(tmp_path, "vit", torch.randn(2, 3, 32, 32))
    counts, float_ops, _ = optimized_graph_stats(res.onnx_path)
    assert float_ops == 0 and counts["QLinearMatMul"] == 4, counts
    x = torch.randn(16, 3, 32, 32)
    out = session(res.onnx_path).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = sim.model(x).numpy()
    assert np.abs(out - ref).max() <= 1e-5


def test_capture_method_is_validated_and_fx_stays_for_traceable_models():
    from qat_plugin import QuantConfigError

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    sim = QuantSimModel(net, torch.randn(1, 3, 8, 8))
    assert not any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                   for n in sim.model.graph.nodes)  # torch.fx graph: torch-level ops
    with pytest.raises(QuantConfigError, match="Did you mean 'export'"):
        QuantSimModel(net, torch.randn(1, 3, 8, 8), capture_method="exprt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = QuantSimModel(net, torch.randn(1, 3, 8, 8), capture_method="export")
    assert [s.key for s in exported.quantizer_sites()] == [s.key for s in sim.quantizer_sites()][:1] + \
        [s.key for s in exported.quantizer_sites()][1:]
    assert [s.op for s in exported.quantizer_sites()] == [s.op for s in sim.quantizer_sites()]


def test_verify_compares_token_models_and_its_cli_makes_token_inputs(bert_sim, bert_onnx, capsys):
    from qat_plugin.export.verify import main, verify

    _, sim = bert_sim
    report = verify(bert_onnx, sim, token_batch(8, 20, 3), batch_size=4)
    assert report.n_inputs == 8 and report.float_compute_ops == 0
    assert report.max_abs_diff <= 1e-5  # measured 0.0: ORT's integer kernels equal the simulation here
    assert main([bert_onnx, "--n", "6", "--seq", "12", "--vocab", "100"]) == 0
    assert "inputs compared" in capsys.readouterr().out


class TokenClassifier(__import__("pytorch_lightning").LightningModule):
    """A tiny BERT with a classification head, trained through the callback on token batches."""

    def __init__(self):
        super().__init__()
        self.net = BertHead()

    def training_step(self, batch, batch_idx):
        ids, mask, y = batch
        return F.cross_entropy(self.net(ids, mask), y)

    def validation_step(self, batch, batch_idx):
        ids, mask, y = batch
        self.log("val_loss", F.cross_entropy(self.net(ids, mask), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class BertHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.bert = tiny_bert(dropout=0.0)  # Lightning does not restore the RNG: no dropout for exact resume
        self.head = nn.Linear(32, 2)

    def forward(self, ids, mask):
        return self.head(self.bert(ids, mask).last_hidden_state[:, 0])


def token_loader():
    from torch.utils.data import DataLoader, TensorDataset

    ids, mask = token_batch(64, 12, 4)
    y = (ids[:, 0] % 2).long()
    return DataLoader(TensorDataset(ids, mask, y), batch_size=16)


def test_callback_fits_and_resumes_a_transformer_with_learned_ranges(tmp_path):
    """Stopped at step 4, inside the annealing window, and resumed: equal to the straight run
    (with the 16-bit residual stream and its split LayerNorm outputs)."""
    import pytorch_lightning as pl

    from qat_plugin.callbacks import QuantizationAwareTraining

    def run(max_steps, ckpt=None):
        torch.manual_seed(0)
        qat = QuantizationAwareTraining(quant_scheme="tf", calibration_batches=2, learn_ranges=True,
                                        input_fn=lambda b: (b[0], b[1]), residual_stream_bw=16,
                                        annealing=dict(end_step=6, every_n_steps=2, stat_batches=1))
        trainer = pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, max_steps=max_steps,
                             callbacks=[qat], logger=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=1, deterministic=True)
        module = TokenClassifier()
        trainer.fit(module, token_loader(), token_loader(), ckpt_path=ckpt)
        return trainer, module, qat

    trainer, module, qat = run(4)
    assert module.net is qat.sim.model and qat.applied_steps == 4
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(qat.sim.quantizers()["bert.encoder.layer.0.attention.self.query.weight"].scale) in opt_params
    split = [k for k in qat.sim.quantizers() if "_layer_norm_output_to_" in k]  # residual_stream_bw=16
    assert len(split) == 4 and all(qat.sim.quantizers()[k].bitwidth == 16 for k in split)
    ckpt = str(tmp_path / "four.ckpt")
    trainer.save_checkpoint(ckpt)
    _, straight, _ = run(8)
    _, resumed, _ = run(8, ckpt)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    diff = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}
    assert max(diff.values()) == 0.0, {k: v for k, v in diff.items() if v}


def test_an_untrained_torch_transformer_encoder_exports_and_matches(tmp_path):
    """nn.TransformerEncoder deep-copies its layer, so untrained its layers have equal weights; the
    exporter's optimizer merged their initializers and the export failed ('did not become integer
    initializers') until the weights were folded before that optimizer ran."""
    from qat_plugin.export import verify

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(32, 6, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = calibrate(QuantSimModel(model, x[:2]), x)
        res = sim.export(tmp_path, "encoder", x[:2])
    report = verify(res.onnx_path, sim, torch.randn(16, 6, 16))
    assert report.sqnr_db == float("inf"), str(report)  # measured: bit-exact
    assert len({k for k in res.tensor_sites.values() if sim.plan.site(k).kind == "param"}) == 8
