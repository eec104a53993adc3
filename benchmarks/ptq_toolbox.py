"""Post-training toolbox and label-free distillation on digits, and AdaRound's cost at 224x224.

    python benchmarks/ptq_toolbox.py [--parts accuracy distill timing] [--models mobilenet_v2 resnet18]

accuracy: trains each torchvision model briefly on scikit-learn's bundled digits (32x32, as
  benchmarks/ptq_accuracy.py), then prints validation accuracy of the simulation for
  W4A8 nearest rounding vs AdaRound (defaults; both reconstruction targets), and W8A8
  per-channel vs per-tensor, per-tensor with CLE (ReLU6 skipped / replaced by ReLU) and bias
  correction. (adaround: only the W4A8 rows.)
distill: W4A8 QAT from the same PTQ start, trained on labels (cross-entropy) or on the FP32
  teacher's outputs without labels (KL, temperature 4), same steps, data order, seeds.
timing: the toolbox's defaults on torchvision resnet50 (random weights, 54 Conv/Linear layers),
  128 images of 224x224 in batches of 16, W4A8: CLE, sim, compute_encodings, apply_adaround
  (learning vs passes over the data), correct_bias; each stage's wall time and the load average.
  The budget (issue 10) is 15 min on 2 CPU cores:
      OMP_NUM_THREADS=2 python benchmarks/ptq_toolbox.py --parts timing
  On a shared machine, run it with OMP_NUM_THREADS=1: the process CPU time of one thread is the
  work, about what one free core needs, so an upper bound of the wall time on 2 free cores (2
  threads on oversubscribed cores spin at OpenMP barriers and inflate both times).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from _common import accuracy, batches, cached_fp32, markdown_table  # noqa: E402

from qat_plugin import QuantSimModel  # noqa: E402
from qat_plugin.distillation import Distiller  # noqa: E402
from qat_plugin.ptq import apply_adaround, correct_bias, equalize_model  # noqa: E402

warnings.filterwarnings("ignore")
PER_TENSOR = {"name": "default-per-tensor", "defaults": {"per_channel_quantization": False},
              "supergroups": [{"op_list": ["Conv", "BatchNormalization", "Relu"]},
                              {"op_list": ["Conv", "BatchNormalization", "Clip"]},
                              {"op_list": ["Add", "Relu"]}, {"op_list": ["Gemm", "Relu"]}]}


def calibrated(model, calib, pbw, abw, config=None):
    sim = QuantSimModel(model, calib[0], quant_scheme="tf_enhanced", param_quant_scheme="tf",
                        default_param_bw=pbw, default_output_bw=abw, config_file=config)
    sim.compute_encodings(lambda m, _: [m(x) for x in calib])
    return sim


def accuracy_rows(name, model, data, adaround_only=False, targets=("float_weights", "fp32_outputs"), log=print):
    x_tr, y_tr, x_va, y_va = data
    calib = [x_tr[i:i + 32] for i in range(0, 256, 32)]  # 256 training images, as calibration
    fp32 = accuracy(model, x_va, y_va)
    acc = lambda sim: accuracy(sim.model, x_va, y_va)
    rows = [[name, "FP32", f"{fp32:.2f}", "", ""]]
    near = calibrated(model, calib, 4, 8)
    a_near = acc(near)
    rows.append([name, "W4A8 nearest", f"{a_near:.2f}", f"{a_near - fp32:+.2f}", ""])
    for target in targets:
        ada = calibrated(model, calib, 4, 8)
        t0 = time.perf_counter()
        report = apply_adaround(ada, calib, target=target, progress=False)
        secs = time.perf_counter() - t0
        ratios = [l.mse_adaround / l.mse_nearest for l in report.layers if not l.skipped and l.mse_nearest > 0]
        a_ada = acc(ada)
        rows.append([name, f"W4A8 AdaRound (defaults, target={target})", f"{a_ada:.2f}", f"{a_ada - fp32:+.2f}",
                     f"{secs:.0f} s wall (shared cores: learning {report.optimize_seconds:.0f} s, "
                     f"{report.optimize_seconds / len(ratios):.2f} s/layer; passes over the data "
                     f"{report.seconds - report.optimize_seconds:.0f} s); layer MSE / nearest median "
                     f"{statistics.median(ratios):.3f}"])
        log(f"  {name}: W4A8 nearest {a_near:.2f}, AdaRound target={target} {a_ada:.2f} ({secs:.0f} s)")
    if adaround_only:
        return rows
    a_pc = acc(calibrated(model, calib, 8, 8))
    rows.append([name, "W8A8 per-channel", f"{a_pc:.2f}", f"{a_pc - fp32:+.2f}", ""])
    a_pt = acc(calibrated(model, calib, 8, 8, PER_TENSOR))
    rows.append([name, "W8A8 per-tensor", f"{a_pt:.2f}", f"{a_pt - fp32:+.2f}", f"{a_pt - a_pc:+.2f} vs per-channel"])
    a_bc = None
    for relu6 in ("skip", "relu"):
        m = copy.deepcopy(model).eval()
        equalize_model(m, calib[0], relu6=relu6)
        fp_cle = accuracy(m, x_va, y_va)
        sim = calibrated(m, calib, 8, 8, PER_TENSOR)
        a_cle = acc(sim)
        correct_bias(sim, calib, progress=False)
        a_bc = acc(sim)
        note = f"FP32 after CLE {fp_cle:.2f}"
        rows.append([name, f"W8A8 per-tensor + CLE (relu6={relu6})", f"{a_cle:.2f}", f"{a_cle - fp32:+.2f}", note])
        rows.append([name, f"W8A8 per-tensor + CLE (relu6={relu6}) + bias corr.", f"{a_bc:.2f}", f"{a_bc - fp32:+.2f}",
                     f"{a_bc - a_pc:+.2f} vs per-channel"])
        log(f"  {name}: per-tensor CLE relu6={relu6}: {a_cle:.2f}, + BC {a_bc:.2f} (FP32 after CLE {fp_cle:.2f})")
    sim = calibrated(model, calib, 8, 8, PER_TENSOR)
    correct_bias(sim, calib, progress=False)
    a = acc(sim)
    rows.append([name, "W8A8 per-tensor + bias corr. (no CLE)", f"{a:.2f}", f"{a - fp32:+.2f}", ""])
    return rows


def qat(sim, data, epochs, lr, seed, distiller=None):
    x_tr, y_tr = data
    torch.manual_seed(seed)
    model = sim.model
    params = [p for p in model.parameters() if p.requires_grad]
    steps = epochs * ((len(y_tr) + 63) // 64)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for epoch in range(epochs):
        model.train()
        for xb, yb in batches(x_tr, y_tr, 64, shuffle=True, seed=seed * 1000 + epoch):
            logits = model(xb)
            loss = distiller.loss(logits, xb) if distiller is not None else F.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return sim


def distill_rows(name, model, data, epochs, lr, seeds, temperature, log=print):
    x_tr, y_tr, x_va, y_va = data
    calib = [x_tr[i:i + 64] for i in range(0, 512, 64)]
    fp32 = accuracy(model, x_va, y_va)
    ptq = accuracy(calibrated(model, calib, 4, 8).model, x_va, y_va)
    res = {"labels": [], "distill": []}
    for seed in range(seeds):
        for kind in res:
            sim = calibrated(copy.deepcopy(model), calib, 4, 8)
            distiller = Distiller(model, temperature=temperature) if kind == "distill" else None
            qat(sim, (x_tr, y_tr), epochs, lr, seed, distiller)
            res[kind].append(accuracy(sim.model, x_va, y_va))
            log(f"  {name} seed {seed} {kind}: {res[kind][-1]:.2f}")
    mean = {k: statistics.mean(v) for k, v in res.items()}
    diff = [d - l for l, d in zip(res["labels"], res["distill"])]
    return [[name, f"{fp32:.2f}", f"{ptq:.2f}", " / ".join(f"{v:.2f}" for v in res["labels"]), f"{mean['labels']:.2f}",
             " / ".join(f"{v:.2f}" for v in res["distill"]), f"{mean['distill']:.2f}",
             f"{statistics.mean(diff):+.2f}"]]


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def timing(targets=("fp32_outputs",), n_images=128, batch=16, log=print):
    """The PTQ toolbox's defaults on torchvision resnet50 (random weights), 128 images of 224x224:
    CLE -> sim -> compute_encodings -> apply_adaround -> correct_bias, each stage timed."""
    rows = []
    for target in targets:
        torch.manual_seed(0)
        model = torchvision.models.resnet50().eval()
        data = [torch.randn(batch, 3, 224, 224) for _ in range(n_images // batch)]
        load0 = _load()
        stages, cpu = {}, {}

        def stage(name, fn):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            stages[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
            log(f"  {target}: {name} {stages[name]:.0f} s wall, {cpu[name]:.0f} s CPU (load {_load()})")
            return out

        with torch.no_grad():
            stage("FP32 forward (reference)", lambda: [model(x) for x in data])
        stage("CLE", lambda: equalize_model(model, data[0][:1]))
        sim = stage("QuantSimModel", lambda: QuantSimModel(model, data[0][:1], quant_scheme="tf_enhanced",
                                                           param_quant_scheme="tf", default_param_bw=4))
        stage("compute_encodings", lambda: sim.compute_encodings(lambda m, _: [m(x) for x in data]))
        report = stage("apply_adaround", lambda: apply_adaround(sim, data, target=target, progress=False))
        stage("correct_bias", lambda: correct_bias(sim, data, progress=False))
        log(str(report))
        tools = ("CLE", "apply_adaround", "correct_bias")
        total, total_cpu = sum(stages[k] for k in tools), sum(cpu[k] for k in tools)
        calib_cpu = cpu["QuantSimModel"] + cpu["compute_encodings"]
        layers = [l for l in report.layers if not l.skipped]
        ratios = [l.mse_adaround / l.mse_nearest for l in layers if l.mse_nearest > 0]
        rows.append(["resnet50 (random weights), 128 x 224x224, W4A8", target, str(len(layers)),
                     f"{stages['FP32 forward (reference)']:.0f} / {cpu['FP32 forward (reference)']:.0f}",
                     f"{stages['CLE']:.0f} / {cpu['CLE']:.0f}",
                     f"{stages['QuantSimModel'] + stages['compute_encodings']:.0f} / {calib_cpu:.0f}",
                     f"{report.optimize_seconds:.0f} ({report.optimize_seconds / len(layers):.1f}/layer)",
                     f"{report.seconds - report.optimize_seconds:.0f}",
                     f"{stages['apply_adaround']:.0f} / {cpu['apply_adaround']:.0f}",
                     f"{stages['correct_bias']:.0f} / {cpu['correct_bias']:.0f}",
                     f"{total:.0f} / {total_cpu:.0f} ({total / 60:.1f} / {total_cpu / 60:.1f} min)",
                     f"{(total_cpu + calib_cpu) / 60:.1f} min",
                     f"{load0} -> {_load()}", f"{statistics.median(ratios):.3f}"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["accuracy", "distill", "timing"],
                   choices=["accuracy", "adaround", "distill", "timing"])
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    p.add_argument("--epochs", type=int, default=8, help="FP32 training epochs")
    p.add_argument("--targets", nargs="+", default=["float_weights", "fp32_outputs"], help="AdaRound targets to compare")
    p.add_argument("--timing-targets", nargs="+", default=["fp32_outputs"], help="AdaRound targets timed on resnet50")
    p.add_argument("--qat-epochs", type=int, default=4)
    p.add_argument("--qat-lr", type=float, default=0.005)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--cache-dir", default=None, help="keep the trained FP32 weights here between runs")
    args = p.parse_args(argv)
    logging.getLogger("qat_plugin.ptq").setLevel(logging.ERROR)
    out = []
    models = {}
    if {"accuracy", "adaround", "distill"} & set(args.parts):
        models = {n: cached_fp32(n, args.epochs, args.cache_dir) for n in args.models}
    if "accuracy" in args.parts or "adaround" in args.parts:
        rows = []
        for name, (model, data) in models.items():
            rows += accuracy_rows(name, model, data, adaround_only="accuracy" not in args.parts, targets=args.targets)
        out.append(markdown_table(["model", "variant", "val acc %", "vs FP32", "note"], rows))
    if "distill" in args.parts:
        rows = []
        for name, (model, data) in models.items():
            rows += distill_rows(name, model, data, args.qat_epochs, args.qat_lr, args.seeds, args.temperature)
        out.append(markdown_table(["model", "FP32 %", "PTQ W4A8 %", "QAT labels % (per seed)", "mean",
                                   "QAT distill, no labels % (per seed)", "mean", "distill - labels"], rows))
    if "timing" in args.parts:
        out.append(markdown_table(["network", "AdaRound target", "layers", "FP32 forward (reference) wall / CPU s",
                                   "CLE wall / CPU s", "sim + compute_encodings wall / CPU s",
                                   "AdaRound learning wall s", "AdaRound passes + re-calibration wall s",
                                   "apply_adaround wall / CPU s", "correct_bias wall / CPU s",
                                   "CLE + AdaRound + bias corr. wall / CPU s", "CPU incl. calibration",
                                   "load avg 1/5/15 min, start -> end", "layer MSE / nearest (median)"],
                                  timing(args.timing_targets)))
    print()
    print("\n\n".join(out))
    print(f"\ndigits: 359 validation images (1 image = 0.28 pt); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {os.cpu_count()} CPU cores, shared with other jobs (load average "
          f"{_load()} at the end): times are upper bounds")


if __name__ == "__main__":
    main()
