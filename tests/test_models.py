"""Site counts on torchvision models equal a hand-derived expectation."""
import pytest
import torch
import torchvision

from qat_plugin import QuantSimModel
from helpers import calibrate


def count(sim):
    out = {"input": 0, "output": 0, "param": 0}
    for s in sim.quantizer_sites():
        out[s.kind] += 1
    return out


def test_resnet18_sites():
    """resnet18: the input; stem conv+bn+relu (1); per BasicBlock conv1+bn1+relu (1),
    conv2+bn2 (1), add+relu (1), plus conv+bn downsample in layer2/3/4 (3); avgpool (1); fc (1).
    Outputs: 1 + 8*3 + 3 + 1 + 1 = 30. Weights: 20 convs + fc = 21. maxpool/flatten: none."""
    sim = QuantSimModel(torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32))
    assert count(sim) == {"input": 1, "output": 30, "param": 21}
    assert len(sim.plan.bn_folds) == 20
    ops = [s.op for s in sim.quantizer_sites() if s.kind == "output"]
    assert ops.count("Add+Relu") == 8 and ops.count("Conv+BatchNormalization+Relu") == 9
    assert ops.count("Conv+BatchNormalization") == 8 + 3


def test_mobilenet_v2_sites():
    """mobilenet_v2: stem conv+bn+relu6 (1); block 1 (t=1): dw conv+bn+relu6, pw conv+bn (2);
    16 blocks: expand, dw (conv+bn+relu6 each), project conv+bn (3 each = 48); residual adds
    where stride 1 and in == out: 0+1+2+3+2+2+0 = 10; last 1x1 conv+bn+relu6 (1);
    adaptive_avg_pool2d (1); dropout/flatten: none; classifier linear (1).
    Outputs: 1 + 2 + 48 + 10 + 1 + 1 + 1 = 64; weights: 52 convs + linear = 53."""
    sim = QuantSimModel(torchvision.models.mobilenet_v2(num_classes=10).eval(), torch.randn(1, 3, 32, 32))
    assert count(sim) == {"input": 1, "output": 64, "param": 53}
    ops = [s.op for s in sim.quantizer_sites() if s.kind == "output"]
    assert ops.count("Add") == 10 and ops.count("Conv+BatchNormalization+Clip") == 1 + 1 + 32 + 1
    heads = [s.where.split(" .. ")[0] for s in sim.quantizer_sites() if s.op == "Conv+BatchNormalization+Clip"]
    depthwise = [h for h in heads if sim.model.get_submodule(h).groups > 1]
    assert len(depthwise) == 17  # every depthwise conv+bn+relu6 is one group


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_w8a8_simulation_tracks_float(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    for m in model.modules():  # give BN realistic statistics so activations are not degenerate
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 3, 32, 32)
    sim = calibrate(QuantSimModel(model, x, quant_scheme="tf"), x)
    with torch.no_grad():
        ref, out = model(x), sim.model(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert sqnr > 15, f"W8A8 simulation SQNR {sqnr:.1f} dB"
