"""Every torchvision classifier through the whole path: build (random weights), calibrate,
export, ONNX Runtime vs the simulation beside the simulation's noise floor, ORT optimized vs
unoptimized, and the float heavy ops ORT leaves.

    python benchmarks/torchvision_zoo.py [--models resnet18 googlenet ... | --all] [--max-build-s 60]
                                         [--n 8] [--size 224] [--out zoo.md]

Models that take longer than ``--max-build-s`` to build are skipped (said so in the table). A
row is printed (and appended to ``--out``) as soon as a model is done, so a long run that is
stopped keeps what finished. Calibration: 8 generated images (``tf_enhanced``, W8A8,
``default`` preset); comparison on ``--n`` other generated images at batch 4. Columns:
ORT vs sim and its noise floor (``verify``), ORT with all optimizations vs none, top-1
agreement, float Conv/Gemm/MatMul left in ORT's optimized graph, DequantizeLinear nodes feeding
float ops, and the weight sites whose scale the int32 bias grid raised.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from _common import markdown_table  # noqa: E402

from qat_plugin import QuantSimModel  # noqa: E402
from qat_plugin.export.verify import compare, verify  # noqa: E402

HEADER = ["model", "build s", "sites", "sim vs FP32 dB", "ORT vs sim dB", "floor dB", "verdict", "ORT opt vs unopt dB", "top-1 agree %",
          "float heavy ops", "unfused DQ", "QLinearSoftmax", "raised weight scales", "total s"]
#: models whose constructor needs an argument to build without pretrained weights at 224x224
KWARGS = {"googlenet": {"init_weights": True, "aux_logits": False},
          "inception_v3": {"init_weights": True, "aux_logits": False}}


#: one model per family (the smallest), the issue's int32-overflow case first
FAMILIES = ["googlenet", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x1_0", "mnasnet0_5", "mobilenet_v2",
            "regnet_x_400mf", "regnet_y_400mf", "efficientnet_b0", "mobilenet_v3_large", "resnet18", "alexnet",
            "densenet121", "resnet50", "resnext50_32x4d", "inception_v3", "efficientnet_v2_s", "vgg11_bn",
            "wide_resnet50_2", "convnext_tiny", "swin_t", "swin_v2_t", "vit_b_16", "maxvit_t"]


def classifiers() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def run_one(name: str, size: int, n: int, max_build_s: float, tmp: str) -> list[str]:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {})).eval()
    build = time.perf_counter() - t0
    if build > max_build_s:
        return [name, f"{build:.0f}", "skipped: build too slow"] + [""] * (len(HEADER) - 3)
    calib = torch.randn(8, 3, size, size)
    x = torch.randn(n, 3, size, size)
    sim = QuantSimModel(model, calib[:2])
    sim.compute_encodings(lambda m, _: [m(calib[i:i + 4]) for i in range(0, 8, 4)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sim.export(tmp, name, calib[:2], input_names=["x"])
    raised = next((str(w.message).split(" site(s)")[0].rsplit(" ", 1)[1] for w in caught
                   if "int32 bias overflow: the weight scale" in str(w.message)), "0")
    report = verify(res.onnx_path, sim, x, batch_size=4, threads=1)
    with torch.no_grad():
        fp32 = torch.cat([model(x[i:i + 4]) for i in range(0, n, 4)]).numpy()
        simulated = torch.cat([sim.model(x[i:i + 4]) for i in range(0, n, 4)]).numpy()
    sim_db = compare(simulated, fp32)[1]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return [name, f"{build:.1f}", str(len(sim.quantizers())), fmt(sim_db), fmt(report.sqnr_db), fmt(report.floor_sqnr_db),
            "at floor" if report.within_floor else "BELOW", fmt(report.unoptimized_sqnr_db),
            f"{100 * report.top1_agreement:.0f}", str(report.float_compute_ops), str(report.unfused_qdq),
            str(report.op_counts.get("QLinearSoftmax", 0)),
            raised,
            f"{time.perf_counter() - t0:.0f}"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help="default: one model per family (--all: every classifier)")
    p.add_argument("--all", action="store_true", help="every torchvision classifier")
    p.add_argument("--max-build-s", type=float, default=60.0)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", default=None, help="also append each row to this markdown file")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    import logging
    logging.getLogger().setLevel(logging.ERROR)
    rows = []
    for name in args.models or (classifiers() if args.all else FAMILIES):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = run_one(name, args.size, args.n, args.max_build_s, tmp)
            except Exception as e:  # a model that fails is a row, not the end of the run
                row = [name, "", f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}"] + [""] * (len(HEADER) - 3)
                traceback.print_exc()
        rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write("| " + " | ".join(row) + " |\n")
    import onnxruntime
    print()
    print(markdown_table(HEADER, rows))
    print(f"\nrandom weights, {args.size}x{args.size}, W8A8 default preset, tf_enhanced, 8 calibration images, "
          f"{args.n} compared; onnxruntime {onnxruntime.__version__}, torch {torch.__version__}")
    return rows


if __name__ == "__main__":
    main()
