"""QAT recovery at W4A8 on digits, with and without SQNR encoding annealing, and QAT step cost.

    python benchmarks/qat_recovery.py [--epochs 8] [--qat-epochs 4]

Trains torchvision mobilenet_v2 on scikit-learn's bundled digits (32x32), then prints one
table: FP32, PTQ (W4A8), QAT without annealing and QAT with SQNR annealing (same seed, data
order and hyper-parameters), and the QAT step time as a ratio to the FP32 step time measured in
the same run for mobilenet_v2 and resnet18 (batch 64, 32x32, fixed and learned ranges).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from _common import accuracy, batches, markdown_table, train_fp32  # noqa: E402

from qat_plugin import QuantSimModel  # noqa: E402
from qat_plugin.annealing import AnnealingConfig, EncodingAnnealer  # noqa: E402


def make_sim(model, x_tr, scheme, pbw, abw):
    sim = QuantSimModel(model, x_tr[:2], quant_scheme=scheme, default_param_bw=pbw, default_output_bw=abw)
    sim.compute_encodings(lambda m, _: [m(x_tr[i:i + 64]) for i in range(0, 512, 64)])
    return sim


def qat(sim, data, epochs, lr, annealing=None, seed=0):
    x_tr, y_tr = data
    torch.manual_seed(seed)  # dropout masks: every variant sees the same randomness
    model = sim.model
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    steps = epochs * ((len(y_tr) + 63) // 64)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    annealer = EncodingAnnealer(sim, annealing) if annealing else None
    for epoch in range(epochs):
        model.train()
        for xb, yb in batches(x_tr, y_tr, 64, shuffle=True, seed=seed * 1000 + epoch):
            if annealer:
                annealer.before_batch()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if annealer:
                annealer.after_step(True)
    return sim


class _Float:
    """The FP32 model behind the tiny interface ``qat`` needs (``.model``, no annealing)."""

    def __init__(self, model):
        self.model = model


def step_time(model, x, y, n=12):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.01, momentum=0.9)
    model.train()
    times = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    times = sorted(times[3:])
    return times[len(times) // 2]


def step_ratios(name, rounds=3, log=print):
    """QAT step time over FP32 step time. FP32, fixed-range and learned-range steps take turns
    for ``rounds`` rounds; each keeps its best round's median (transient slowdowns drop out)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    nets = {"fp32": copy.deepcopy(model)}
    for learn in (False, True):
        sim = QuantSimModel(copy.deepcopy(model).eval(), x[:2], learnable=learn)
        sim.compute_encodings(lambda m, _: m(x))
        nets[learn] = sim.model
    best = {k: float("inf") for k in nets}
    for _ in range(rounds):
        for k, net in nets.items():
            best[k] = min(best[k], step_time(net, x, y))
    log(f"  {name} step: fp32 {best['fp32'] * 1e3:.1f} ms, QAT fixed ranges {best[False] * 1e3:.1f} ms, "
        f"learned ranges {best[True] * 1e3:.1f} ms")
    return {learn: best[learn] / best["fp32"] for learn in (False, True)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--qat-epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--scheme", default="tf")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    model, (x_tr, y_tr, x_va, y_va) = train_fp32("mobilenet_v2", args.epochs)
    fp32 = accuracy(model, x_va, y_va)
    # the same extra epochs in FP32, to separate what QAT recovers from what more training adds
    tuned = copy.deepcopy(model)
    fp32_tuned = accuracy(qat(_Float(tuned), (x_tr, y_tr), args.qat_epochs, args.lr).model, x_va, y_va)
    ptq = accuracy(make_sim(model, x_tr, args.scheme, 4, 8).model, x_va, y_va)
    steps = args.qat_epochs * ((len(y_tr) + 63) // 64)
    ann = AnnealingConfig(start_step=0, end_step=steps, every_n_steps=5, alpha0=0.1, stat_batches=2,
                          freeze_ranges=True)
    runs = {"plain": [], "annealed": []}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        runs["plain"].append(accuracy(qat(make_sim(model, x_tr, args.scheme, 4, 8), (x_tr, y_tr), args.qat_epochs,
                                          args.lr, seed=seed).model, x_va, y_va))
        runs["annealed"].append(accuracy(qat(make_sim(model, x_tr, args.scheme, 4, 8), (x_tr, y_tr), args.qat_epochs,
                                             args.lr, ann, seed=seed).model, x_va, y_va))
        print(f"  seed {seed}: QAT {runs['plain'][-1]:.2f}, annealed {runs['annealed'][-1]:.2f}", flush=True)
    print(f"  {2 * args.seeds} QAT runs of {steps} steps in {time.perf_counter() - t0:.0f}s")
    mean = {k: float(torch.tensor(v).mean()) for k, v in runs.items()}
    std = {k: float(torch.tensor(v).std()) if len(v) > 1 else 0.0 for k, v in runs.items()}
    plain, annealed = mean["plain"], mean["annealed"]
    ratios = {name: step_ratios(name) for name in ("mobilenet_v2", "resnet18")}
    rows = [["mobilenet_v2 W4A8", f"{fp32:.2f}", f"{fp32_tuned:.2f}", f"{ptq:.2f}", f"{plain:.2f} ± {std['plain']:.2f}",
             f"{annealed:.2f} ± {std['annealed']:.2f}",
             f"{annealed - fp32:+.2f}", f"{annealed - plain:+.2f}"]]
    print()
    print(markdown_table(["model", "FP32 %", "FP32 + same epochs %", "PTQ %", "QAT %", "QAT + SQNR annealing %",
                          "annealed - FP32", "annealed - QAT"], rows))
    print()
    print(markdown_table(["model", "QAT step / FP32 step (fixed ranges)", "QAT step / FP32 step (learned ranges)"],
                         [[n, f"{r[False]:.2f}", f"{r[True]:.2f}"] for n, r in ratios.items()]))
    print(f"\nvalidation: 360 held-out digits (1 image = 0.28 pt); QAT: mean ± std over {args.seeds} seeds, {args.qat_epochs} epochs SGD lr {args.lr} cosine, scheme "
          f"'{args.scheme}', annealing {ann}; steps: batch 64 at 32x32, best of 3 alternating rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
