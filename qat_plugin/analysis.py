"""Per-layer quantization sensitivity: which sites cost the score, and a cheap SQNR proxy.

    from qat_plugin.analysis import sensitivity
    result = sensitivity(sim, eval_callback, forward_pass_callback, results_dir="out/sensitivity")
    print(result)                 # one row per layer group, in graph order

For each layer group (a weight with its layer's output quantizer, or a lone activation site;
``by="site"`` gives one row per quantizer) the model is scored with only that group
quantized and every other quantizer bypassed (``q.enabled = False``): the row's ``drop`` is
the FP32 score minus that score. The SQNR proxy needs no evaluation: each site's encoding is
applied to the float values it sees in one ``forward_pass_callback`` run (weights: to the
weight itself), ``SQNR = 10 log10(sum x^2 / sum (x - q(x))^2)``; a group shows its lowest.

Outputs: the printed table, ``sensitivity.csv``, TensorBoard scalars (``sensitivity/score_drop``
and ``sensitivity/sqnr_db`` with the row index as step, plus the table as text) and
``sensitivity.png`` (a bar chart per layer; needs matplotlib: ``pip install qat_plugin[plots]``).
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from .errors import QuantConfigError, did_you_mean

EvalCallback = Callable[[nn.Module], float]
ForwardPassCallback = Callable[[nn.Module, Any], Any]

GROUPINGS = ("layer", "site")


@dataclass(frozen=True)
class LayerGroup:
    """Quantizer sites analysed (and, in the mixed-precision search, given bitwidths) together."""

    name: str
    sites: tuple[str, ...]
    params: tuple[str, ...]  # the weight sites among ``sites``


def layer_groups(sim, by: str = "layer") -> list[LayerGroup]:
    """Group ``sim``'s sites, in graph order.

    ``by="layer"``: each weight site with the output quantizer of the op (or fused group) that
    uses it, named by the layer's module path; every other activation site alone, named by its
    site key. ``by="site"``: one group per site.
    """
    if by not in GROUPINGS:
        raise QuantConfigError(f"unknown grouping by='{by}'." + did_you_mean(by, GROUPINGS))
    sites = sim.quantizer_sites()
    if by == "site":
        return [LayerGroup(s.key, (s.key,), (s.key,) if s.kind == "param" else ()) for s in sites]
    paths = sim.site_module_paths()
    claimed: dict[str, str] = {}  # activation site -> the weight site whose layer it ends
    for s in sites:
        if s.kind != "param":
            continue
        layer = s.module if s.module is not None else s.where
        outs = [a for a in sites if a.kind == "output" and layer in paths[a.key] and a.key not in claimed]
        if outs:
            claimed[outs[0].key] = s.key
    groups, done = [], set()
    for s in sites:
        if s.key in done:
            continue
        if s.kind == "param":
            members = (s.key,) + tuple(a for a, w in claimed.items() if w == s.key)
            groups.append(LayerGroup(s.module if s.module is not None else s.where, members, (s.key,)))
            done.update(members)
        elif s.key not in claimed:
            groups.append(LayerGroup(s.key, (s.key,), ()))
            done.add(s.key)
    return groups


@contextlib.contextmanager
def quantize_only(sim, keys: Iterable[str]) -> Iterator[None]:
    """Within the block only the sites ``keys`` quantize (if they were enabled); every
    quantizer's ``enabled`` flag is restored afterwards."""
    keys = set(keys)
    qs = sim.quantizers()
    before = {k: q.enabled for k, q in qs.items()}
    try:
        for k, q in qs.items():
            q.enabled = before[k] and k in keys
        yield
    finally:
        for k, q in sim.quantizers().items():  # quantizers may have been replaced meanwhile
            q.enabled = before.get(k, True)


def _sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@torch.no_grad()
def site_sqnr(sim, forward_pass_callback: ForwardPassCallback, forward_pass_callback_args: Any = None) -> dict[str, float]:
    """SQNR (dB) of each calibrated site's encoding on the values it sees with every quantizer
    bypassed: weights from the weight, activations from one ``forward_pass_callback`` run."""
    out: dict[str, float] = {}
    acc: dict[str, list[float]] = {}
    hooks = []

    def hook(key):
        def fn(module, inputs, _output):
            enc = module.encoding
            x = inputs[0].detach().double()
            acc[key][0] += float((x * x).sum())
            acc[key][1] += float(((x - enc.quantize_dequantize(x)) ** 2).sum())
        return fn

    for s in sim.quantizer_sites():
        q = sim.quantizers()[s.key]
        if not q.is_initialized():
            continue
        if s.kind == "param":
            w = sim.weight_of(s.key).double()
            out[s.key] = _sqnr_db(float((w * w).sum()), float(((w - q.encoding.quantize_dequantize(w)) ** 2).sum()))
        else:
            acc[s.key] = [0.0, 0.0]
            hooks.append(q.register_forward_hook(hook(s.key)))
    try:
        with quantize_only(sim, ()):
            forward_pass_callback(sim.model, forward_pass_callback_args)
    finally:
        for h in hooks:
            h.remove()
    out.update({k: _sqnr_db(*v) for k, v in acc.items() if v[0] > 0 or v[1] > 0})
    return out


@dataclass
class SensitivityRow:
    group: str
    sites: tuple[str, ...]
    bitwidths: str  # e.g. "W4 A8": the weight and activation bitwidths quantized in this row
    score: float  # the score with only this group quantized
    drop: float  # fp32_score - score
    sqnr_db: float  # the group's lowest site SQNR


@dataclass
class SensitivityResult:
    fp32_score: float
    rows: list[SensitivityRow]
    evaluations: int
    files: dict[str, str] = field(default_factory=dict)

    def table(self, top: Optional[int] = None) -> str:
        """Fixed-width table in graph order (``top``: only the ``top`` largest drops, largest first)."""
        rows = list(self.rows)
        if top is not None:
            rows = sorted(rows, key=lambda r: -r.drop)[:top]
        cols = ["#", "layer group", "bits", "score", "drop", "SQNR dB"]
        body = [[str(self.rows.index(r)), r.group, r.bitwidths, f"{r.score:.4g}", f"{r.drop:+.4g}",
                 f"{r.sqnr_db:.1f}"] for r in rows]
        widths = [max(len(c), *(len(b[j]) for b in body)) if body else len(c) for j, c in enumerate(cols)]
        line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()
        head = f"sensitivity: FP32 score {self.fp32_score:.4g}, {self.evaluations} evaluations"
        return "\n".join([head, line(cols), line(["-" * w for w in widths])] + [line(b) for b in body])

    __str__ = table

    def to_csv(self, path: str | os.PathLike) -> str:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "group", "sites", "bitwidths", "score", "drop", "sqnr_db", "fp32_score"])
            for i, r in enumerate(self.rows):
                w.writerow([i, r.group, " ".join(r.sites), r.bitwidths, f"{r.score:.6g}", f"{r.drop:.6g}",
                            f"{r.sqnr_db:.4g}", f"{self.fp32_score:.6g}"])
        return os.fspath(path)

    def to_tensorboard(self, log_dir: str | os.PathLike) -> str:
        """Scalars ``sensitivity/score_drop`` and ``sensitivity/sqnr_db`` (step = row index) and the table as text."""
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.fspath(log_dir))
        try:
            for i, r in enumerate(self.rows):
                writer.add_scalar("sensitivity/score_drop", r.drop, i)
                if math.isfinite(r.sqnr_db):
                    writer.add_scalar("sensitivity/sqnr_db", r.sqnr_db, i)
            writer.add_text("sensitivity/table", "    " + self.table().replace("\n", "\n    "), 0)
        finally:
            writer.close()
        return os.fspath(log_dir)

    def plot(self, path: str | os.PathLike, title: str = "Per-layer quantization sensitivity") -> str:
        """A PNG bar chart: score drop (left) and SQNR (right) per layer group, in graph order."""
        Figure, FigureCanvasAgg = figure_classes()
        n = len(self.rows)
        fig = Figure(figsize=(11, max(3.0, 0.22 * n + 1.4)))
        FigureCanvasAgg(fig)
        ax_drop, ax_sqnr = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
        ys = list(range(n))
        colors = ["#c0504d" if "W" in r.bitwidths and "A" not in r.bitwidths else
                  "#4f81bd" if "W" not in r.bitwidths else "#8064a2" for r in self.rows]
        ax_drop.barh(ys, [r.drop for r in self.rows], color=colors)
        ax_drop.axvline(0, color="black", lw=0.6)
        ax_drop.set_yticks(ys, [f"{r.group} ({r.bitwidths})" for r in self.rows], fontsize=7)
        ax_drop.set_ylim(n - 0.5, -0.5)  # first row on top, no empty margins
        ax_drop.set_xlabel(f"score drop vs FP32 ({self.fp32_score:.4g}), only this group quantized")
        ax_drop.grid(axis="x", alpha=0.3)
        sq = [r.sqnr_db if math.isfinite(r.sqnr_db) else 0.0 for r in self.rows]
        ax_sqnr.barh(ys, sq, color=colors)
        ax_sqnr.set_xlabel("SQNR of the group's worst site (dB), no evaluation")
        ax_sqnr.grid(axis="x", alpha=0.3)
        from matplotlib.patches import Patch
        ax_drop.legend(handles=[Patch(color="#8064a2", label="weight + layer output"),
                                Patch(color="#c0504d", label="weight only"),
                                Patch(color="#4f81bd", label="activation")], fontsize=7, loc="best")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=110)
        return os.fspath(path)

    def save(self, results_dir: str | os.PathLike, prefix: str = "sensitivity", tensorboard: bool = True,
             plot: bool = True) -> dict[str, str]:
        """Write ``<prefix>.csv``, ``<prefix>.png`` and TensorBoard events under ``results_dir``."""
        os.makedirs(results_dir, exist_ok=True)
        self.files["csv"] = self.to_csv(os.path.join(results_dir, f"{prefix}.csv"))
        if tensorboard:
            self.files["tensorboard"] = self.to_tensorboard(os.path.join(results_dir, "tensorboard"))
        if plot:
            self.files["png"] = self.plot(os.path.join(results_dir, f"{prefix}.png"))
        return dict(self.files)


def figure_classes():
    """matplotlib's ``Figure`` and Agg canvas (no global pyplot state), or an error saying how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'qat_plugin[plots]' (or pass plot=False)") from None
    return Figure, FigureCanvasAgg


def bitwidth_label(sim, keys: Sequence[str]) -> str:
    """``"W4 A8"``-style label of the bitwidths among ``keys`` (weights, then activations)."""
    qs = sim.quantizers()
    ws = sorted({qs[k].bitwidth for k in keys if sim.plan.site(k).kind == "param"})
    as_ = sorted({qs[k].bitwidth for k in keys if sim.plan.site(k).kind != "param"})
    parts = (["W" + "/".join(map(str, ws))] if ws else []) + (["A" + "/".join(map(str, as_))] if as_ else [])
    return " ".join(parts)


def evaluate(eval_callback: EvalCallback, model: nn.Module) -> float:
    """``float(eval_callback(model))`` under ``torch.no_grad()``; a NaN score is an error."""
    with torch.no_grad():
        score = float(eval_callback(model))
    if math.isnan(score):
        raise ValueError("eval_callback returned NaN; it must return a number, higher is better")
    return score


def _needs_calibration(sim) -> bool:
    return any(q.enabled and not q.is_initialized() for q in sim.quantizers().values())


def sensitivity(sim, eval_callback: EvalCallback, forward_pass_callback: ForwardPassCallback,
                forward_pass_callback_args: Any = None, *, by: str = "layer", results_dir: Optional[str] = None,
                tensorboard: bool = True, plot: bool = True, verbose: bool = True) -> SensitivityResult:
    """Score drop per layer group when only that group is quantized, and the SQNR proxy.

    Args:
        sim: a :class:`~qat_plugin.QuantSimModel` at the bitwidths to analyse (set with
            ``set_precision``); calibrated here with ``forward_pass_callback`` if it is not.
        eval_callback: ``eval_callback(model) -> float``, higher is better (e.g. accuracy).
        forward_pass_callback: the callable ``compute_encodings`` takes; also run once (all
            quantizers bypassed) for the activation SQNR proxy.
        by: ``"layer"`` (a weight with its layer's output quantizer) or ``"site"``.
        results_dir: write ``sensitivity.csv``, ``sensitivity.png`` and TensorBoard events there.
        verbose: print the table.

    Costs ``1 + len(groups)`` evaluations, each under ``torch.no_grad()``. Every quantizer's
    ``enabled`` flag is restored.

    >>> import torch
    >>> from torch import nn
    >>> from qat_plugin import QuantSimModel
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    >>> x = torch.randn(64, 4)
    >>> sim = QuantSimModel(model, x)
    >>> _ = sim.set_precision("0", param_bw=4)
    >>> score = lambda m: -float(((m(x) - model(x)) ** 2).mean())   # higher is better
    >>> res = sensitivity(sim, score, lambda m, _: m(x), verbose=False)
    >>> [(r.group, r.bitwidths) for r in res.rows[1:]]      # rows[0]: the model input
    [('0', 'W4 A8'), ('2', 'W8 A8')]
    >>> res.rows[1].drop > res.rows[2].drop       # the 4-bit layer costs more
    True
    """
    groups = layer_groups(sim, by)
    if _needs_calibration(sim):
        sim.compute_encodings(forward_pass_callback, forward_pass_callback_args)
    with quantize_only(sim, ()):
        fp32 = evaluate(eval_callback, sim.model)
    sqnr = site_sqnr(sim, forward_pass_callback, forward_pass_callback_args)
    rows = []
    for g in groups:
        with quantize_only(sim, g.sites):
            score = evaluate(eval_callback, sim.model)
        rows.append(SensitivityRow(g.name, g.sites, bitwidth_label(sim, g.sites), score, fp32 - score,
                                   min((sqnr.get(k, math.inf) for k in g.sites), default=math.inf)))
    result = SensitivityResult(fp32, rows, 1 + len(groups))
    if results_dir is not None:
        result.save(results_dir, tensorboard=tensorboard, plot=plot)
    if verbose:
        print(result.table())
    return result
