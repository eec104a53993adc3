"""ONNX Runtime latency of our INT8 export against FP32 and ORT's own quantize_static.

    python benchmarks/export_latency.py [--models resnet18 mobilenet_v2] [--runs 20]

For each torchvision model (random weights, 224x224, calibrated on 32 generated images),
exports FP32 ONNX and our QDQ INT8 file, quantizes the same FP32 file with
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, uint8
activations, the same calibration images) as a reference, and prints one table: median
latency at batch 1 and 16 on one thread, the ratio to FP32 measured in the same run, and
file sizes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from _common import markdown_table  # noqa: E402

from qat_plugin import QuantSimModel  # noqa: E402
from qat_plugin.export.verify import optimized_graph_stats, session  # noqa: E402


def interleaved_latency(paths: dict, batch: int, runs: int, block: int = 10, shape=None) -> dict:
    """Median seconds per run for each file. The sessions take turns in blocks of ``block`` runs
    (the first of each block discarded as a cache warm-up), so machine drift hits all files
    alike while each is measured warm."""
    import time

    sessions = {k: session(p, optimize=True, threads=1) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal(shape or (batch, 3, 224, 224)).astype(np.float32)
    times = {k: [] for k in paths}
    block = min(block, runs)
    for _ in range(max(1, runs // max(1, block - 1))):
        for k, sess in sessions.items():
            name = sess.get_inputs()[0].name
            for i in range(block):
                t0 = time.perf_counter()
                sess.run(None, {name: x})
                if i:
                    times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def ort_quantize_static(fp32_path: str, out_path: str, calib: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": calib[i:i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(fp32_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def run(name: str, runs: int, tmp: str, log=print):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    calib = torch.randn(32, 3, 224, 224)
    sim = QuantSimModel(model, calib[:2])
    sim.compute_encodings(lambda m, _: [m(calib[i:i + 8]) for i in range(0, 32, 8)])
    res = sim.export(tmp, name, calib[:1], export_fp32=True, input_names=["x"])
    ort_path = os.path.join(tmp, f"{name}_ort_static.onnx")
    ort_quantize_static(res.fp32_path, ort_path, calib.numpy())
    files = [("FP32 ONNX", res.fp32_path), ("qat_plugin INT8", res.onnx_path), ("ORT quantize_static", ort_path)]
    rows = []
    lat = {}
    for batch in (1, 16):
        n = runs if batch == 1 else max(4, runs // 4)
        for label, value in interleaved_latency(dict(files), batch, n, block=10 if batch == 1 else 4).items():
            lat[label, batch] = value
    for label, path in files:
        counts, float_ops, unfused = optimized_graph_stats(path)
        log(f"  {name} {label}: {lat[label, 1] * 1e3:.1f} ms / {lat[label, 16] * 1e3:.0f} ms, "
            f"float compute ops {float_ops}, unfused DQ {unfused}")
        rows.append([name, label, f"{lat[label, 1] * 1e3:.2f}", f"{lat[label, 1] / lat['FP32 ONNX', 1]:.2f}",
                     f"{lat[label, 16] * 1e3:.1f}", f"{lat[label, 16] / lat['FP32 ONNX', 16]:.2f}",
                     f"{os.path.getsize(path) / 2**20:.1f}", f"{float_ops}"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    import logging
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += run(name, args.runs, tmp)
    import onnxruntime
    print()
    print(markdown_table(["model", "file", "batch 1 ms", "vs FP32", "batch 16 ms", "vs FP32", "MiB",
                          "float Conv/Gemm left"], rows))
    print(f"\nmedian of about {args.runs} runs (batch 16: {max(4, args.runs // 4)}), files taking turns in blocks, "
          f"1 thread, 224x224; "
          f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}")
    return rows


if __name__ == "__main__":
    main()
