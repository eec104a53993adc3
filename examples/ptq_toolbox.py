"""Post-training toolbox in a plain script: CLE -> W4A8 PTQ with AdaRound (+ bias correction)
-> label-free QAT by distillation -> INT8 ONNX export.

    python examples/ptq_toolbox.py [--warmup-steps 150] [--qat-steps 60] [--out ptq_out]

Every step prints the validation accuracy on scikit-learn's bundled digits.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision

from qat_plugin import QuantSimModel
from qat_plugin.data import digits_tensors
from qat_plugin.distillation import Distiller
from qat_plugin.ptq import apply_adaround, correct_bias, equalize_model


@torch.no_grad()
def accuracy(net, x, y) -> float:
    net.eval()
    return 100.0 * float((net(x).argmax(1) == y).float().mean())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup-steps", type=int, default=150, help="FP32 training before quantization")
    p.add_argument("--qat-steps", type=int, default=60)
    p.add_argument("--adaround-iterations", type=int, default=200)
    p.add_argument("--out", default="ptq_out")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x, y, xv, yv = digits_tensors(image_size=32)
    results = {}

    # 1. an FP32 model (here: a short warm-up from scratch; normally your trained model)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(args.warmup_steps):
        idx = torch.randint(0, len(y), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    results["FP32"] = accuracy(model, xv, yv)
    calib = [x[i:i + 32] for i in range(0, 256, 32)]  # images only: no labels from here on

    # 2. cross-layer equalization + high-bias absorption on the FP32 model (BN folded; same function)
    equalize_model(model, calib[0])
    results["FP32 after CLE"] = accuracy(model, xv, yv)

    # 3. W4A8 simulation, calibrated; then AdaRound learns each weight's rounding
    sim = QuantSimModel(model, calib[0], quant_scheme="tf_enhanced", param_quant_scheme="tf",
                        default_param_bw=4, default_output_bw=8)
    sim.compute_encodings(lambda m, _: [m(b) for b in calib])
    results["W4A8 nearest"] = accuracy(sim.model, xv, yv)
    report = apply_adaround(sim, calib, num_iterations=args.adaround_iterations)
    print(report)
    results["W4A8 AdaRound"] = accuracy(sim.model, xv, yv)
    correct_bias(sim, calib)
    results["W4A8 AdaRound + bias correction"] = accuracy(sim.model, xv, yv)

    # 4. label-free QAT: the frozen FP32 model teaches the quantized one (no labels read)
    distiller = Distiller(model, temperature=4.0)
    opt = torch.optim.SGD(sim.model.parameters(), lr=2e-3, momentum=0.9)
    sim.model.train()
    for step in range(args.qat_steps):
        xb = x[torch.randint(0, len(x), (64,))]
        loss = distiller.loss(sim.model(xb), xb)
        opt.zero_grad(); loss.backward(); opt.step()
    results["W4A8 + distillation QAT (no labels)"] = accuracy(sim.model, xv, yv)

    # 5. INT8/INT4 ONNX export: the initializers carry AdaRound's integers (moved by QAT since)
    res = sim.export(args.out, "model", x[:1])
    for k, v in results.items():
        print(f"{k:40s} {v:6.2f}")
    print(f"ONNX: {res.onnx_path}\nencodings: {res.encodings_path}")
    return results


if __name__ == "__main__":
    main()
