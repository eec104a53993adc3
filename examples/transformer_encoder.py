"""Quantize a sentence encoder (HuggingFace BERT family) to W8A8, export it, check it in ONNX Runtime.

    python examples/transformer_encoder.py                         # a small BERT from a config
    python examples/transformer_encoder.py --model /path/to/model  # a local pretrained encoder
                                                                   # (its tokenizer files beside it)

The model is captured with torch.export (HF encoders do not trace with torch.fx); the residual
stream gets 16-bit grids (``set_residual_stream_precision``) while every Linear input and both
attention matmuls stay 8-bit, so ONNX Runtime runs them all as integer kernels.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F

from qat_plugin import QuantSimModel
from qat_plugin.export import verify
from qat_plugin.outliers import set_residual_stream_precision

SENTENCES = [
    "The cat sat on the mat.", "A dog is running in the park.", "It will rain tomorrow afternoon.",
    "The stock market fell sharply this morning.", "The new phone has a larger screen.",
    "I love eating pizza with friends.", "The football match ended in a draw.", "The museum opens at nine.",
    "Neural networks learn from data.", "Mountains are covered with snow in winter.",
    "The train to Paris departs from platform four.", "Regular exercise improves your health.",
]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def load(model_path, layers: int):
    """(model, calibration batch, test batch): a local pretrained encoder with its tokenizer, or a
    small random BERT with random token ids and padding masks."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    if model_path:
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModel.from_pretrained(model_path).eval()
        enc = lambda s: tok(s, padding="max_length", max_length=32, truncation=True, return_tensors="pt")  # noqa: E731
        cal, test = enc(SENTENCES[::2]), enc(SENTENCES[1::2])
        return model, (cal["input_ids"], cal["attention_mask"]), (test["input_ids"], test["attention_mask"])
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    model = BertModel(cfg).eval()  # your trained encoder here

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 1000, (n, 24), generator=g)
        mask = (torch.arange(24)[None] < torch.randint(8, 25, (n, 1), generator=g)).long()  # padded at the end
        return ids, mask

    return model, batch(16, 1), batch(8, 2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a local HuggingFace encoder directory (default: a small BERT)")
    p.add_argument("--layers", type=int, default=2, help="layers of the small BERT")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp()
    model, cal, test = load(args.model, args.layers)

    sim = QuantSimModel(model, tuple(t[:2] for t in cal))  # int64 ids and mask: torch.export capture
    changed = set_residual_stream_precision(sim, output_bw=16)
    sim.compute_encodings(lambda m, _: m(*cal))
    print(f"{len(sim.quantizer_sites())} quantizer sites, {len(changed)} at 16 bits (residual stream)")

    with torch.no_grad():
        ref = mean_pool(model(*test).last_hidden_state, test[1])
        emb = mean_pool(sim.model(*test).last_hidden_state, test[1])
    cosine = float((emb * ref).sum(1).mean())
    print(f"mean embedding cosine, simulation vs FP32: {cosine:.4f}")

    res = sim.export(out, "encoder", tuple(t[:2] for t in cal))  # dynamic batch and sequence length
    report = verify(res.onnx_path, sim, test)
    print(report)
    return {"cosine": cosine, "report": report, "onnx": res.onnx_path}


if __name__ == "__main__":
    main()
