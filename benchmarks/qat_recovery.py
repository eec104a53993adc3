"""QAT recovery at W4A8 on digits, with and without SQNR encoding annealing, and QAT step cost.

    python benchmarks/qat_recovery.py [--epochs 8] [--qat-epochs 4] [--lrs 0.005 0.01] [--seeds 8]

Trains torchvision mobilenet_v2 on scikit-learn's bundled digits (32x32), then prints one
table: FP32, PTQ (W4A8), and for each QAT learning rate four QAT variants (same seed, data order
and hyper-parameters in each seed): activations calibrated min-max (``tf``) or SQNR
(``tf_enhanced``), each without and with SQNR annealing over the whole run
(``AnnealingConfig.for_run``, the callback's default window); weights min-max in every variant.
A second table gives the paired per-seed differences (95% t-intervals) of each annealed variant
against QAT without annealing from ``tf_enhanced`` (the callback's default before annealing was
on by default). ``--json`` writes every per-seed accuracy. Then the QAT step time as a ratio to the
FP32 step time measured in the same run for mobilenet_v2 and resnet18 (batch 64, 32x32, fixed and
learned ranges).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

import scipy.stats
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from _common import accuracy, batches, markdown_table, train_fp32  # noqa: E402

from qat_plugin import QuantSimModel  # noqa: E402
from qat_plugin.annealing import AnnealingConfig, EncodingAnnealer  # noqa: E402


def make_sim(model, x_tr, scheme, pbw, abw, param_scheme=None):
    sim = QuantSimModel(model, x_tr[:2], quant_scheme=scheme, default_param_bw=pbw, default_output_bw=abw,
                        param_quant_scheme=param_scheme)
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


def paired(plain: list[float], annealed: list[float]) -> tuple[float, float, int]:
    """Mean per-seed difference (annealed - plain), its 95% t-interval half-width, and the number
    of seeds where annealed >= plain."""
    d = [a - p for p, a in zip(plain, annealed)]
    half = float(scipy.stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5) if len(d) > 1 else float("nan")
    return statistics.fmean(d), half, sum(x >= 0 for x in d)


def mean_std(v: list[float]) -> str:
    return f"{statistics.fmean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"


def accuracy_table(args):
    model, (x_tr, y_tr, x_va, y_va) = train_fp32("mobilenet_v2", args.epochs)
    fp32 = accuracy(model, x_va, y_va)
    ptq = accuracy(make_sim(model, x_tr, args.scheme, 4, 8).model, x_va, y_va)
    steps = args.qat_epochs * ((len(y_tr) + 63) // 64)
    ann = AnnealingConfig.for_run(steps)  # the callback's default window
    # (calibration scheme for activations, annealing): weights are min-max in every variant
    variants = {"plain": (args.scheme, None), "annealed": (args.scheme, ann), "sqnr_fixed": ("tf_enhanced", None),
                "sqnr_annealed": ("tf_enhanced", ann)}
    rows, rows_vs_default, per_seed = [], [], {}
    for lr in args.lrs:
        # the same extra epochs in FP32, to separate what QAT recovers from what more training adds
        fp32_tuned = accuracy(qat(_Float(copy.deepcopy(model)), (x_tr, y_tr), args.qat_epochs, lr).model, x_va, y_va)
        runs = {k: [] for k in variants}
        t0 = time.perf_counter()
        for seed in range(args.seeds):
            for kind, (scheme, cfg) in variants.items():
                sim = make_sim(model, x_tr, scheme, 4, 8, param_scheme="tf")
                runs[kind].append(accuracy(qat(sim, (x_tr, y_tr), args.qat_epochs, lr, cfg, seed=seed).model, x_va, y_va))
            print(f"  lr {lr} seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()), flush=True)
        print(f"  {len(variants) * args.seeds} QAT runs of {steps} steps in {time.perf_counter() - t0:.0f}s")
        per_seed[str(lr)] = runs
        diff, half, wins = paired(runs["plain"], runs["annealed"])
        rows.append([f"mobilenet_v2 W4A8, lr {lr}", f"{fp32:.2f}", f"{fp32_tuned:.2f}", f"{ptq:.2f}",
                     mean_std(runs["plain"]), mean_std(runs["annealed"]),
                     f"{statistics.fmean(runs['annealed']) - fp32:+.2f}", f"{diff:+.2f} ± {half:.2f}",
                     f"{wins}/{args.seeds}", mean_std(runs["sqnr_fixed"]), mean_std(runs["sqnr_annealed"])])
        for kind in ("annealed", "sqnr_annealed"):
            d, h, w = paired(runs["sqnr_fixed"], runs[kind])
            rows_vs_default.append([f"lr {lr}", {"annealed": "min-max activations + annealing",
                                                 "sqnr_annealed": "tf_enhanced activations + annealing"}[kind],
                                    mean_std(runs[kind]), f"{d:+.2f} ± {h:.2f}", f"{w}/{args.seeds}"])
    print()
    print(markdown_table(["model", "FP32 %", "FP32 + same epochs %", "PTQ %", "QAT %", "QAT + SQNR annealing %",
                          "annealed - FP32", "annealed - QAT (paired, 95%)", "seeds annealed >= QAT",
                          "QAT from tf_enhanced %", "QAT from tf_enhanced + annealing %"], rows))
    print()
    print(markdown_table(["lr", "variant", "accuracy %", "minus QAT from tf_enhanced (paired, 95%)",
                          "seeds >= QAT from tf_enhanced"], rows_vs_default))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(per_seed, f, indent=1)
    print(f"\nvalidation: {len(y_va)} held-out digits (1 image = {100 / len(y_va):.2f} pt); QAT: mean ± std over {args.seeds} seeds, "
          f"{args.qat_epochs} epochs SGD momentum 0.9 cosine, calibration '{args.scheme}' (weights 'tf'), annealing {ann}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--qat-epochs", type=int, default=4)
    p.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.01])
    p.add_argument("--scheme", default="tf")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--parts", nargs="+", choices=["accuracy", "steps"], default=["accuracy", "steps"])
    p.add_argument("--json", default=None, help="write the per-seed accuracies here")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if "accuracy" in args.parts:
        accuracy_table(args)
    if "steps" in args.parts:
        ratios = {name: step_ratios(name) for name in ("mobilenet_v2", "resnet18")}
        print()
        print(markdown_table(["model", "QAT step / FP32 step (fixed ranges)", "QAT step / FP32 step (learned ranges)"],
                             [[n, f"{r[False]:.2f}", f"{r[True]:.2f}"] for n, r in ratios.items()]))
        print(f"\nsteps: batch 64 at 32x32, best of 3 alternating rounds, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
