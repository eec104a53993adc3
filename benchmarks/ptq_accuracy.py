"""PTQ accuracy of the simulation on digits, per quant scheme, and calibration speed.

    python benchmarks/ptq_accuracy.py [--epochs 8] [--models resnet18 mobilenet_v2]

Trains each torchvision model briefly on scikit-learn's bundled digits (32x32, 3 channels),
then prints one table: FP32 and simulated W8A8 / W4A8 / W8A8-per-tensor validation accuracy
for each quant scheme, and compute_encodings time as a ratio to one plain FP32 forward pass
over the same calibration batches (measured in the same run).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import accuracy, batches, markdown_table, train_fp32  # noqa: E402

from qat_plugin import QuantSimModel  # noqa: E402

PER_TENSOR = {"name": "default-per-tensor", "defaults": {"per_channel_quantization": False},
              "supergroups": [{"op_list": ["Conv", "BatchNormalization", "Relu"]},
                              {"op_list": ["Conv", "BatchNormalization", "Clip"]},
                              {"op_list": ["Add", "Relu"]}, {"op_list": ["Gemm", "Relu"]}]}


def calibration_batches(x, n_batches=8, batch_size=32):
    return [xb for _, (xb, _) in zip(range(n_batches), batches(x, torch.zeros(len(x)), batch_size))]


def fp32_forward_time(model, calib, repeats=3):
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for xb in calib:
                model(xb)
            best = min(best, time.perf_counter() - t0)
    return best


def run(name: str, epochs: int, schemes, log=print):
    model, (x_tr, y_tr, x_va, y_va) = train_fp32(name, epochs, log=log)
    fp32 = accuracy(model, x_va, y_va)
    calib = calibration_batches(x_tr)
    t_fp32 = fp32_forward_time(model, calib)
    rows = []
    for scheme in schemes:
        accs = {}
        for label, pbw, abw, cfg in [("W8A8", 8, 8, None), ("W4A8", 4, 8, None), ("W8A8 per-tensor", 8, 8, PER_TENSOR)]:
            sim = QuantSimModel(model, calib[0], quant_scheme=scheme, default_param_bw=pbw, default_output_bw=abw,
                                config_file=cfg)
            t0 = time.perf_counter()
            sim.compute_encodings(lambda m, _: [m(xb) for xb in calib])
            elapsed = time.perf_counter() - t0
            if label == "W8A8":
                ratio = elapsed / t_fp32
            accs[label] = accuracy(sim.model, x_va, y_va)
        rows.append([name, scheme, f"{fp32:.2f}", f"{accs['W8A8']:.2f}", f"{accs['W8A8'] - fp32:+.2f}",
                     f"{accs['W4A8']:.2f}", f"{accs['W8A8 per-tensor']:.2f}", f"{ratio:.1f}x"])
        log(f"  {name} {scheme}: {rows[-1]}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--schemes", nargs="+", default=["tf", "tf_enhanced", "percentile"])
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name in args.models:
        rows += run(name, args.epochs, args.schemes)
    header = ["model", "scheme", "FP32 %", "W8A8 %", "W8A8 - FP32", "W4A8 %", "W8A8 per-tensor %",
              "calibration time / FP32 forward"]
    print()
    print(markdown_table(header, rows))
    print("\nvalidation: 360 held-out digits; calibration: 8 batches of 32 training images; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    return rows


if __name__ == "__main__":
    main()
