"""Post-training tools: CLE + high-bias absorption, bias correction, AdaRound, PTQConfig."""
import copy
import json
import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from qat_plugin import NotCalibratedError, QuantConfigError, QuantSimModel
from qat_plugin.ptq import PTQConfig, apply_adaround, correct_bias, equalize_model

pytestmark = [pytest.mark.filterwarnings("ignore:.*left in float.*"),
              pytest.mark.filterwarnings("ignore:.*TracerWarning.*"),
              pytest.mark.filterwarnings("ignore:.*LightningCLI's args parameter.*"),
              pytest.mark.filterwarnings("ignore:.*does not have many workers.*")]


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(0.1, 3)
        bn.bias.uniform_(-1, 1)
    return bn


def _spread(layer, lo=-2.0, hi=1.5):
    """Give a layer channel ranges that differ by orders of magnitude (what CLE fixes)."""
    with torch.no_grad():
        f = torch.logspace(lo, hi, layer.weight.shape[0])[torch.randperm(layer.weight.shape[0])]
        layer.weight.mul_(f.reshape(-1, *([1] * (layer.weight.dim() - 1))))
    return layer


def conv_pair():
    return nn.Sequential(_spread(nn.Conv2d(3, 8, 3, padding=1)), _bn(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))


def depthwise_chain():
    return nn.Sequential(_spread(nn.Conv2d(3, 8, 1)), _bn(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding=1),
                         _bn(8), nn.LeakyReLU(0.1), nn.Conv2d(8, 5, 1))


def linear_pair():
    return nn.Sequential(nn.Flatten(), _spread(nn.Linear(3 * 6 * 6, 16)), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 4))


def _ranges(w, dim):
    return w.detach().abs().transpose(0, dim).reshape(w.shape[dim], -1).amax(1)


@pytest.mark.parametrize("build", [conv_pair, depthwise_chain, linear_pair])
def test_cle_keeps_fp32_output_and_equalizes_ranges(build):
    """Given a float64 model with BN and spread-out channel ranges, when equalized (no high-bias
    absorption), then its output is unchanged to float64 error and paired ranges are equal."""
    model = build().double().eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    first = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))][0]
    spread_before = float(_ranges(first.weight, 0).max() / _ranges(first.weight, 0).min())
    equalize_model(model, x, absorb_high_bias=False)
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12 * float(ref.abs().max())), float((out - ref).abs().max())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    a, b = layers[-2], layers[-1]
    rb = _ranges(b.weight, 0 if getattr(b, "groups", 1) > 1 else 1)
    torch.testing.assert_close(_ranges(a.weight, 0), rb, rtol=1e-3, atol=0)
    assert float(_ranges(first.weight, 0).max() / _ranges(first.weight, 0).min()) < spread_before / 10


def test_cle_high_bias_absorption_moves_bias_and_keeps_output():
    """Given BN statistics measured on the data, high-bias absorption lowers the first layer's
    bias and changes the output by less than the data's 3-sigma tail allows."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.Conv2d(8, 4, 1)).double()
    with torch.no_grad():
        model[0].bias.fill_(3.0)  # high pre-activations: most of the bias never gets clipped
        model[1].weight.fill_(1.0)
        model[1].bias.fill_(4.0)
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    model.train()
    model(x)  # BN statistics from this data, then a variance 4x larger: the normalized
    model.eval()  # pre-activation is 4 + 0.5 z, and none falls below c = 4 - 3 = 1 (z < -6)
    with torch.no_grad():
        model[1].running_var.mul_(4)
        ref = model(x)
    bn = model[1]
    folded = (3.0 - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) + 4.0  # the folded bias before CLE
    plain = copy.deepcopy(model)
    equalize_model(plain, x, absorb_high_bias=False)
    equalize_model(model, x)
    # beta = 4, |gamma| = 1: c = beta - 3 |gamma| = 1 (before CLE's scaling) moves into the next layer
    torch.testing.assert_close(model[0].bias / plain[0].bias, (folded - 1) / folded, rtol=1e-12, atol=0)
    assert bool((model[3].bias > plain[3].bias + 1e-3).any())
    with torch.no_grad():
        rel = float((model(x) - ref).abs().max() / ref.abs().max())
    assert rel < 1e-12, rel  # exact where no pre-activation falls below c


def test_cle_without_pairs_warns_and_changes_nothing(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 2, 3)).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="no equalizable pair"), caplog.at_level(logging.WARNING, "qat_plugin.ptq"):
        equalize_model(model, torch.randn(1, 3, 8, 8))
    assert "no equalizable pair" in caplog.text
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_cle_relu6_skip_or_replace():
    model = nn.Sequential(_spread(nn.Conv2d(3, 8, 1)), nn.ReLU6(), nn.Conv2d(8, 4, 1)).double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="ReLU6"):
        equalize_model(model, x)  # skip: exact, nothing to do
    assert isinstance(model[1], nn.ReLU6)
    equalize_model(model, x, relu6="relu")
    assert type(model[1]) is nn.ReLU
    torch.testing.assert_close(_ranges(model[0].weight, 0), _ranges(model[2].weight, 1), rtol=1e-6, atol=0)
    with pytest.raises(QuantConfigError, match="Did you mean 'relu'"):
        equalize_model(model, x, relu6="rlu")


def _calibrated(model, data, **kw):
    sim = QuantSimModel(model, data[0], **kw)
    sim.compute_encodings(lambda m, _: [m(x) for x in data])
    return sim


def test_correct_bias_moves_mean_output_shift_toward_zero():
    """Given W4 per-tensor weights (a visible mean shift), bias correction shrinks the mean
    output error against FP32 at every quantized layer's output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    data = [torch.randn(16, 3, 10, 10) + 0.5 for _ in range(4)]
    sim = _calibrated(model, data, default_param_bw=4, quant_scheme="tf",
                      config_file={"name": "pt", "defaults": {"per_channel_quantization": False}})
    with torch.no_grad():
        fp = torch.cat([model(x) for x in data])
        shift_before = (fp - torch.cat([sim.model(x) for x in data])).mean((0, 2, 3)).abs()
        shifts = correct_bias(sim, data, progress=False)
        shift_after = (fp - torch.cat([sim.model(x) for x in data])).mean((0, 2, 3)).abs()
    assert set(shifts) == {"0", "2"}
    assert float(shift_after.max()) < 0.2 * float(shift_before.max()), (shift_before, shift_after)


def _tiny_adaround_setup(bits=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 6)).eval()
    # spatially correlated inputs (as images are): with white inputs nearest rounding is already optimal
    data = [torch.randn(16, 4, 1, 1) + 0.3 * torch.randn(16, 4, 5, 5) for _ in range(4)]
    return model, data, _calibrated(model, data, default_param_bw=bits, quant_scheme="tf")


def test_adaround_learns_integers_within_floor_ceil_with_lower_error(tmp_path):
    """Given a calibrated W4 sim, AdaRound's reconstruction error is <= nearest rounding's on
    every layer, each learned integer is floor or ceil of w/s, and the weights sit on the grid
    with the weight encodings unchanged."""
    model, data, sim = _tiny_adaround_setup()
    encs = {k: q.encoding for k, q in sim.quantizers().items() if sim.plan.site(k).kind == "param"}
    before = {n: sim.model.get_submodule(n).weight.detach().clone() for n in ("0", "3")}
    report = apply_adaround(sim, data, num_iterations=200, progress=False)
    assert [l.name for l in report.layers] == ["0", "3"]
    for l in report.layers:
        assert l.mse_adaround <= l.mse_nearest, str(report)
    assert report.layers[0].mse_adaround < 0.75 * report.layers[0].mse_nearest, str(report)  # measured 0.594
    assert any(l.changed > 0 for l in report.layers)
    for key, enc in encs.items():
        q = sim.quantizers()[key]
        assert torch.equal(q.encoding.scale, enc.scale) and torch.equal(q.encoding.offset, enc.offset)
        layer = sim.model.get_submodule(sim.plan.site(key).module)
        w0, w = before[sim.plan.site(key).module].double(), layer.weight.detach().double()
        s = enc.scale.reshape(-1, *([1] * (w.dim() - 1)))
        n = torch.round(w / s)
        assert torch.allclose(w, n * s, rtol=0, atol=1e-6 * float(s.max()))  # on the grid
        assert torch.equal(enc.quantize_dequantize(w), n * s) or torch.allclose(enc.quantize_dequantize(w), w, atol=1e-6)
        assert bool(((n == torch.floor(w0 / s)) | (n == torch.ceil(w0 / s))).all())


@pytest.mark.parametrize("target", ["fp32_outputs", "float_weights"])
def test_adaround_targets_end_at_or_below_nearest(target):
    """Both targets: every layer ends at or below nearest rounding's error against its target
    (fp32_outputs, the default: the FP32 network's own layer outputs; float_weights: the layer's
    float weights on the same inputs)."""
    model, data, sim = _tiny_adaround_setup()
    report = apply_adaround(sim, data, num_iterations=100, target=target, progress=False)
    assert report.target == target
    assert all(l.mse_adaround <= l.mse_nearest for l in report.layers), str(report)
    assert all(l.seconds > 0 for l in report.layers) and report.optimize_seconds <= report.seconds
    with pytest.raises(QuantConfigError, match="Did you mean 'fp32_outputs'"):
        apply_adaround(sim, data, target="fp32_output", progress=False)


def test_adaround_fp32_outputs_one_pass_equals_one_pass_per_layer(monkeypatch):
    """The default target runs the data once, rounding layer by layer inside the forward pass;
    each layer sees exactly the inputs a separate pass after the earlier layers were rounded
    gives (same learned weights, bit for bit), with 2 passes + re-calibration instead of one
    pass per layer."""
    import qat_plugin.ptq.adaround as adaround

    model, data, _ = _tiny_adaround_setup()
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 5 * 5, 6)).eval()
    joined = [torch.cat(data)]
    weights, forwards = {}, {}
    for mode in ("one pass", "pass per layer"):
        sim = _calibrated(model, data, default_param_bw=4, quant_scheme="tf")
        if mode == "pass per layer":
            monkeypatch.setattr(adaround, "_join", lambda batches: None)
        count = {"n": 0}
        handle = sim.model.register_forward_pre_hook(lambda *a: count.__setitem__("n", count["n"] + 1))
        apply_adaround(sim, joined, num_iterations=30, progress=False)
        handle.remove()
        forwards[mode] = count["n"]
        weights[mode] = {n: sim.model.get_submodule(n).weight.detach().clone() for n in ("0", "2", "5")}
    for name in ("0", "2", "5"):
        assert torch.equal(weights["one pass"][name], weights["pass per layer"][name]), name
    assert forwards == {"one pass": 3, "pass per layer": 5}  # FP32 + AdaRound (+ 1 per layer) + activation encodings


def test_adaround_export_carries_learned_integers(tmp_path):
    """The exported INT8 initializers and the encodings file hold exactly the learned integers."""
    model, data, sim = _tiny_adaround_setup(bits=8)
    apply_adaround(sim, data, num_iterations=50, progress=False)
    res = sim.export(str(tmp_path), "m", data[0][:1])
    proto = onnx.load(res.onnx_path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    encodings = json.load(open(res.encodings_path))["param_encodings"]
    checked = 0
    for name in ("0", "3"):
        layer, key = sim.model.get_submodule(name), next(k for k, q in sim.quantizers().items()
                                                         if sim.plan.site(k).module == name)
        enc = sim.quantizers()[key].encoding
        w = layer.weight.detach().double()
        learned = torch.round(w / enc.scale.reshape(-1, *([1] * (w.dim() - 1)))).to(torch.int64).numpy()
        tensor = next(t for t, k in res.tensor_sites.items() if k == key)
        q = next(v for n, v in inits.items() if n.startswith(tensor) and v.dtype == np.int8)
        np.testing.assert_array_equal(q.astype(np.int64), learned)
        np.testing.assert_allclose([e["scale"] for e in encodings[tensor]], enc.scale.numpy(), rtol=1e-12)
        checked += 1
    assert checked == 2


def test_adaround_refuses_uncalibrated_sim_and_empty_data():
    model, data, _ = _tiny_adaround_setup()
    raw = QuantSimModel(model, data[0])
    with pytest.raises(NotCalibratedError, match="compute_encodings"):
        apply_adaround(raw, data, progress=False)
    _, _, sim = _tiny_adaround_setup()
    state = copy.deepcopy(sim.model.state_dict())
    for call in (lambda: apply_adaround(sim, [], progress=False), lambda: correct_bias(sim, iter(()), progress=False)):
        with pytest.raises(ValueError, match="data is empty"):
            call()
    for k, v in sim.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(QuantConfigError, match="beta_range"):
        apply_adaround(sim, data, beta_range=(2, 20), progress=False)


def test_ptq_config_validates_and_runs_in_order():
    with pytest.raises(QuantConfigError, match="Did you mean 'bias_correction'"):
        PTQConfig.from_value({"bias_corection": True})
    with pytest.raises(QuantConfigError, match="Did you mean 'skip'"):
        PTQConfig.from_value({"relu6": "skp"})
    assert PTQConfig.from_value(False) is None
    cfg = PTQConfig.from_value({"cle": True, "adaround": {"num_iterations": 20, "progress": False},
                                "bias_correction": {"progress": False}})
    model = conv_pair().eval()
    data = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    cfg.prepare(model, data[0])
    sim = _calibrated(model, data, default_param_bw=4)
    out = cfg.apply(sim, data)
    assert set(out) == {"adaround", "bias_correction"} and len(out["adaround"].layers) == 2


def test_callback_runs_ptq_steps_after_calibration(tmp_path):
    """Given ptq= on the QAT callback, CLE runs on the FP32 network in setup and AdaRound + bias
    correction right after calibration, before the first training step."""
    import pytorch_lightning as pl

    from lightning_helpers import DigitsModule, loaders
    from qat_plugin.callbacks import QuantizationAwareTraining

    with pytest.raises(QuantConfigError, match="Did you mean 'adaround'"):
        QuantizationAwareTraining(ptq={"adaroud": True})
    train, val = loaders(batch_size=32)
    qat = QuantizationAwareTraining(quant_scheme="tf", default_param_bw=4, calibration_batches=2,
                                    ptq={"cle": True, "adaround": {"num_iterations": 10, "progress": False},
                                         "bias_correction": {"progress": False}})
    trainer = pl.Trainer(max_steps=2, callbacks=[qat], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="no equalizable pair"):  # SmallNet's ReLU output feeds two users
        trainer.fit(DigitsModule(), train, val)
    report = qat.ptq_report
    assert [l.name for l in report["adaround"].layers] == ["conv1", "conv2", "fc"]
    assert set(report["bias_correction"]) == {l.name for l in report["adaround"].layers}


@pytest.mark.parametrize("recipe", ["mobilenet_v2_w4a8_ptq", "mobilenet_v2_w4a8_distill"])
def test_new_recipes_parse(recipe):
    import os

    from qat_plugin.callbacks import QuantizationAwareTraining
    from qat_plugin.cli import QatCLI

    path = os.path.join(os.path.dirname(__file__), "..", "recipes", f"{recipe}.yaml")
    cli = QatCLI(args=["--config", path, "--trainer.logger", "false"], run=False,
                 subclass_mode_model=True, subclass_mode_data=True)
    qat = next(c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareTraining))
    if recipe.endswith("ptq"):
        assert qat.ptq.cle and qat.ptq.adaround == {"num_iterations": 200}
    else:
        assert cli.model.hparams.distillation == {"temperature": 4.0} and cli.datamodule.labels is False


class _TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc = nn.Embedding(50, 16), nn.Linear(16, 8)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def test_ptq_tools_leave_embedding_tables_alone():
    """A token model (Embedding -> Linear): bias correction and AdaRound treat the Linear only;
    the table keeps its nearest-rounded integers (it has no bias: correcting one used to fail)."""
    ids = [torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    sim = QuantSimModel(_TokenNet(), ids[0], default_param_bw=4)
    sim.compute_encodings(lambda m, _: [m(x) for x in ids])
    table = sim.model.emb.weight.detach().clone()
    shifts = correct_bias(sim, ids, progress=False)
    assert sorted(shifts) == ["fc"]
    report = apply_adaround(sim, ids, num_iterations=20, progress=False)
    assert [r.name for r in report.layers] == ["fc"]
    assert torch.equal(sim.model.emb.weight, table)
