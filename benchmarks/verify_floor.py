"""ORT vs simulation beside the simulation's own noise floor, as ``verify`` reports them.

    .venv/bin/python benchmarks/verify_floor.py [--n 256] [--size 32]

For each model (random weights, BatchNorm statistics randomized, W8A8 default preset, min-max
calibration on 32 random inputs): export, then ``verify(onnx, sim, inputs)`` on ``--n`` other
random inputs. Prints one table: ORT vs sim SQNR, the floor (sim vs itself with each activation
quantizer's input perturbed by 1e-7 relative; batch 1 vs batch N) and the verdict.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import calibrate, randomize_bn  # noqa: E402

from qat_plugin import QuantSimModel  # noqa: E402
from qat_plugin.export import verify  # noqa: E402


def tiny_conv_bn_relu() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Flatten(), nn.LazyLinear(10))


MODELS = {
    "conv-bn-relu x2 + linear (tiny)": (tiny_conv_bn_relu, 8),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), None),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), None),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rows = []
    for name, (make, size) in MODELS.items():
        size = size or args.size
        model = make()
        model(torch.randn(2, 3, size, size))  # materialize lazy layers
        model = randomize_bn(model).eval()
        x = torch.randn(32, 3, size, size)
        sim = calibrate(QuantSimModel(model, x[:2], quant_scheme="tf"), x)
        with tempfile.TemporaryDirectory() as d:
            res = sim.export(d, "m", x[:1])
            r = verify(res.onnx_path, sim, torch.randn(args.n, 3, size, size), threads=1)
        rows.append((name, f"{r.sqnr_db:.1f}", f"{r.perturbed_sqnr_db:.1f}", f"{r.batch_sqnr_db:.1f}",
                     f"{r.floor_sqnr_db:.1f}", "at the floor" if r.within_floor else "BELOW the floor",
                     f"{100 * r.top1_agreement:.2f}"))
        print(f"done: {name}", file=sys.stderr, flush=True)
    head = ("model", "ORT vs sim dB", "perturbed 1e-7 dB", "batch 1 vs N dB", "floor dB", "verdict (3 dB margin)",
            "top-1 agreement %")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print(f"\nrandom weights, {args.n} random inputs, W8A8 default preset, tf calibration; torch {torch.__version__}")


if __name__ == "__main__":
    main()
