"""Zero pads before convolutions (TF-ported networks): what is left in ONNX Runtime's optimized
graph, and the INT8 / FP32 latency ratio, against ORT's own quantizer on the same FP32 file.

    python benchmarks/pad_folding.py [--runs 40] [--size 128]

The network is a small MobileNet-style CNN written as TF ports write it: ``nn.ZeroPad2d``
before every stride-2 conv (asymmetric ``(0, 1, 0, 1)``, TF's SAME) and ``F.pad(x, ..., value=0)``
before every 3x3 stride-1 conv, with ``padding=0`` on the convs (random weights, BN statistics
randomized, calibrated on 16 generated images). Prints one table: Pad, QuantizeLinear,
DequantizeLinear and float Conv nodes in ORT's optimized graph, DequantizeLinear nodes feeding
float ops, and the median latency at batch 1 on one thread with the ratio to FP32 measured in
the same run (files taking turns).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import markdown_table  # noqa: E402
from export_latency import interleaved_latency, ort_quantize_static  # noqa: E402

from qat_plugin import QuantSimModel  # noqa: E402
from qat_plugin.export.verify import optimized_graph_stats  # noqa: E402


class TFBlock(nn.Module):
    """Depthwise-separable block, TF-style: explicit zero pads, convs with padding=0."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = nn.ZeroPad2d((0, 1, 0, 1)) if stride == 2 else None
        self.dw = nn.Conv2d(cin, cin, 3, stride, 0, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = self.pad(x) if self.pad is not None else F.pad(x, (1, 1, 1, 1), value=0.0)
        x = F.relu6(self.bn1(self.dw(x)))
        return F.relu6(self.bn2(self.pw(x)))


class TFStyleNet(nn.Module):
    def __init__(self, widths=(16, 32, 32, 64, 64, 128, 128, 128), num_classes: int = 10):
        super().__init__()
        self.stem_pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = nn.Conv2d(3, widths[0], 3, 2, 0, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        blocks = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            blocks.append(TFBlock(cin, cout, 2 if cin != cout else 1))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = F.relu6(self.stem_bn(self.stem(self.stem_pad(x))))
        x = self.blocks(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tf_style_net(seed: int = 0) -> TFStyleNet:
    torch.manual_seed(seed)
    net = TFStyleNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.5)
    return net.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    import logging
    logging.getLogger().setLevel(logging.ERROR)
    net = tf_style_net()
    calib = torch.randn(16, 3, args.size, args.size)
    sim = QuantSimModel(net, calib[:2])
    sim.compute_encodings(lambda m, _: [m(calib[i:i + 8]) for i in range(0, 16, 8)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        res = sim.export(tmp, "tfnet", calib[:1], export_fp32=True, input_names=["x"])
        ort_path = os.path.join(tmp, "tfnet_ort_static.onnx")
        ort_quantize_static(res.fp32_path, ort_path, calib.numpy())
        files = {"FP32 ONNX": res.fp32_path, "qat_plugin INT8": res.onnx_path, "ORT quantize_static": ort_path}
        lat = interleaved_latency(files, 1, args.runs, block=10, shape=(1, 3, args.size, args.size))
        for label, path in files.items():
            counts, float_ops, unfused = optimized_graph_stats(path)
            rows.append([label] + [str(v) for v in (counts.get("Pad", 0), counts.get("QuantizeLinear", 0), counts.get("DequantizeLinear", 0),
                         float_ops, unfused)] + [f"{lat[label] * 1e3:.2f}", f"{lat[label] / lat['FP32 ONNX']:.2f}"])
    import onnxruntime
    print(markdown_table(["file", "Pad", "QuantizeLinear", "DequantizeLinear", "float Conv/Gemm", "DQ feeding float ops",
                          "batch 1 ms", "vs FP32"], rows))
    print(f"\nORT optimized graph (ORT_ENABLE_EXTENDED); median of about {args.runs} runs, files taking turns in "
          f"blocks of 10, 1 thread, {args.size}x{args.size}, shared machine; onnxruntime {onnxruntime.__version__}, "
          f"torch {torch.__version__}")
    return rows


if __name__ == "__main__":
    main()
