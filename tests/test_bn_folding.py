"""BatchNorm folding is exact: checked in float64 against the unfolded model."""
import pytest
import torch
from torch import nn

from qat_plugin.graph.apply import fold_batch_norm_
from helpers import calibrate, randomize_bn


@pytest.mark.parametrize("layer, bn, shape", [
    (nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6), (2, 6, 7, 7)),  # depthwise
    (nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), (2, 3, 9)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), (2, 4, 5, 5)),  # grouped transpose
    (nn.Linear(8, 5), nn.BatchNorm1d(5), (3, 8)),
])
def test_fold_is_exact_in_float64(layer, bn, shape):
    model = randomize_bn(nn.Sequential(layer, bn)).double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        fold_batch_norm_(model[0], model[1])
        got = model[0](x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_fold_without_affine_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)).double().eval()
    model[1].running_var.uniform_(0.5, 2)
    model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        fold_batch_norm_(model[0], model[1])
        torch.testing.assert_close(model[0](x), expected, rtol=1e-12, atol=1e-12)


def test_quantsim_folds_and_matches_float_with_quantizers_disabled():
    from qat_plugin import QuantSimModel

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.ReLU6())).eval()
    x = torch.randn(2, 3, 9, 9)
    sim = calibrate(QuantSimModel(model, x), x)
    assert len(sim.plan.bn_folds) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sim.model.modules())
    for q in sim.quantizers().values():
        q.enabled = False
    with torch.no_grad():
        torch.testing.assert_close(sim.model(x), model(x), rtol=1e-5, atol=1e-5)


def _conv_bn_model():
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                                      nn.Flatten(), nn.Linear(8 * 5 * 5, 4), nn.BatchNorm1d(4))).eval()


def test_simulated_folding_equals_static_folding_in_eval():
    from qat_plugin import QuantSimModel

    x = torch.randn(8, 3, 9, 9)
    model = _conv_bn_model()
    static = calibrate(QuantSimModel(model, x, quant_scheme="tf"), x)
    simulated = calibrate(QuantSimModel(model, x, quant_scheme="tf", bn_folding="simulated"), x)
    assert [s.key for s in static.quantizer_sites()] == [s.key for s in simulated.quantizer_sites()]
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in simulated.model.modules()) == 3
    for k, q in static.quantizers().items():
        torch.testing.assert_close(q.encoding.scale, simulated.quantizers()[k].encoding.scale)
    with torch.no_grad():
        torch.testing.assert_close(simulated.model(x), static.model(x), rtol=1e-5, atol=1e-5)


def test_simulated_folding_trains_statistics_until_frozen():
    from qat_plugin import QuantSimModel

    x = torch.randn(8, 3, 9, 9)
    sim = calibrate(QuantSimModel(_conv_bn_model(), x, bn_folding="simulated"), x)
    bn = sim.model.get_submodule("0").bn
    before = bn.running_mean.clone()
    sim.model.train()
    train_out = sim.model(x * 3 + 1)  # batch statistics differ from the running ones
    assert not torch.equal(bn.running_mean, before)
    sim.model.eval()
    with torch.no_grad():
        assert not torch.allclose(train_out, sim.model(x * 3 + 1))
    assert sim.freeze_batch_norm() == 3
    sim.model.train()
    frozen = bn.running_mean.clone()
    out_train = sim.model(x)
    assert torch.equal(bn.running_mean, frozen) and not bn.training
    sim.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out_train.detach(), sim.model(x))  # frozen: train == eval == folded


def test_simulated_folding_exports_and_matches(tmp_path):
    from qat_plugin import QuantSimModel
    from qat_plugin.export import verify

    x = torch.randn(32, 3, 9, 9)
    sim = calibrate(QuantSimModel(_conv_bn_model(), x[:2], bn_folding="simulated"), x)
    sim.model.train()
    sim.model(x * 2)  # statistics move away from the original BN
    sim.freeze_batch_norm()
    res = sim.export(str(tmp_path), "m", x[:1])
    report = verify(res.onnx_path, sim, torch.randn(64, 3, 9, 9))
    assert report.sqnr_db > 35 and report.float_compute_ops == 0
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in sim.model.modules()) == 3  # sim untouched


def test_bad_bn_folding():
    from qat_plugin import QuantConfigError, QuantSimModel
    with pytest.raises(QuantConfigError, match="Did you mean 'simulated'"):
        QuantSimModel(_conv_bn_model(), torch.randn(2, 3, 9, 9), bn_folding="simulate")
