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


# ---- the cases where BatchNorm is NOT folded: it stays a float BN, between quantizers -------

class _TwoUsers(nn.Module):
    """The conv's output feeds the BN and a second op: folding would change the second user."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _ReusedConv(nn.Module):
    """One conv module called twice, once before a BN: its weight serves both calls."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


class _ReusedBn(nn.Module):
    """One BN module after two convs: it cannot be folded into both."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


class _ChannelMismatch(nn.Module):
    """Linear on (N, L, C) feeds BatchNorm1d(L): the BN's channels (dim 1) are not the layer's
    output features (the last dim), so the BN cannot be folded into the weights."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


NOT_FOLDED = {
    "conv with two users": (_TwoUsers, (2, 3, 6, 6)),
    "reused conv": (_ReusedConv, (2, 4, 6, 6)),
    "reused bn": (_ReusedBn, (2, 3, 6, 6)),
    "bn without running stats": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
                                 (4, 3, 6, 6)),
    "channel mismatch": (_ChannelMismatch, (4, 5, 4)),
}


@pytest.mark.parametrize("case", sorted(NOT_FOLDED))
def test_batch_norm_that_cannot_be_folded_stays_float_and_exact(case):
    """Each tiny graph keeps its BatchNorm (no fold in the plan, a BN module left in the sim) and,
    with quantizers bypassed, the simulation is still the float model; with quantizers on, a
    quantizer follows the BN (its output is a value-changing op's output)."""
    from qat_plugin import QuantSimModel

    make, shape = NOT_FOLDED[case]
    model = randomize_bn(make()).eval()
    x = torch.randn(shape)
    sim = calibrate(QuantSimModel(model, x, quant_scheme="tf"), x)
    assert sim.plan.bn_folds == ()
    bns = [m for m in sim.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 1
    with torch.no_grad():
        quantized = sim.model(x)
        for q in sim.quantizers().values():
            q.enabled = False
        torch.testing.assert_close(sim.model(x), model(x), rtol=1e-6, atol=1e-6)
    assert not torch.equal(quantized, model(x))  # the quantizers were really on
    assert any(s.op == "BatchNormalization" for s in sim.quantizer_sites()), sim.quantizer_sites()


def test_batch_norm_is_folded_when_the_same_graph_allows_it():
    """Control for the cases above: conv -> BN with one user, each module called once."""
    from qat_plugin import QuantSimModel

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    x = torch.randn(4, 3, 6, 6)
    sim = calibrate(QuantSimModel(model, x, quant_scheme="tf"), x)
    assert len(sim.plan.bn_folds) == 1
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in sim.model.modules())
