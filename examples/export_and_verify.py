"""Export a calibrated simulation to INT8 ONNX and check it in ONNX Runtime.

    python examples/export_and_verify.py [--out out/]
"""
from __future__ import annotations

import argparse
import tempfile

import torch
import torchvision

from qat_plugin import QuantSimModel
from qat_plugin.data import digits_tensors
from qat_plugin.export import load_encodings, verify


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp()
    torch.manual_seed(0)
    x, _, xv, _ = digits_tensors(image_size=32)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()  # your trained model here
    sim = QuantSimModel(model, x[:2])
    sim.compute_encodings(lambda m, _: [m(x[i:i + 64]) for i in range(0, 256, 64)])
    res = sim.export(out, "mobilenet_v2", x[:1], export_fp32=True)
    print(f"wrote {res.onnx_path}, {res.encodings_path}, {res.fp32_path} (opset {res.opset})")
    encodings = load_encodings(res.encodings_path)
    print(f"{len(encodings.activation_encodings)} activation and {len(encodings.param_encodings)} weight encodings")
    report = verify(res.onnx_path, sim, xv)
    print(report)
    return report


if __name__ == "__main__":
    main()
