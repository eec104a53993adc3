"""QuantSimModel: a thin facade over capture -> plan -> apply -> calibrate (-> export).

Names follow AIMET so AIMET users can switch::

    sim = QuantSimModel(model, dummy_input, quant_scheme="tf_enhanced")
    sim.compute_encodings(lambda m, _: [m(x) for x in calibration_batches])
    evaluate(sim.model)            # a plain nn.Module
    print(sim)                     # a table of every quantizer site
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from .calibration import encoding_from_observer, make_observer, param_scheme_for
from .calibration.observers import all_reduce_observer
from .config import RuntimeConfig, load_config
from .encoding import Encoding
from .errors import QuantConfigError
from .graph.apply import apply_plan, check_bn_folding
from .graph.plan import QuantizerSite, QuantPlan, make_plan
from .graph.trace import LeafSpec, capture, leaf_names_of, propagate_shapes
from .quantizer import QuantizeDequantize

ConfigLike = Union[None, str, os.PathLike, dict, RuntimeConfig]


def _as_args(dummy_input: Any) -> tuple:
    return tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)


def _check_bitwidth(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 16:
        raise QuantConfigError(f"{name} must be an int in [2, 16], got {value!r}")
    return value


class QuantSimModel:
    """Simulate an integer target's rounding on a float model.

    Args:
        model: the trained FP32 model. Left untouched unless ``in_place=True`` (then BN is
            folded into its layers and ``sim.model`` shares its parameters).
        dummy_input: a tensor or tuple of tensors the model's forward accepts.
        quant_scheme: ``"tf"`` (min-max), ``"tf_enhanced"`` (SQNR search) or ``"percentile"``.
        param_quant_scheme: the scheme for weights, ``"tf"`` or ``"tf_enhanced"``; default
            ``quant_scheme`` (``"tf"`` when that is ``"percentile"``). At 4-bit weights min-max
            beats the SQNR search on our benchmarks: ``quant_scheme="tf_enhanced",
            param_quant_scheme="tf"``.
        default_param_bw / default_output_bw: weight / activation bitwidths (2 to 16).
        config_file: a preset name (``"default"``, ``"tensorrt"``), a JSON path, a dict or a
            :class:`RuntimeConfig`.
        in_place: modify ``model`` instead of a copy.
        leaf_modules: qualified names or classes of submodules to keep as black boxes.
        percentile: the percentile for ``quant_scheme="percentile"``.
        learnable: give scale/offset gradients (LSQ-style range learning).
        bn_folding: ``"static"`` folds BatchNorm into the weights now (statistics frozen);
            ``"simulated"`` keeps BN inside the quantized layer: weights are quantized after
            folding with running statistics, and training updates the statistics until
            :meth:`freeze_batch_norm`. Inference and export are identical in both modes.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, quant_scheme: str = "tf_enhanced",
                 default_param_bw: int = 8, default_output_bw: int = 8, config_file: ConfigLike = None,
                 in_place: bool = False, leaf_modules: Sequence[LeafSpec] = (), percentile: float = 99.99,
                 learnable: bool = False, bn_folding: str = "static", param_quant_scheme: Optional[str] = None):
        self.param_quant_scheme = param_scheme_for(quant_scheme, param_quant_scheme)
        check_bn_folding(bn_folding)
        if not 50.0 < float(percentile) <= 100.0:
            raise QuantConfigError(f"percentile must be in (50, 100], got {percentile}")
        self.quant_scheme = quant_scheme
        self.param_bw = _check_bitwidth("default_param_bw", default_param_bw)
        self.output_bw = _check_bitwidth("default_output_bw", default_output_bw)
        self.percentile = float(percentile)
        self.config = load_config(config_file)
        args = _as_args(dummy_input)

        # Everything that can fail runs on a copy first; the user's model is touched only
        # once the plan exists (and only with in_place=True).
        work = model if in_place else copy.deepcopy(model)
        leaf_names = leaf_names_of(work, leaf_modules)
        gm = capture(work, leaf_modules)
        propagate_shapes(gm, args)
        self.plan: QuantPlan = make_plan(gm, self.config, self.param_bw, self.output_bw, leaf_names)
        if self.plan.unsupported:
            warnings.warn("ops the runtime config does not know are left in float (their outputs are "
                          "quantized for their consumers): " + ", ".join(self.plan.unsupported), stacklevel=2)
        self._quantizers = apply_plan(gm, self.plan, learnable=learnable, bn_folding=bn_folding)
        gm.train(model.training)
        self.model: nn.Module = gm

    # ---- introspection -------------------------------------------------------------------
    def quantizer_sites(self) -> list[QuantizerSite]:
        """Every quantizer site of the plan, in graph order."""
        return list(self.plan.sites)

    def quantizers(self) -> dict[str, QuantizeDequantize]:
        """The live quantizer modules by site key."""
        return dict(self._quantizers)

    def encodings(self) -> dict[str, Optional[Encoding]]:
        return {k: q.encoding for k, q in self._quantizers.items()}

    # ---- calibration ---------------------------------------------------------------------
    def compute_encodings(self, forward_pass_callback: Callable[[nn.Module, Any], Any],
                          forward_pass_callback_args: Any = None) -> None:
        """Run ``forward_pass_callback(sim.model, forward_pass_callback_args)`` with every
        activation quantizer observing (values pass through unchanged), then set all
        encodings at once. Weight encodings come from the weights. Under DDP the statistics
        are all-reduced first, so every rank holds identical encodings. On any error (NaN/Inf
        in the data, a failing callback) no encoding changes."""
        params = {k: q for k, q in self._quantizers.items() if self._site(k).kind == "param"}
        acts = {k: q for k, q in self._quantizers.items() if k not in params}
        snapshot = {k: {n: t.clone() for n, t in q.state_dict().items()} for k, q in self._quantizers.items()}
        try:
            # Weights first, so that activations are observed behind the quantized weights.
            for key, q in params.items():
                obs = make_observer(self.param_quant_scheme, axis=q.axis, name=key)
                obs.observe(self.weight_of(key))
                q.set_encoding(encoding_from_observer(obs, self.param_quant_scheme, q.bitwidth, q.symmetric, q.axis))
            for key, q in acts.items():
                q.start_calibration(make_observer(self.quant_scheme, axis=q.axis, name=key))
            try:
                with torch.no_grad():
                    forward_pass_callback(self.model, forward_pass_callback_args)
            finally:
                observers = {k: q.stop_calibration() for k, q in acts.items()}
            for obs in observers.values():  # DDP: every rank computes from the same statistics
                all_reduce_observer(obs)
            new = {k: self._encoding_from(observers[k], q) for k, q in acts.items()}
        except BaseException:
            for key, q in self._quantizers.items():
                q.load_state_dict(snapshot[key])
            raise
        for key, enc in new.items():
            self._quantizers[key].set_encoding(enc)

    def _encoding_from(self, observer, q: QuantizeDequantize) -> Encoding:
        return encoding_from_observer(observer, self.quant_scheme, q.bitwidth, q.symmetric, q.axis,
                                      percentile=self.percentile)

    def _site(self, key: str) -> QuantizerSite:
        return self.plan.site(key)

    def weight_of(self, key: str) -> torch.Tensor:
        """The (BN-folded) weight tensor a param quantizer site quantizes."""
        site = self._site(key)
        if site.module is not None:
            return self.model.get_submodule(site.module).folded_weight().detach()
        owner, _, attr = site.where.rpartition(".")
        return getattr(self.model.get_submodule(owner) if owner else self.model, attr).detach()

    def freeze_batch_norm(self) -> int:
        """Freeze every absorbed BatchNorm (``bn_folding="simulated"``); returns how many."""
        layers = [m for m in self.model.modules() if getattr(m, "bn", None) is not None and hasattr(m, "freeze_batch_norm")]
        for m in layers:
            m.freeze_batch_norm()
        return len(layers)

    # ---- export --------------------------------------------------------------------------
    def export(self, path: Union[str, os.PathLike], filename_prefix: str, dummy_input: Any, **kwargs):
        """Write ``<prefix>.onnx`` (QDQ, INT8 weights), ``<prefix>.encodings`` (AIMET 0.6.1) and,
        with ``export_fp32=True``, ``<prefix>_fp32.onnx``. See :func:`qat_plugin.export.export_onnx`."""
        from .export.onnx import export_onnx

        return export_onnx(self, path, filename_prefix, dummy_input, **kwargs)

    # ---- display -------------------------------------------------------------------------
    def __str__(self) -> str:
        return format_sites(self.plan.sites, self._quantizers, header=(
            f"QuantSimModel: config '{self.config.name}', scheme '{self.quant_scheme}' "
            f"(weights '{self.param_quant_scheme}'), "
            f"W{self.param_bw}A{self.output_bw}, {len(self.plan.sites)} quantizers, "
            f"{len(self.plan.bn_folds)} BatchNorms folded"))

    __repr__ = __str__


def _fmt(values: torch.Tensor, fmt: str = "{:.4g}") -> str:
    v = values.reshape(-1)
    if v.numel() == 1:
        return fmt.format(float(v))
    return f"{fmt.format(float(v.min()))}..{fmt.format(float(v.max()))}"


def format_sites(sites: Sequence[QuantizerSite], quantizers: dict[str, QuantizeDequantize], header: str = "") -> str:
    """A fixed-width table: one row per quantizer site with its live encoding."""
    cols = ["#", "site", "kind", "op", "bw", "sym", "per-ch", "scale", "offset", "min", "max"]
    rows = []
    for i, s in enumerate(sites):
        q = quantizers[s.key]
        enc = q.encoding
        nums = ["-"] * 4 if enc is None else [_fmt(enc.scale), _fmt(enc.offset, "{:.0f}"), _fmt(enc.min), _fmt(enc.max)]
        per_ch = f"{s.channels}@{s.axis}" if s.axis is not None else "no"
        where = s.where if len(s.nodes) <= 1 else f"{s.where} (+{len(s.nodes) - 1} shared)"
        rows.append([str(i), where, s.kind, s.op, str(s.bitwidth), "yes" if s.symmetric else "no", per_ch, *nums])
    widths = [max(len(c), *(len(r[j]) for r in rows)) if rows else len(c) for j, c in enumerate(cols)]
    line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()
    out = [header] if header else []
    out += [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out)
