"""QAT in a hand-written PyTorch loop: QuantSimModel + fp16 AMP with loss scaling + SQNR annealing.

    python examples/qat_loop.py [--steps 60] [--amp fp16|bf16|none]

Runs on CPU: fp16 autocast with torch.amp.GradScaler("cpu") works there too.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision

from qat_plugin import QuantSimModel
from qat_plugin.annealing import AnnealingConfig, EncodingAnnealer
from qat_plugin.data import digits_tensors
from qat_plugin.precision import AmpHelper


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup-steps", type=int, default=60, help="FP32 training before quantization")
    p.add_argument("--amp", choices=["fp16", "bf16", "none"], default="fp16")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x, y, xv, yv = digits_tensors(image_size=32)

    # 1. an FP32 model (here: a short warm-up from scratch; normally your trained model)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(args.warmup_steps):
        idx = torch.randint(0, len(y), (args.batch_size,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()

    # 2. simulate W8A8 on ONNX Runtime's rules and calibrate
    sim = QuantSimModel(model, x[:2], quant_scheme="tf_enhanced", default_param_bw=8, default_output_bw=8)
    sim.compute_encodings(lambda m, _: [m(x[i:i + 64]) for i in range(0, 256, 64)])

    # 3. fine-tune: autocast + loss scaling, encodings annealed toward SQNR-optimal ones
    amp = AmpHelper("cpu", torch.float16 if args.amp == "fp16" else torch.bfloat16, enabled=args.amp != "none")
    annealer = EncodingAnnealer(sim, AnnealingConfig(end_step=max(2, args.steps), every_n_steps=5, stat_batches=2))
    opt = torch.optim.SGD(sim.model.parameters(), lr=1e-3, momentum=0.9)
    sim.model.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(y), (args.batch_size,))
        annealer.before_batch()
        with amp.autocast():
            loss = F.cross_entropy(sim.model(x[idx]).float(), y[idx])
        amp.backward(loss)
        applied = amp.step(opt)                  # False when the scaler skipped an inf/NaN step
        metrics = annealer.after_step(applied)   # encodings move only on applied steps
        if metrics:
            print(f"step {step}: loss {loss.item():.3f}, alpha {metrics['alpha']:.3f}, "
                  f"worst SQNR {metrics.get('sqnr_db_min', float('nan')):.1f} dB, loss scale {amp.scale:.0f}")

    sim.model.eval()
    with torch.no_grad():
        acc = (sim.model(xv).argmax(1) == yv).float().mean().item() * 100
    print(f"W8A8 simulated accuracy after QAT: {acc:.2f}%")
    return acc


if __name__ == "__main__":
    main()
