"""Placement as a pure function: (captured graph, runtime config) -> the quantizer sites.

Nothing here mutates the model; :mod:`qat_plugin.graph.apply` does that.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import fx, nn

from ..config import RuntimeConfig
from .patterns import FUNCTIONAL_WEIGHT_ARG, MASKING, VALUE_PRESERVING, WEIGHT_AXIS, describe, op_type_of

_aten = torch.ops.aten


@dataclass(frozen=True)
class QuantizerSite:
    """One quantizer and where it sits.

    ``kind`` is ``"input"`` (model input, or the float output of an op the config does not
    know, quantized for its consumers), ``"output"`` (an op's or supergroup's output) or
    ``"param"`` (a weight). ``nodes`` are the fx nodes whose value the quantizer replaces
    (several when encodings are shared, e.g. Concat); a module's weight has ``module`` (its
    qualified name) instead. ``consumers`` limits which users see the quantized value
    (``None``: all). ``bias_from`` names the input's site when the bias is int32.
    """

    key: str
    kind: str
    nodes: tuple[str, ...]
    op: str
    where: str
    bitwidth: int
    symmetric: bool
    axis: Optional[int] = None
    channels: int = 0
    consumers: Optional[tuple[str, ...]] = None
    bias_from: Optional[str] = None
    module: Optional[str] = None


@dataclass(frozen=True)
class QuantPlan:
    sites: tuple[QuantizerSite, ...]
    bn_folds: tuple[tuple[str, str], ...]  # (conv node, batchnorm node)
    groups: tuple[tuple[str, ...], ...]  # node names of each matched supergroup
    unsupported: tuple[str, ...]  # ops left in float, described
    #: (value-preserving node, site key of the encoding its output is on). The simulation needs
    #: nothing there; an export repeats the encoding after them so runtimes keep integer kernels.
    passthrough: tuple[tuple[str, str], ...] = ()
    #: (zero Pad node, Conv node) pairs: the pad is the conv's (see :func:`fold_zero_pads`)
    pad_folds: tuple[tuple[str, str], ...] = ()

    @functools.cached_property
    def _by_key(self) -> dict[str, QuantizerSite]:
        return {s.key: s for s in self.sites}

    def site(self, key: str) -> QuantizerSite:
        return self._by_key[key]

    def by_kind(self, kind: str) -> list[QuantizerSite]:
        return [s for s in self.sites if s.kind == kind]


def _out_channels(mod: nn.Module) -> Optional[int]:
    if isinstance(mod, nn.Linear):
        return mod.out_features
    return getattr(mod, "out_channels", None)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if a not in found else None)
    return found


def _normalize(pattern: tuple[str, ...]) -> tuple[str, ...]:
    """BatchNormalization right after a weighted op is always folded: drop it from patterns."""
    out = [pattern[0]]
    for t in pattern[1:]:
        if t == "BatchNormalization" and out[-1] in WEIGHT_AXIS:
            continue
        out.append(t)
    return tuple(out)


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, k: str) -> str:
        while self.parent.get(k, k) != k:
            k = self.parent[k]
        return k

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def make_plan(gm: fx.GraphModule, config: RuntimeConfig, param_bw: int = 8, output_bw: int = 8,
              leaf_names: frozenset[str] = frozenset()) -> QuantPlan:
    """Decide every quantizer site of ``gm`` (captured, with shapes propagated).

    The passes, each a pure function of the graph and what the passes before it found:
    :func:`fold_batch_norms`, :func:`match_supergroups`, :func:`value_origins`,
    :func:`fold_zero_pads`, :func:`place_sites`, :func:`drop_model_outputs`,
    :func:`share_encodings`, :func:`bias_sources`.
    """
    g = _PlanGraph(gm, leaf_names)
    folds = fold_batch_norms(g)
    group_of, groups = match_supergroups(g, config, folds)
    origins = value_origins(g)
    pads = fold_zero_pads(g)
    walk = place_sites(g, config, folds, group_of, origins, param_bw=param_bw, output_bw=output_bw, pad_folds=pads)
    sites = drop_model_outputs(g, config, walk.sites, walk.source, folds)
    merged = share_encodings(sites, walk.uf)
    merged = bias_sources(g, config, merged, walk, folds)
    index = {n.name: i for i, n in enumerate(g.nodes)}
    module_index = {n.target: i for i, n in reversed(list(enumerate(g.nodes))) if n.op == "call_module"}
    ordered = sorted(merged.values(), key=lambda s: _order(s, index, module_index))
    kept = tuple((n, walk.uf.find(k)) for n, k in walk.passthrough if walk.uf.find(k) in merged)
    return QuantPlan(tuple(ordered), tuple((c.name, b.name) for c, b in folds.items()),
                     tuple(tuple(x.name for x in grp) for grp in groups), tuple(walk.unsupported), kept,
                     tuple((p.name, c.name) for p, c in pads.items()))


class _PlanGraph:
    """What every pass reads: the nodes in order, their op types and the module table."""

    def __init__(self, gm: fx.GraphModule, leaf_names: frozenset[str]):
        self.modules = dict(gm.named_modules())
        self.nodes = list(gm.graph.nodes)
        self.types = {n: op_type_of(n, self.modules, leaf_names) for n in self.nodes}
        self.calls = Counter(n.target for n in self.nodes if n.op == "call_module")


def fold_batch_norms(g: _PlanGraph) -> dict[fx.Node, fx.Node]:
    """Pass 1: ``{weighted node: BatchNorm node}`` for every BatchNorm folded into its layer.

    A Conv / ConvTranspose / Linear module folds the BatchNorm it feeds when that BatchNorm is
    its only user, both modules are called once, the BN has running statistics and its channel
    count matches the layer's outputs. Otherwise both stay (the BN is an op of its own)."""
    folds: dict[fx.Node, fx.Node] = {}
    for n in g.nodes:
        if n.op != "call_module" or g.types[n] not in WEIGHT_AXIS or g.types[n] == "Gather" or len(n.users) != 1:
            continue
        (u,) = n.users
        if g.types[u] != "BatchNormalization" or u.op != "call_module" or u.args[0] is not n:
            continue
        bn = g.modules[u.target]
        if g.calls[n.target] == 1 and g.calls[u.target] == 1 and bn.running_mean is not None \
                and bn.num_features == _out_channels(g.modules[n.target]):
            folds[n] = u
    return folds


def match_supergroups(g: _PlanGraph, config: RuntimeConfig, folds: dict[fx.Node, fx.Node]):
    """Pass 2: the config's supergroups matched along single-user chains, longest pattern first,
    in graph order. Returns ``({node: its group}, [groups])``; a folded pair outside any pattern
    is a group of its own."""
    folded_bn = set(folds.values())
    tail = lambda n: folds.get(n, n)  # noqa: E731
    patterns = sorted({_normalize(p) for p in config.supergroups if len(_normalize(p)) > 1}, key=len, reverse=True)
    group_of: dict[fx.Node, tuple[fx.Node, ...]] = {}
    groups = []
    for n in g.nodes:
        if n in group_of or n in folded_bn or g.types[n] is None:
            continue
        for pat in patterns:
            if g.types[n] != pat[0]:
                continue
            chain, cur = [n], n
            for t in pat[1:]:
                users = list(tail(cur).users)
                if len(users) != 1 or g.types.get(users[0]) != t or users[0] in group_of:
                    break
                cur = users[0]
                chain.append(cur)
            else:
                full = tuple(x for c in chain for x in ((c, folds[c]) if c in folds else (c,)))
                for x in full:
                    group_of[x] = full
                groups.append(full)
                break
    for conv, bn in folds.items():
        if conv not in group_of:
            group_of[conv] = group_of[bn] = (conv, bn)
    return group_of, groups


#: where a value comes from: the model's (float) data, a mask or ids (non-float inputs and what is
#: computed from them without a weighted op), or constants (parameters, buffers, literals)
ACTIVATION, MASK, CONSTANT = "activation", "mask", "constant"


def value_origins(g: _PlanGraph) -> dict[fx.Node, str]:
    """Pass 3: the origin of every node's value. A float value of ``MASK`` origin (an additive
    attention mask made from an int mask) is never quantized: its -inf / finfo.min entries would
    wreck any grid; an op that adds it to an activation hands the sum on in float."""
    origin: dict[fx.Node, str] = {}
    for n in g.nodes:
        if n.op == "placeholder":
            origin[n] = ACTIVATION if n.meta.get("qat_kind") in ("float", "float_seq") else MASK
        elif n.op == "get_attr" or _shape_only(n):
            origin[n] = CONSTANT
        elif g.types[n] in WEIGHT_AXIS:
            origin[n] = ACTIVATION  # a weighted op's output is data (an embedding of ids too)
        else:
            ins = [origin.get(a, CONSTANT) for a in _tensor_inputs(n)]
            origin[n] = ACTIVATION if ACTIVATION in ins else MASK if MASK in ins else CONSTANT
    return origin


#: tensor constructors that read only their input's shape, dtype and device (Swin's shifted-window
#: mask is ``x.new_zeros(...)`` filled with constants): what they build is a constant, not data
_SHAPE_ONLY = {_aten.new_zeros.default, _aten.new_ones.default, _aten.new_full.default, _aten.new_empty.default,
               _aten.zeros_like.default, _aten.ones_like.default, _aten.full_like.default, _aten.empty_like.default,
               torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like}


def _shape_only(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in ("new_zeros", "new_ones", "new_full", "new_empty")
    return n.op == "call_function" and n.target in _SHAPE_ONLY


@dataclass
class _Walk:
    sites: dict[str, QuantizerSite]
    source: dict[fx.Node, Optional[str]]  # which site's encoding a node's value is on
    uf: "_UnionFind"
    unsupported: list[str]
    passthrough: list[tuple[str, str]]


def zero_pad_amounts(n: fx.Node, modules: dict) -> Optional[tuple[int, ...]]:
    """The ``F.pad`` amounts (last dim first: ``(left, right, top, bottom, ...)``) of a constant
    zero pad with static, non-negative amounts; None for anything else."""
    if n.op == "call_module":
        mod = modules[n.target]
        if not isinstance(mod, nn.modules.padding._ConstantPadNd) or mod.value != 0:
            return None
        pad = tuple(mod.padding)
    elif n.op == "call_function" and n.target is nn.functional.pad:
        pad = n.args[1] if len(n.args) > 1 else n.kwargs.get("pad")
        mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
        value = n.args[3] if len(n.args) > 3 else n.kwargs.get("value", None)
        if mode != "constant" or value not in (None, 0, 0.0):
            return None
    elif n.op == "call_function" and n.target is _aten.pad.default:
        if len(n.args) > 2 and n.args[2] != "constant" or (len(n.args) > 3 and n.args[3] not in (None, 0, 0.0)):
            return None
        pad = n.args[1]
    elif n.op == "call_function" and n.target is _aten.constant_pad_nd.default:
        if len(n.args) > 2 and n.args[2] not in (None, 0, 0.0):
            return None
        pad = n.args[1]
    else:
        return None
    if not isinstance(pad, (tuple, list)) or not all(type(p) is int and p >= 0 for p in pad):
        return None
    return tuple(pad)


def fold_zero_pads(g: _PlanGraph) -> dict[fx.Node, fx.Node]:
    """Pass 4: ``{zero Pad node: Conv node}`` for each constant zero pad (``nn.ZeroPad2d``,
    ``F.pad(x, ..., value=0)``, ``aten.pad`` / ``aten.constant_pad_nd`` from torch.export) with
    static non-negative amounts on the spatial dims only, whose single user is a convolution
    (module with ``padding_mode='zeros'``, or functional) reading it as its data input.

    The pad then belongs to the conv: no quantizer and no repeated encoding after it (the
    simulation convolves the zero-padded quantized input, which is exact: zero is on every
    grid), and the export writes it into the ONNX Conv's ``pads`` (which, unlike torch's
    ``padding``, may be asymmetric, e.g. TF's SAME ``(0, 1, 0, 1)``), so no Pad and no Q/DQ
    pair around it is left for the runtime."""
    folds: dict[fx.Node, fx.Node] = {}
    for n in g.nodes:
        if g.types.get(n) != "Pad" or len(n.users) != 1:
            continue
        (u,) = n.users
        if g.types.get(u) != "Conv" or not u.args or u.args[0] is not n:
            continue
        if u.op == "call_module":
            conv = g.modules[u.target]
            same = isinstance(conv.padding, str) and conv.padding != "valid"
            if getattr(conv, "padding_mode", "zeros") != "zeros" or same:
                continue
            spatial = conv.weight.dim() - 2
        elif u.op == "call_function" and u.target in FUNCTIONAL_WEIGHT_ARG:
            padding = u.args[4] if len(u.args) > 4 else u.kwargs.get("padding", 0)
            if isinstance(padding, str) and padding != "valid":
                continue
            w = u.args[1] if len(u.args) > 1 else u.kwargs.get("weight")
            meta = w.meta if isinstance(w, fx.Node) else {}
            value = meta.get("val", meta.get("tensor_meta"))  # torch.export; propagate_shapes for torch.fx
            shape = value.shape if hasattr(value, "shape") else meta.get("qat_shape")
            if shape is None:
                continue
            spatial = len(shape) - 2
        else:
            continue
        pad = zero_pad_amounts(n, g.modules)
        if pad is None or any(pad[2 * spatial:]):
            continue
        folds[n] = u
    return folds


def _is_masking(n: fx.Node, t: Optional[str], g: _PlanGraph, origins: dict[fx.Node, str]) -> bool:
    """Whether ``n`` prepares attention scores for Softmax, so its output is handed on in float
    (no quantizer; the Softmax output is quantized): ``masked_fill`` / ``where``; an Add / Sub /
    Mul of an activation and a float mask made from the inputs; the scale ``scores * 1/sqrt(d)``;
    or an Add / Sub of a constant (Swin's relative position bias and shifted-window mask of
    -100s), when the result only feeds a Softmax. Runtimes run these in float between the
    MatMul's DequantizeLinear and the Softmax's QuantizeLinear, exactly as the simulation does
    (a quantized Softmax input would let ONNX Runtime swap in QLinearSoftmax, whose lookup-table
    arithmetic is not the float softmax: measured 9-LSB differences on a small ViT)."""
    if t in MASKING:
        return True
    if t not in ("Add", "Sub", "Mul", "Div"):
        return False
    ins = [a for a in _tensor_inputs(n) if a.meta.get("qat_kind") == "float"]
    if not any(origins.get(a) == ACTIVATION for a in ins):
        return False
    if t != "Div" and any(origins.get(a) == MASK for a in ins):
        return True
    if t in ("Mul", "Div") and len(_tensor_inputs(n)) == 1:  # attention's scale: scores * 1/sqrt(d)
        return _feeds_softmax(n, g)
    return t in ("Add", "Sub") and any(origins.get(a) == CONSTANT for a in ins) and _feeds_softmax(n, g)


def _feeds_softmax(n: fx.Node, g: _PlanGraph) -> bool:
    """Every path from ``n`` reaches a Softmax through reshapes and further Add / Sub only."""
    users = [u for u in n.users if u.op != "output"]
    if not users or len(users) != len(n.users):
        return False
    for u in users:
        t = g.types.get(u)
        if t == "Softmax":
            continue
        if t in VALUE_PRESERVING or t in ("Add", "Sub") or t in MASKING:
            if not _feeds_softmax(u, g):
                return False
        else:
            return False
    return True


def place_sites(g: _PlanGraph, config: RuntimeConfig, folds: dict[fx.Node, fx.Node],
                group_of: dict[fx.Node, tuple[fx.Node, ...]], origins: dict[fx.Node, str], *,
                param_bw: int, output_bw: int, pad_folds: Optional[dict[fx.Node, fx.Node]] = None) -> _Walk:
    """Pass 5: walk the graph in order, deciding the sites and which site encodes each value
    (a pad in ``pad_folds`` hands its input's encoding on, with nothing repeated after it)."""
    types, nodes = g.types, g.nodes
    folded_bn = set(folds.values())
    conv_of = {b: c for c, b in folds.items()}
    walk = _Walk({}, {}, _UnionFind(), [], [])
    sites, source, uf = walk.sites, walk.source, walk.uf

    def act_site(key, kind, node, op, where, op_type, consumers=None) -> str:
        sites[key] = QuantizerSite(key, kind, (node.name,), op, where, output_bw,
                                   config.is_activation_symmetric(op_type), consumers=consumers)
        return key

    float_region: set[fx.Node] = set()

    def float_site(n: fx.Node, kind: str) -> None:
        """``n`` holds a float value (an unknown op's output, or moved from one): quantize it
        for the consumers that compute with it, as the runtime would at their inputs."""
        float_region.add(n)
        source[n] = None
        consumers = tuple(u.name for u in n.users if u.op != "output" and types.get(u) is not None
                          and types[u] not in VALUE_PRESERVING)
        if consumers and kind == "float":
            act_site(f"{n.name}_float_output", "input", n, "(float op)", describe(n), None, consumers)

    for n in nodes:
        kind = n.meta.get("qat_kind")
        if n.op == "placeholder":
            quantize = kind == "float" and config.model_input_quantized
            source[n] = act_site(f"{n.name}_input", "input", n, "input", f"input '{n.target}'", None) if quantize else None
            continue
        if n.op in ("get_attr", "output"):
            source[n] = None
            continue
        t = types[n]
        group = group_of.get(n)
        if t in WEIGHT_AXIS:
            _param_site(n, t, g.modules, config, param_bw, sites)
        if kind not in ("float", "float_seq") or origins[n] == MASK or _is_masking(n, t, g, origins):
            source[n] = None  # not data, or data with a mask in it: never quantized
            continue
        if group is not None and n is not group[-1]:
            source[n] = None  # inside a fused group: the runtime never materializes it
            continue
        if t is None:
            if origins[n] == CONSTANT:  # computed from parameters only: a runtime folds it to a constant
                source[n] = None
                continue
            walk.unsupported.append(f"{describe(n)} ({n.op} '{n.name}')")
            float_site(n, kind)
            continue
        if pad_folds and n in pad_folds:
            source[n] = _data_source(n, source)  # the conv's own padding: no site, no passthrough
            continue
        head = group[0] if group else n
        op_name = "+".join(types[x] for x in group) if group else t
        eff_type = types[head] if group and n in folded_bn else t
        if eff_type in VALUE_PRESERVING and not config.is_output_quantized(eff_type):
            source[n] = _data_source(n, source)
            if source[n] is not None and kind == "float":
                walk.passthrough.append((n.name, source[n]))
            if source[n] is None and any(a in float_region for a in _tensor_inputs(n)):
                float_site(n, kind)
            elif source[n] is None and t == "Gather" and kind == "float":
                # rows of an embedding table, each on its own grid: a layer computing with them
                # directly needs them on one grid, which the runtime quantizes them to
                readers = tuple(u.name for u in n.users if types.get(u) in _WEIGHTED)
                if readers:
                    source[n] = act_site(f"{n.name}_output", "output", n, t, describe(n), t, readers)
            continue
        if eff_type == "Concat" and config.rule("Concat").shared_encoding:
            ins = [source.get(a) for a in _tensor_inputs(n) if a.op != "get_attr"]
            if ins and all(ins):
                for k in ins[1:]:
                    uf.union(ins[0], k)
                source[n] = ins[0]
                continue
        if not config.is_output_quantized(eff_type):
            source[n] = None
            continue
        where = describe(head) if head is n else f"{describe(head)} .. {describe(n)}"
        v = conv_of.get(n, n)
        source[n] = act_site(f"{v.name}_output", "output", v, op_name, where, eff_type)
    return walk


#: ops that compute with an activation input in integers when it is on one grid
_WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _data_source(n: fx.Node, source: dict[fx.Node, Optional[str]]) -> Optional[str]:
    """The site whose encoding ``n``'s data input is on (parameters are not data)."""
    for a in _tensor_inputs(n):
        if a.op != "get_attr" and a in source:
            return source[a]
    return None


def drop_model_outputs(g: _PlanGraph, config: RuntimeConfig, sites: dict[str, QuantizerSite],
                       source: dict[fx.Node, Optional[str]], folds: dict[fx.Node, fx.Node]) -> dict[str, QuantizerSite]:
    """Pass 6: without ``model_output.is_output_quantized``, a site on a model output keeps only
    its other consumers (or goes)."""
    sites = dict(sites)
    if config.model_output_quantized:
        return sites
    conv_of = {b: c for c, b in folds.items()}
    out_node = next(n for n in g.nodes if n.op == "output")
    for a in _tensor_inputs(out_node):
        key = source.get(a)
        site = sites.get(key) if key else None
        if site is not None and site.kind == "output" and site.nodes == (conv_of.get(a, a).name,):
            others = tuple(u.name for u in a.users if u is not out_node)
            if others:
                sites[key] = replace(site, consumers=others)
            else:
                del sites[key]
    return sites


def share_encodings(sites: dict[str, QuantizerSite], uf: "_UnionFind") -> dict[str, QuantizerSite]:
    """Pass 7: sites joined by a shared encoding (e.g. Concat in TensorRT) become one site (the
    union-find root) quantizing all their nodes."""
    merged: dict[str, QuantizerSite] = {}
    for key, site in sites.items():
        root = uf.find(key) if site.kind != "param" else key
        if root == key:
            merged.setdefault(key, site)
        else:
            base = merged.get(root, sites[root])
            merged[root] = replace(base, nodes=base.nodes + site.nodes, op=base.op + "|" + site.op)
    return merged


def bias_sources(g: _PlanGraph, config: RuntimeConfig, merged: dict[str, QuantizerSite], walk: _Walk,
                 folds: dict[fx.Node, fx.Node]) -> dict[str, QuantizerSite]:
    """Pass 8: with ``params.bias.is_quantized``, each weighted module's bias is int32 on
    ``scale = input_scale x weight_scale``; the input's site is the op's data source."""
    if not config.param_quantized("bias"):
        return merged
    merged = dict(merged)
    for n in g.nodes:
        weighted = g.types[n] in WEIGHT_AXIS and n.op == "call_module" and \
            getattr(g.modules[n.target], "bias", None) is not None
        if weighted or n in folds:
            key = f"{n.target}.weight"
            src = _data_source(n, walk.source)
            if key in merged and src is not None and src in walk.sites and merged.get(walk.uf.find(src)):
                merged[key] = replace(merged[key], bias_from=walk.uf.find(src))
    return merged


def _order(site: QuantizerSite, index: dict[str, int], module_index: dict[str, int]) -> tuple[int, int]:
    """Graph order: a weight right before the output of the op that uses it."""
    if site.module is not None:
        return (module_index[site.module], 0)
    if site.kind == "param":
        return (min(index[x] for x in site.nodes), 0)
    return (min(index[x] for x in site.nodes), 1)


def _param_site(n: fx.Node, t: str, modules: dict, config: RuntimeConfig, param_bw: int,
                sites: dict[str, QuantizerSite]) -> None:
    if not config.param_quantized("weight"):
        return
    per_channel = config.weight_per_channel(t)
    symmetric = config.param_symmetric("weight")
    if n.op == "call_module":
        weight = modules[n.target].weight
        key, nodes, where, module = f"{n.target}.weight", (), f"{n.target}.weight", str(n.target)
    elif n.op == "call_function" and n.target in FUNCTIONAL_WEIGHT_ARG:
        idx = FUNCTIONAL_WEIGHT_ARG[n.target]
        w = n.args[idx] if len(n.args) > idx else n.kwargs.get("weight")
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            return  # computed weights: nothing static to quantize
        weight = _get_attr(modules, w.target)
        key, nodes, where, module = f"{w.name}_param", (w.name,), str(w.target), None
    else:
        return
    if key in sites:
        return
    axis = WEIGHT_AXIS[t] if per_channel else None
    channels = weight.shape[axis] if axis is not None else 0
    sites[key] = QuantizerSite(key, "param", nodes, t, where, param_bw, symmetric, axis, channels, module=module)


def _get_attr(modules: dict, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(modules[owner], attr)
