"""BatchNorm folding is exact: checked in float64 against the unfolded model."""
import pytest
import torch
from torch import nn

from qat_plugin.graph.apply import fold_batch_norm_
from test_placement import randomize_bn


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
    from conftest import calibrate

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
