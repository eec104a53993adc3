"""Shared pieces of the benchmark scripts: a short FP32 training run on digits and accuracy."""
from __future__ import annotations

import os
import time

import torch
import torchvision

from qat_plugin.data import digits_tensors


def batches(x, y, batch_size, shuffle=False, seed=0):
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(y))
    for i in range(0, len(y), batch_size):
        j = idx[i:i + batch_size]
        yield x[j], y[j]


@torch.no_grad()
def accuracy(model, x, y, batch_size=256) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in batches(x, y, batch_size))
    return 100.0 * correct / len(y)


def train_fp32(name: str, epochs: int, lr: float = 2e-3, seed: int = 0, log=print):
    """A torchvision model trained from scratch on digits (32x32, 3 channels)."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_va, y_va = digits_tensors()
    model = getattr(torchvision.models, name)(num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(y_tr) + 63) // 64))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for xb, yb in batches(x_tr, y_tr, 64, shuffle=True, seed=seed * 1000 + epoch):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    log(f"  trained {name} for {epochs} epochs in {time.perf_counter() - t0:.0f}s: "
        f"val acc {accuracy(model, x_va, y_va):.2f}%")
    return model.eval(), (x_tr, y_tr, x_va, y_va)


def cached_fp32(name: str, epochs: int, cache_dir, log=print):
    """:func:`train_fp32`, or its weights loaded from ``cache_dir`` (the data split is always
    recomputed); returns ``(model, (x_tr, y_tr, x_va, y_va))``."""
    path = os.path.join(cache_dir, f"{name}_e{epochs}_s0.pt") if cache_dir else None
    if path and os.path.exists(path):
        model = getattr(torchvision.models, name)(num_classes=10)
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"  loaded {path}")
        return model.eval(), digits_tensors()
    model, data = train_fp32(name, epochs, log=log)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model, data


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])
