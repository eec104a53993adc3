"""Outlier-heavy activation sites of transformers: the residual stream.

Transformer encoders carry a few huge activations in the residual stream (the sums that feed
each LayerNorm; Bondarenko et al., 2021, "Understanding and Overcoming the Challenges of
Efficient Transformer Quantization"): an 8-bit grid wide enough for them has no resolution
left for the rest. Giving those sums, and the Linear outputs added into them, 16-bit grids
keeps every Linear's *input* (a LayerNorm output) and every attention MatMul at 8 bits, so the
runtime still runs all of them as integer kernels.

Measured on all-MiniLM-L6-v2 with padded sentences (``benchmarks/transformer_ptq.py``): mean
embedding cosine vs FP32 0.873 at plain W8A8, 0.9924 with :func:`set_residual_stream_precision`.

>>> import torch
>>> from torch import nn
>>> from qat_plugin import QuantSimModel
>>> layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
>>> sim = QuantSimModel(layer, torch.randn(2, 5, 16))
>>> residual_stream_sites(sim)
['self_attn_out_proj_output', 'add_output', 'linear2_output', 'add_1_output']
"""
from __future__ import annotations

from torch import fx

from .graph.patterns import op_type_of

#: ops a residual value passes through unchanged on its way to the LayerNorm
_PASS = ("Dropout", "Identity", "Reshape", "Transpose")


def _follow(node: fx.Node, modules: dict, forward: bool) -> list[fx.Node]:
    """Neighbours of ``node`` (users or inputs), looking through quantizers and pass-through ops."""
    out, todo = [], list(node.users) if forward else list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        is_quantizer = n.op == "call_module" and str(n.target).startswith("quantizers.")
        if is_quantizer or op_type_of(n, modules) in _PASS:
            todo += list(n.users) if forward else list(n.all_input_nodes)
        else:
            out.append(n)
    return out


def residual_stream_sites(sim) -> list[str]:
    """Output sites of residual sums (an Add of two activations that feeds a LayerNorm) and of
    the Linear layers added into them, in graph order."""
    gm = sim.model
    modules = dict(gm.named_modules())
    by_node = {name: s.key for s in sim.quantizer_sites() if s.kind == "output" for name in s.nodes}
    found: list[str] = []
    for node in gm.graph.nodes:
        if op_type_of(node, modules) != "Add" or node.name not in by_node:
            continue
        if not any(op_type_of(u, modules) == "LayerNormalization" for u in _follow(node, modules, True)):
            continue
        for src in _follow(node, modules, False):
            key = by_node.get(src.name)
            if key is not None and sim.plan.site(key).op.split("+")[0] == "Gemm" and key not in found:
                found.append(key)
        found.append(by_node[node.name])
    return found


def set_residual_stream_precision(sim, output_bw: int = 16) -> list[str]:
    """Give :func:`residual_stream_sites` ``output_bw``-bit grids (before ``compute_encodings``),
    and split the values that feed both a residual sum and other ops (a post-LayerNorm model's
    LayerNorm outputs, BERT) so that the sum reads an ``output_bw``-bit copy while the Linear
    layers keep their 8-bit input (:meth:`~qat_plugin.QuantSimModel.split_site`). Returns the
    site keys changed or added.

    Measured on all-MiniLM-L6-v2 (``benchmarks/transformer_ptq.py``): the split lifts the mean
    embedding cosine from 0.9885 (sums at 16 bits, LayerNorm outputs 8-bit everywhere) to 0.9924.
    """
    keys = residual_stream_sites(sim)
    for key in keys:
        sim.set_precision(key, output_bw=output_bw)
    modules = dict(sim.model.named_modules())
    adds = {n.name for n in sim.model.graph.nodes if op_type_of(n, modules) == "Add"}
    sums = {name for s in sim.quantizer_sites() if s.key in keys for name in s.nodes} & adds
    for site in list(sim.quantizer_sites()):
        if site.kind == "param" or site.key in keys or len(site.nodes) != 1:
            continue
        fan_out = sim.site_consumers(site.key)
        into_sums = [name for name in fan_out if name in sums]
        if into_sums and len(into_sums) < len(fan_out):
            keys.append(sim.split_site(site.key, into_sums, output_bw=output_bw))
    return keys
