"""Automatic mixed-precision search: per layer group, pick one of several ``(param_bw, output_bw)``
candidates so that a size / bitops budget or an accuracy target holds.

    from qat_plugin.mixed_precision import choose_mixed_precision
    result = choose_mixed_precision(sim, eval_callback, forward_pass_callback, [(4, 8), (8, 8)],
                                    max_relative_size=0.6, results_dir="out/amp")
    print(result)        # evaluations, chosen point, pareto front
    sim.export(...)      # the sim is left with the chosen bitwidths, calibrated

Definitions (both relative to every site at the highest candidate bitwidths):

* **size**: ``sum over weight sites of (number of weights x param_bw)``, in bits.
* **bitops**: ``sum over weighted layers of (MACs x param_bw x bitwidth of the layer's input
  quantizer)``, plus ``sum over activation x activation matmuls (attention's q @ k^T and
  attn @ v) of (MACs x the bitwidths of both input quantizers)``. MACs per sample come from
  the weight shape and the layer's output shape, recorded with forward hooks during one
  ``forward_pass_callback`` run (functional weights such as ``F.linear(x, self.w)`` and
  embedding tables count as 0 MACs; their size counts); a matmul's MACs are its output
  elements x the shared dimension, from the shapes of the first batch of that run, divided
  by its batch size. The input quantizer is the activation site an operand reads (found in
  the graph, walking back over views, transposes and scalings); an operand with none counts
  the sim's ``default_output_bw``.
* **activation bits**: ``sum over activation sites of (elements per sample x output_bw)``, the
  quantized activations one sample moves (counted by the same hooks); it sees what bitops
  miss, e.g. a 16-bit softmax or residual add.

The search (the algorithm, and its cost in evaluations ``eval_callback(sim.model)``):

1. One calibration per candidate (every site at that candidate) fills an encoding cache.
   One evaluation with every quantizer bypassed gives the FP32 score.
2. Phase 1, sensitivity: for each layer group (see :func:`qat_plugin.analysis.layer_groups`)
   and each of its lower options, the score with only that group quantized (one evaluation
   each; groups whose options coincide, e.g. activation-only groups under W4A8/W8A8, cost
   nothing). ``phase1="sqnr"`` ranks by the SQNR proxy instead (no evaluations): the rise in
   the group's summed relative noise power ``10^(-SQNR/10)`` from its highest option.
3. The moves "group g goes down to option o" are sorted by score drop per share saved of one
   measure -- size with ``max_relative_size``; bitops with only ``max_relative_bitops``; with an
   accuracy target alone, size if the candidates differ in ``param_bw``, else activation bits --
   plus a tenth of the shares of the other two, so that moves the main measure does not see
   still rank by harm per bit. The pareto front is drawn over that same measure. Configuration ``k`` applies the first
   ``k`` moves, so size and bitops fall with ``k``; the budgets give the smallest admissible
   ``k`` without any evaluation. With ``allowed_accuracy_drop``, a binary search over ``k``
   finds the largest ``k`` whose score stays within the drop of FP32 (``log2(moves)``
   evaluations); without it the smallest admissible ``k`` is taken. ``curve_points`` more
   evenly spaced configurations are scored for the pareto curve.
4. The chosen bitwidths are set, the sim is calibrated again and scored once more.

Total: ``1 + moves + 3 + curve_points + 1`` evaluations (plus ``log2(moves)`` with an accuracy
target; configurations already scored are not scored again), against
``sites x candidates`` for an exhaustive per-site pass.

Inside a Lightning fit, ``QuantizationAwareTraining(mixed_precision=MixedPrecisionConfig(...))``
runs the search with :func:`search_on_batches` right after the network is quantized, before the
optimizer exists: no labels and no user callback, the score is :func:`output_agreement_score`
(``-100 x KL(FP32 || sim)`` on the calibration batches).
"""
from __future__ import annotations

import importlib
import json
import math
import operator
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .analysis import (GROUPINGS, EvalCallback, ForwardPassCallback, SensitivityResult, SensitivityRow, evaluate,
                       figure_classes, layer_groups, quantize_only, site_sqnr)
from .config import check_exportable_bitwidth
from .errors import QuantConfigError, did_you_mean
from .dist import collective_device, world

PHASE1 = ("eval", "sqnr")


@dataclass(frozen=True)
class ParetoPoint:
    relative_size: float
    relative_bitops: float
    score: float
    moves: int  # how many moves of the sorted list this configuration applies
    bitwidths: dict = field(default_factory=dict, compare=False, repr=False)  # site key -> bits
    relative_activation_bits: float = 1.0  # quantized activation bits per sample, relative


@dataclass
class MixedPrecisionResult:
    """What :func:`choose_mixed_precision` found. ``pareto_front``: the evaluated configurations
    that no other evaluated one beats on both size and score, smallest first."""

    pareto_front: list[ParetoPoint]  # by ``front_cost``
    chosen: ParetoPoint
    final_score: float  # the chosen bitwidths after a full re-calibration
    fp32_score: float
    evaluations: int
    calibrations: int
    points: list[ParetoPoint]  # every evaluated configuration
    sensitivity: SensitivityResult
    front_cost: str = "relative_size"  # the measure the moves were ranked by and the front is drawn over
    files: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        c = self.chosen
        lines = [f"mixed precision: {self.evaluations} evaluations, {self.calibrations} calibrations; FP32 score "
                 f"{self.fp32_score:.4g}",
                 f"chosen: size {c.relative_size:.3f}, bitops {c.relative_bitops:.3f}, activation bits "
                 f"{c.relative_activation_bits:.3f}, score {c.score:.4g} (after re-calibration {self.final_score:.4g}), "
                 f"{c.moves} moves",
                 f"pareto front over {self.front_cost} (relative size, bitops, activation bits, score):"]
        lines += [f"  {p.relative_size:.3f}  {p.relative_bitops:.3f}  {p.relative_activation_bits:.3f}  {p.score:.4g}"
                  for p in self.pareto_front]
        return "\n".join(lines)


# ---- cost model ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    """Weights per weight site, MACs per sample and input site of each weighted layer."""

    weights: dict  # weight site -> number of weights
    macs: dict  # weight site -> MACs per sample
    input_site: dict  # weight site -> activation site feeding the layer (None: unquantized input)
    default_input_bw: int
    activations: dict = field(default_factory=dict)  # activation site -> elements per sample
    #: activation x activation matmul node -> (MACs per sample, site of operand a, site of operand b)
    matmuls: dict = field(default_factory=dict)

    def activation_bits(self, bits: dict) -> float:
        """Bits of quantized activations per sample (a tie-breaker when size and bitops do not move)."""
        return float(sum(n * bits[k] for k, n in self.activations.items()))

    def size(self, bits: dict) -> float:
        return float(sum(n * bits[k] for k, n in self.weights.items()))

    def bitops(self, bits: dict) -> float:
        bw = lambda site: bits[site] if site else self.default_input_bw  # noqa: E731
        return float(sum(m * bits[k] * bw(self.input_site[k]) for k, m in self.macs.items())
                     + sum(m * bw(a) * bw(b) for m, a, b in self.matmuls.values()))


def _source(sim, node) -> tuple[str, Optional[str]]:
    """Where the value a node reads comes from, walking back over first arguments (views,
    transposes, scalings): ``("act", key)`` / ``("param", key)`` for a quantizer site,
    ``("const", None)`` for a parameter or buffer, ``("input", None)`` otherwise."""
    for _ in range(32):
        if not isinstance(node, torch.fx.Node):
            return "input", None
        if node.op == "call_module" and str(node.target).startswith("quantizers."):
            key = str(node.target)[len("quantizers."):]
            if key not in sim.quantizers():
                return "input", None
            return ("param" if sim.plan.site(key).kind == "param" else "act"), key
        if node.op == "get_attr":
            return "const", None
        if node.op == "placeholder" or not node.args:
            return "input", None
        node = node.args[0]
    return "input", None


def _input_site(sim, module_path: str) -> Optional[str]:
    """The activation site feeding a weighted module, walking back over value-preserving nodes."""
    graph = getattr(sim.model, "graph", None)
    if graph is None:
        return None
    node = next((n for n in graph.nodes if n.op == "call_module" and n.target == module_path), None)
    if node is None or not node.args:
        return None
    kind, key = _source(sim, node.args[0])
    return key if kind == "act" else None


_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.ops.aten.matmul.default,
                     torch.ops.aten.bmm.default, torch.ops.aten.mm.default}
_MATMUL_METHODS = {"matmul", "bmm", "mm", "__matmul__"}


def _activation_matmuls(sim) -> dict:
    """Matmul nodes whose two operands are both activations (neither reads a weight), with the
    activation site of each operand (``None``: an unquantized input)."""
    graph = getattr(sim.model, "graph", None)
    out = {}
    for n in graph.nodes if graph is not None else ():
        if not ((n.op == "call_function" and n.target in _MATMUL_FUNCTIONS)
                or (n.op == "call_method" and n.target in _MATMUL_METHODS)) or len(n.args) < 2:
            continue
        (ka, a), (kb, b) = _source(sim, n.args[0]), _source(sim, n.args[1])
        if "param" not in (ka, kb) and "const" not in (ka, kb):
            out[n] = (a, b)
    return out


class _MatmulShapes(torch.fx.Interpreter):
    """Runs a GraphModule and records ``(a.shape, b.shape, out.shape)`` of the given matmul nodes."""

    def __init__(self, gm, nodes):
        super().__init__(gm)
        self.nodes, self.shapes = set(nodes), {}

    def run_node(self, n):
        result = super().run_node(n)
        if n in self.nodes:
            self.shapes[n] = (tuple(self.env[n.args[0]].shape), tuple(self.env[n.args[1]].shape), tuple(result.shape))
        return result


def matmul_macs(a_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Multiply-accumulates of ``a @ b``: each output element is a dot product over ``a``'s last
    dimension.

    >>> matmul_macs((2, 4, 5, 8), (2, 4, 5, 5))   # q @ k^T: 2 x 4 heads x 5 x 5 scores of length 8
    1600
    """
    return math.prod(out_shape) * a_shape[-1]


def cost_model(sim, forward_pass_callback: ForwardPassCallback, forward_pass_callback_args: Any = None) -> CostModel:
    """Weight counts from the weights; MACs per sample from one forward pass with hooks on the
    weighted layers (quantizers bypassed)."""
    weights, macs, inputs, acts = {}, {}, {}, {}
    hooks = []

    def count(key):
        def fn(module, args, out):
            if key not in acts and isinstance(args[0], torch.Tensor):
                x = args[0]
                acts[key] = x[0].numel() if x.dim() > 1 else x.numel()
        return fn

    def hook(key):
        def fn(module, args, out):
            if key in macs or not isinstance(out, torch.Tensor) or out.dim() == 0:
                return
            w = module.weight
            if isinstance(module, nn.modules.conv._ConvTransposeNd):  # each input element feeds weight/in_channels outputs
                macs[key] = args[0][0].numel() * w.numel() // module.in_channels
            elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):  # output element: weight/out_channels MACs
                out_ch = module.out_features if isinstance(module, nn.Linear) else module.out_channels
                macs[key] = out[0].numel() * w.numel() // out_ch
            else:  # an embedding table (Gather) looks rows up: no multiply-accumulates
                macs[key] = 0
        return fn

    matmuls = _activation_matmuls(sim)
    first: dict = {}
    if matmuls:  # the first batch's inputs, for one shape-recording run over the graph
        def keep_first(module, args):
            first.setdefault("args", args)  # returns None: the inputs pass unchanged
        hooks.append(sim.model.register_forward_pre_hook(keep_first))
    for s in sim.quantizer_sites():
        if s.kind != "param":
            hooks.append(sim.quantizers()[s.key].register_forward_hook(count(s.key)))
            continue
        weights[s.key] = sim.weight_of(s.key).numel()
        if s.module is not None:
            inputs[s.key] = _input_site(sim, s.module)
            hooks.append(sim.model.get_submodule(s.module).register_forward_hook(hook(s.key)))
    mm = {}
    try:
        with quantize_only(sim, ()), torch.no_grad():
            forward_pass_callback(sim.model, forward_pass_callback_args)
            for h in hooks:
                h.remove()
            if first:
                rec = _MatmulShapes(sim.model, matmuls)
                rec.run(*first["args"])
                x = next((t for t in first["args"] if isinstance(t, torch.Tensor) and t.dim() > 0), None)
                batch = x.shape[0] if x is not None else 1
                mm = {n.name: (matmul_macs(a, o) // batch, *matmuls[n]) for n, (a, _, o) in rec.shapes.items()}
    finally:
        for h in hooks:
            h.remove()
    for k in weights:
        macs.setdefault(k, 0)
        inputs.setdefault(k, None)
    return CostModel(weights, macs, inputs, sim.output_bw, acts, mm)


# ---- search ------------------------------------------------------------------------------------
def _check_candidates(candidates) -> list[tuple[int, int]]:
    """Validated ``(param_bw, output_bw)`` pairs, lowest cost (``param_bw * output_bw``) first."""
    pairs = []
    for c in candidates:
        if not isinstance(c, (tuple, list)) or len(c) != 2:
            raise QuantConfigError(f"candidates are (param_bw, output_bw) pairs, got {c!r} in {candidates!r}")
        pairs.append((check_exportable_bitwidth("candidate param_bw", c[0]),
                      check_exportable_bitwidth("candidate output_bw", c[1])))
    pairs = sorted(set(pairs), key=lambda c: (c[0] * c[1], c[0], c[1]))
    if len(pairs) < 2:
        raise QuantConfigError(f"give at least two different (param_bw, output_bw) candidates, got {candidates!r}")
    return pairs


def _check_targets(allowed_accuracy_drop, max_relative_size, max_relative_bitops) -> None:
    if allowed_accuracy_drop is None and max_relative_size is None and max_relative_bitops is None:
        raise QuantConfigError("give allowed_accuracy_drop, max_relative_size and/or max_relative_bitops")
    for name, v in (("allowed_accuracy_drop", allowed_accuracy_drop), ("max_relative_size", max_relative_size),
                    ("max_relative_bitops", max_relative_bitops)):
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or math.isnan(v)):
            raise QuantConfigError(f"{name} must be a number >= 0, got {v!r}")


def _options(group, sim, cands) -> list[dict]:
    """The distinct bitwidth assignments the candidates give a group, highest cost last."""
    seen, out = set(), []
    for p, o in cands:
        bits = {k: (p if sim.plan.site(k).kind == "param" else o) for k in group.sites}
        key = tuple(sorted(bits.items()))
        if key not in seen:
            seen.add(key)
            out.append(bits)
    return out


def choose_mixed_precision(sim, eval_callback: EvalCallback, forward_pass_callback: ForwardPassCallback,
                           candidates: Sequence[tuple[int, int]], *, allowed_accuracy_drop: Optional[float] = None,
                           max_relative_size: Optional[float] = None, max_relative_bitops: Optional[float] = None,
                           results_dir: Optional[str] = None, forward_pass_callback_args: Any = None,
                           by: str = "layer", phase1: str = "eval", curve_points: int = 4,
                           verbose: bool = True) -> MixedPrecisionResult:
    """Choose a bitwidth candidate per layer group; leave ``sim`` configured and calibrated.

    Args:
        sim: a :class:`~qat_plugin.QuantSimModel`; every site is (re)assigned.
        eval_callback: ``eval_callback(model) -> float``, higher is better.
        forward_pass_callback: the callable ``compute_encodings`` takes (with
            ``forward_pass_callback_args``).
        candidates: ``(param_bw, output_bw)`` pairs, e.g. ``[(4, 8), (8, 8)]`` or
            ``[(8, 8), (8, 16)]``; bitwidths ONNX can express (4, 8, 16).
        allowed_accuracy_drop: keep the score at or above ``fp32_score - allowed_accuracy_drop``
            while lowering as many groups as possible.
        max_relative_size / max_relative_bitops: budgets relative to every site at the highest
            candidate bitwidths (see the module docstring for the definitions).
        results_dir: writes ``pareto.png``, ``mixed_precision.json`` (chosen per-site bitwidths,
            every evaluated point, the pareto front) and ``phase1_sensitivity.csv`` / ``.png``.
        by: ``"layer"`` (a weight and its layer's output quantizer choose together) or ``"site"``.
        phase1: ``"eval"`` (one evaluation per group and lower option) or ``"sqnr"`` (rank by the
            SQNR proxy, no evaluations).
        curve_points: extra evenly spaced configurations scored for the pareto curve.

    Give at least one of the three targets. With a budget and an accuracy drop, the budget
    wins: if no admissible configuration meets the drop, the best admissible one is chosen
    and a warning says so. A budget below what every group at its lowest option reaches
    raises :class:`QuantConfigError` naming that smallest reachable value.
    """
    cands = _check_candidates(candidates)
    _check_targets(allowed_accuracy_drop, max_relative_size, max_relative_bitops)
    if phase1 not in PHASE1:
        raise QuantConfigError(f"unknown phase1 '{phase1}'." + did_you_mean(phase1, PHASE1))
    if isinstance(curve_points, bool) or not isinstance(curve_points, int) or curve_points < 0:
        raise QuantConfigError(f"curve_points must be an int >= 0, got {curve_points!r}")

    groups = layer_groups(sim, by)
    keys = [s.key for s in sim.quantizer_sites()]
    kinds = {s.key: s.kind for s in sim.quantizer_sites()}
    top = {k: max(c[0] if kinds[k] == "param" else c[1] for c in cands) for k in keys}
    low = {k: min(c[0] if kinds[k] == "param" else c[1] for c in cands) for k in keys}
    counter = {"evals": 0, "calibrations": 0}

    def score_of(bits: dict, only: Optional[Sequence[str]] = None) -> float:
        _configure(sim, bits, cache)
        counter["evals"] += 1
        if only is None:
            return evaluate(eval_callback, sim.model)
        with quantize_only(sim, only):
            return evaluate(eval_callback, sim.model)

    # 1. encodings per candidate; FP32 score; the cost model.
    cache: dict[tuple[str, int], Any] = {}
    sqnr: dict[tuple[str, int], float] = {}  # the SQNR proxy per (site, bits): one forward pass per candidate
    for p, o in cands:
        sim.set_bitwidths({k: (p if kinds[k] == "param" else o) for k in keys})
        sim.compute_encodings(forward_pass_callback, forward_pass_callback_args)
        counter["calibrations"] += 1
        for k, q in sim.quantizers().items():
            cache[(k, q.bitwidth)] = q.encoding
        for k, db in site_sqnr(sim, forward_pass_callback, forward_pass_callback_args).items():
            sqnr[(k, sim.quantizers()[k].bitwidth)] = db
    noise = {kb: (10 ** (-db / 10) if math.isfinite(db) else 0.0) for kb, db in sqnr.items()}  # relative power
    costs = cost_model(sim, forward_pass_callback, forward_pass_callback_args)
    ref_size, ref_bitops = costs.size(top) or 1.0, costs.bitops(top) or 1.0
    with quantize_only(sim, ()):
        counter["evals"] += 1
        fp32 = evaluate(eval_callback, sim.model)

    # 2. phase 1: one score per (group, lower option).
    if max_relative_size is not None:
        metric = "size"
    elif max_relative_bitops is not None:
        metric = "bitops"
    else:  # accuracy target only: rank by what the candidates change (weights: size; else activation bits)
        metric = "size" if len({c[0] for c in cands}) > 1 else "acts"
    ref_acts = costs.activation_bits(top) or 1.0
    moves, rows = [], []
    for g in groups:
        for bits in _options(g, sim, cands)[:-1]:
            if phase1 == "eval":
                score = score_of({**top, **bits}, only=g.sites)
                drop = fp32 - score
            else:
                score = float("nan")
                drop = sum(noise.get((k, b), 0.0) - noise.get((k, top[k]), 0.0) for k, b in bits.items())
            trial = {**top, **bits}
            saved_size = costs.size(top) - costs.size(trial)
            saved_bitops = costs.bitops(top) - costs.bitops(trial)
            # the ranked share saved: the metric's, plus a tenth of the other two (tie-breakers, so
            # that a move the metric does not see, e.g. a softmax output, still ranks by harm per bit)
            shares = {"size": saved_size / ref_size, "bitops": saved_bitops / ref_bitops,
                      "acts": (costs.activation_bits(top) - costs.activation_bits(trial)) / ref_acts}
            saved = shares[metric] + 0.1 * sum(v for k, v in shares.items() if k != metric)
            moves.append((g, bits, drop, saved))
            rows.append(SensitivityRow(g.name, g.sites, _label(sim, bits), score, drop,
                                       min((sqnr.get((k, b), math.inf) for k, b in bits.items()), default=math.inf)))
    sens = SensitivityResult(fp32, rows, counter["evals"] - 1)
    # least harm per share saved first; moves that save nothing go last
    moves.sort(key=lambda m: (m[3] <= 0, (m[2] / m[3]) if m[3] > 0 else m[2]))
    front_cost = {"size": "relative_size", "bitops": "relative_bitops", "acts": "relative_activation_bits"}[metric]

    configs = [dict(top)]
    for g, bits, _, _ in moves:
        cur = dict(configs[-1])
        if sum(bits.values()) < sum(cur[k] for k in bits):
            cur.update(bits)
        configs.append(cur)
    rel_size = [costs.size(c) / ref_size for c in configs]
    rel_bitops = [costs.bitops(c) / ref_bitops for c in configs]
    rel_acts = [costs.activation_bits(c) / ref_acts for c in configs]

    # 3. budgets -> smallest admissible k; accuracy -> binary search.
    k_lo = 0
    for name, budget, rel, reach in (("max_relative_size", max_relative_size, rel_size, costs.size(low) / ref_size),
                                     ("max_relative_bitops", max_relative_bitops, rel_bitops,
                                      costs.bitops(low) / ref_bitops)):
        if budget is None:
            continue
        ok = [k for k, r in enumerate(rel) if r <= budget + 1e-12]
        if not ok:
            smallest = min(rel)
            raise QuantConfigError(
                f"{name}={budget} cannot be reached with candidates {cands}: the smallest reachable is "
                f"{smallest:.4f} (every group at its lowest candidate; all sites at the lowest bitwidths: "
                f"{reach:.4f}); raise the budget or add a lower candidate")
        k_lo = max(k_lo, ok[0])
    scores: dict[int, float] = {}

    def score_k(k: int) -> float:
        if k not in scores:
            scores[k] = score_of(configs[k])
        return scores[k]

    chosen_k = k_lo
    if allowed_accuracy_drop is not None:
        target = fp32 - allowed_accuracy_drop
        if score_k(k_lo) < target:
            msg = (f"no configuration within the budget keeps the score within {allowed_accuracy_drop} of FP32 "
                   f"({fp32:.4g}): the best admissible scores {scores[k_lo]:.4g}")
            if k_lo == 0:
                msg = (f"even every site at the highest candidate scores {scores[0]:.4g}, more than "
                       f"{allowed_accuracy_drop} below FP32 ({fp32:.4g})")
            warnings.warn(msg + "; keeping the least compressed admissible configuration", stacklevel=2)
        elif score_k(len(moves)) >= target:
            chosen_k = len(moves)
        else:
            lo, hi = k_lo, len(moves)  # score(lo) >= target > score(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if score_k(mid) >= target else (lo, mid)
            chosen_k = lo
    else:
        score_k(k_lo)
    for i in range(curve_points):
        score_k(round((i + 1) * len(moves) / (curve_points + 1)))
    score_k(0)
    score_k(len(moves))

    points = [ParetoPoint(rel_size[k], rel_bitops[k], s, k, configs[k], rel_acts[k]) for k, s in sorted(scores.items())]
    chosen = next(p for p in points if p.moves == chosen_k)
    front = pareto_front(points, front_cost)

    # 4. the chosen configuration, calibrated for good.
    sim.set_bitwidths(configs[chosen_k])
    sim.compute_encodings(forward_pass_callback, forward_pass_callback_args)
    counter["calibrations"] += 1
    counter["evals"] += 1
    final = evaluate(eval_callback, sim.model)
    result = MixedPrecisionResult(front, chosen, final, fp32, counter["evals"], counter["calibrations"], points, sens,
                                  front_cost)
    if results_dir is not None:
        os.makedirs(results_dir, exist_ok=True)
        result.files["json"] = _write_json(result, os.path.join(results_dir, "mixed_precision.json"), cands,
                                           dict(allowed_accuracy_drop=allowed_accuracy_drop,
                                                max_relative_size=max_relative_size,
                                                max_relative_bitops=max_relative_bitops), sim)
        result.files["png"] = plot_pareto(result, os.path.join(results_dir, "pareto.png"),
                                          budget_size=max_relative_size, budget_bitops=max_relative_bitops,
                                          allowed_accuracy_drop=allowed_accuracy_drop)
        result.files["sensitivity_csv"] = sens.to_csv(os.path.join(results_dir, "phase1_sensitivity.csv"))
        result.files["sensitivity_png"] = sens.plot(os.path.join(results_dir, "phase1_sensitivity.png"),
                                                    title="Phase 1: each layer group alone at its lower option")
    if verbose:
        print(result)
    return result


def _label(sim, bits: dict) -> str:
    ws = sorted({b for k, b in bits.items() if sim.plan.site(k).kind == "param"})
    as_ = sorted({b for k, b in bits.items() if sim.plan.site(k).kind != "param"})
    return " ".join((["W" + "/".join(map(str, ws))] if ws else []) + (["A" + "/".join(map(str, as_))] if as_ else []))


def _configure(sim, bits: dict, cache: dict) -> None:
    """Set bitwidths and load the cached encodings of those bitwidths."""
    sim.set_bitwidths(bits)
    for k, q in sim.quantizers().items():
        enc = cache.get((k, q.bitwidth))
        if enc is not None:
            q.set_encoding(enc)


def pareto_front(points: Sequence[ParetoPoint], cost: str = "relative_size") -> list[ParetoPoint]:
    """The points no other point beats on both ``cost`` (lower) and score (higher), by cost.

    >>> pts = [ParetoPoint(1.0, 1.0, 0.9, 0), ParetoPoint(0.5, 0.5, 0.8, 1), ParetoPoint(0.6, 0.6, 0.7, 2)]
    >>> [p.moves for p in pareto_front(pts)]
    [1, 0]
    """
    out, best = [], -math.inf
    for p in sorted(points, key=lambda p: (getattr(p, cost), -p.score)):
        if p.score > best:
            out.append(p)
            best = p.score
    return out


def _write_json(result: MixedPrecisionResult, path: str, cands, targets: dict, sim) -> str:
    point = lambda p: {k: v for k, v in asdict(p).items() if k != "bitwidths"}
    data = {
        "candidates": [list(c) for c in cands], "targets": targets, "fp32_score": result.fp32_score,
        "evaluations": result.evaluations, "calibrations": result.calibrations,
        "chosen": {**point(result.chosen), "final_score": result.final_score},
        "bitwidths": {s.key: s.bitwidth for s in sim.quantizer_sites()},
        "pareto_front": [point(p) for p in result.pareto_front],
        "points": [point(p) for p in result.points],
        "phase1": [{"group": r.group, "bits": r.bitwidths, "drop": r.drop} for r in result.sensitivity.rows],
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


def plot_pareto(result: MixedPrecisionResult, path: str, *, budget_size: Optional[float] = None,
                budget_bitops: Optional[float] = None, allowed_accuracy_drop: Optional[float] = None,
                title: str = "Mixed-precision search") -> str:
    """PNG: score against the measure the search ranked by (left: size, bitops or activation bits)
    and bitops (or size; right); every evaluated configuration, the pareto front, the chosen
    point, FP32 and the budgets."""
    Figure, FigureCanvasAgg = figure_classes()
    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    # keep the interesting band readable: points far below FP32 are drawn on the floor, labelled
    span = max(result.fp32_score - result.chosen.score, allowed_accuracy_drop or 0.0,
               max(p.score for p in result.points) - result.chosen.score, 1e-12)
    floor = result.fp32_score - 6 * span
    clipped = any(p.score < floor for p in result.points)
    y = lambda p: max(p.score, floor) if clipped else p.score
    labels = {"relative_size": ("weight size relative to all-highest", budget_size),
              "relative_bitops": ("bitops relative to all-highest", budget_bitops),
              "relative_activation_bits": ("activation bits relative to all-highest", None)}
    second = "relative_bitops" if result.front_cost != "relative_bitops" else "relative_size"
    for ax, attr in ((axes[0], result.front_cost), (axes[1], second)):
        label, budget = labels[attr]
        pts = sorted(result.points, key=lambda p: getattr(p, attr))
        front = pareto_front(result.points, attr)
        ax.scatter([getattr(p, attr) for p in pts], [y(p) for p in pts], color="#999999", s=18,
                   label="evaluated", zorder=2)
        ax.plot([getattr(p, attr) for p in front], [y(p) for p in front], "-o", color="#4f81bd", ms=4,
                label="pareto front", zorder=3)
        low = [p for p in pts if clipped and p.score < floor]
        for i, p in enumerate(low):  # staggered so that neighbours stay legible
            ax.annotate(f"{p.score:.4g}", (getattr(p, attr), floor), textcoords="offset points",
                        xytext=(4, 4 + 9 * (i % 3)), fontsize=7, color="#555555")
        ax.scatter([getattr(result.chosen, attr)], [result.chosen.score], marker="*", s=180, color="#c0504d",
                   label=f"chosen ({result.final_score:.4g} recalibrated)", zorder=4)
        ax.axhline(result.fp32_score, color="black", lw=0.8, ls="--", label="FP32")
        if allowed_accuracy_drop is not None:
            ax.axhline(result.fp32_score - allowed_accuracy_drop, color="#c0504d", lw=0.8, ls=":",
                       label="FP32 - allowed drop")
        if budget is not None:
            ax.axvline(budget, color="#9bbb59", lw=1.0, ls="-.", label="budget")
        if clipped:
            ax.axhline(floor, color="#999999", lw=0.6, ls=(0, (1, 3)), label="floor (lower scores written)")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score (eval_callback)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title}: {result.evaluations} evaluations")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ---- inside a Lightning fit: QuantizationAwareTraining(mixed_precision=...) ---------------------
def _run(model: nn.Module, x: Any) -> Any:
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def _log_probs(out: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output (a tensor, or the values of a tuple / list / dict),
    each as float64 log-probabilities over its last dimension, one row per leading index."""
    values = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else [out]
    tensors = [t for t in values if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0]
    if not tensors:
        raise QuantConfigError(f"the model's output ({type(out).__name__}) has no floating tensor to score; give "
                               "mixed_precision a score= function (model -> float, higher is better)")
    return [F.log_softmax(t.detach().double().reshape(-1, t.shape[-1]), dim=-1) for t in tensors]


def output_agreement_score(sim, inputs: Sequence[Any]) -> EvalCallback:
    """A label-free ``eval_callback``: ``-100 x`` the mean over rows of ``KL(FP32 || model)``,
    the softmax over the last dimension of each output tensor, on ``inputs`` (each a model
    input, or a tuple of them). Higher is better; 0 is identical. The FP32 reference is
    ``sim``'s network with every quantizer bypassed, computed once, here. Under DDP the KL sum
    and row count are all-reduced, so every rank gets the same score: that of all ranks'
    inputs together (every rank must call the score the same number of times).

    >>> from qat_plugin import QuantSimModel
    >>> _ = torch.manual_seed(0); x = torch.randn(16, 4)
    >>> sim = QuantSimModel(nn.Sequential(nn.Linear(4, 3)), x, default_param_bw=4)
    >>> sim.compute_encodings(lambda m, _: m(x))
    >>> score = output_agreement_score(sim, [x])
    >>> with quantize_only(sim, ()):
    ...     score(sim.model)          # the FP32 network against itself
    -0.0
    >>> -1.0 < score(sim.model) < 0   # W4A8 moves the softmax a little
    True
    """
    inputs = list(inputs)
    if not inputs:
        raise QuantConfigError("output_agreement_score needs at least one input batch")
    with quantize_only(sim, ()), torch.no_grad():
        refs = [_log_probs(_run(sim.model, x)) for x in inputs]

    def score(model: nn.Module) -> float:
        total = torch.zeros(2, dtype=torch.float64)  # KL sum, rows
        with torch.no_grad():
            for x, ref in zip(inputs, refs):
                for p, q in zip(ref, _log_probs(_run(model, x))):
                    total[0] += F.kl_div(q, p, log_target=True, reduction="sum").cpu()
                    total[1] += p.shape[0]
        dist = world()
        if dist is not None:  # every rank: the score of all ranks' batches
            t = total.to(collective_device(dist))
            dist.all_reduce(t)
            total = t.cpu()
        return -100.0 * float(total[0] / total[1])
    return score


def _import_callable(path: str) -> Callable:
    module, _, name = path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as e:
        raise QuantConfigError(f"cannot import the score function '{path}' ({e}); give 'package.module.function'"
                               ) from None
    if not callable(fn):
        raise QuantConfigError(f"score '{path}' is not a callable 'package.module.function'")
    return fn


@dataclass
class MixedPrecisionConfig:
    """The search that ``QuantizationAwareTraining(mixed_precision=...)`` runs right after the
    network is quantized, before QAT (and before the optimizer exists). Fields as in
    :func:`choose_mixed_precision`, plus:

    * ``num_batches``: calibration batches for the search's calibrations and its score
      (default: the callback's ``calibration_batches``);
    * ``score``: ``score(model) -> float`` (higher is better), or its import path
      ``"package.module.function"`` (YAML); default :func:`output_agreement_score` on those
      batches, which needs no labels. ``allowed_accuracy_drop`` is in the score's units: for the
      default, 1.0 allows a mean KL divergence of 0.01 nats from FP32.

    Example (as a dict, a YAML recipe's ``mixed_precision:`` mapping, works the same)::

        qat = QuantizationAwareTraining(mixed_precision=MixedPrecisionConfig(
            candidates=[(4, 8), (8, 8)], max_relative_size=0.6, results_dir="out/amp"))

    >>> MixedPrecisionConfig(max_relative_size=0.6).candidates
    [(4, 8), (8, 8)]
    """

    candidates: Sequence = ((4, 8), (8, 8))
    allowed_accuracy_drop: Optional[float] = None
    max_relative_size: Optional[float] = None
    max_relative_bitops: Optional[float] = None
    results_dir: Optional[str] = None
    num_batches: Optional[int] = None
    by: str = "layer"
    phase1: str = "eval"
    curve_points: int = 4
    score: Union[None, str, Callable] = None

    def __post_init__(self) -> None:
        self.candidates = _check_candidates(self.candidates)
        _check_targets(self.allowed_accuracy_drop, self.max_relative_size, self.max_relative_bitops)
        if self.by not in GROUPINGS:
            raise QuantConfigError(f"unknown grouping by='{self.by}'." + did_you_mean(self.by, GROUPINGS))
        if self.phase1 not in PHASE1:
            raise QuantConfigError(f"unknown phase1 '{self.phase1}'." + did_you_mean(self.phase1, PHASE1))
        for name, v, least in (("curve_points", self.curve_points, 0), ("num_batches", self.num_batches, 1)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
                raise QuantConfigError(f"{name} must be an int >= {least}, got {v!r}")
        if isinstance(self.score, str):
            _import_callable(self.score)
        elif self.score is not None and not callable(self.score):
            raise QuantConfigError(f"score must be a function model -> float or its import path, got {self.score!r}")

    @classmethod
    def from_value(cls, value: Union[None, bool, dict, "MixedPrecisionConfig"]) -> Optional["MixedPrecisionConfig"]:
        """``None``/``False``: no search; a dict: its fields (unknown keys: "Did you mean ...")."""
        if value is None or value is False:
            return None
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            fields = set(cls.__dataclass_fields__)
            for key in value:
                if key not in fields:
                    raise QuantConfigError(f"unknown mixed_precision field '{key}'." + did_you_mean(key, sorted(fields)))
            return cls(**value)
        raise QuantConfigError(f"mixed_precision must be a dict or a MixedPrecisionConfig, got {value!r}")

    def score_fn(self) -> Optional[Callable]:
        return _import_callable(self.score) if isinstance(self.score, str) else self.score


def search_on_batches(sim, inputs: Sequence[Any], config: MixedPrecisionConfig, *,
                      verbose: bool = True) -> MixedPrecisionResult:
    """:func:`choose_mixed_precision` on a list of model inputs (each a tensor or a tuple of
    them): they are the forward pass of every calibration and the data of the score
    (``config.score``, default :func:`output_agreement_score`). The network runs in eval mode
    (its mode is restored); the sim is left with the chosen bitwidths, calibrated on ``inputs``.

    DDP (a process group of more than one rank): every rank calls this with its own batches,
    as many as the others. Calibration statistics are all-reduced (identical encodings) and so
    are the default score's sums (identical scores), so every rank takes the same decisions.
    Then rank 0's chosen bitwidths are broadcast; if any rank holds others (a user ``score``
    that is not reduced), every rank takes rank 0's and they calibrate again together.
    Only rank 0 writes ``results_dir``. A user ``score`` must not call collectives itself
    (ranks may evaluate different configurations).

    Example (what the callback does in ``setup``)::

        batches = [x for x, _ in itertools.islice(train_loader, 8)]
        result = search_on_batches(sim, batches, MixedPrecisionConfig(max_relative_size=0.6))
    """
    inputs = list(inputs)

    def forward(model, _):
        for x in inputs:
            _run(model, x)

    dist = world()
    model = sim.model
    was_training = model.training
    model.eval()
    try:
        score = config.score_fn() or output_agreement_score(sim, inputs)
        result = choose_mixed_precision(
            sim, score, forward, config.candidates, allowed_accuracy_drop=config.allowed_accuracy_drop,
            max_relative_size=config.max_relative_size, max_relative_bitops=config.max_relative_bitops,
            results_dir=config.results_dir if dist is None or dist.get_rank() == 0 else None, by=config.by,
            phase1=config.phase1, curve_points=config.curve_points, verbose=verbose)
        if dist is not None:
            mine = {s.key: s.bitwidth for s in sim.quantizer_sites()}
            chosen = [mine]
            dist.broadcast_object_list(chosen, src=0)
            differs = torch.tensor([float(chosen[0] != mine)], device=collective_device(dist))
            dist.all_reduce(differs, op=dist.ReduceOp.MAX)
            if differs.item() > 0:  # collective: every rank calibrates again
                if chosen[0] != mine:
                    warnings.warn("mixed precision: this rank chose other bitwidths than rank 0 (is the score "
                                  "the same on every rank?); taking rank 0's", stacklevel=2)
                sim.set_bitwidths(chosen[0])
                sim.compute_encodings(forward)
    finally:
        model.train(was_training)
    return result
