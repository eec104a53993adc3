"""QuantSimModel: a thin facade over capture -> plan -> apply -> calibrate (-> export).

Names follow AIMET so AIMET users can switch::

    sim = QuantSimModel(model, dummy_input, quant_scheme="tf_enhanced")
    sim.compute_encodings(lambda m, _: [m(x) for x in calibration_batches])
    evaluate(sim.model)            # a plain nn.Module
    print(sim)                     # a table of every quantizer site
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import os
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from .calibration import encoding_from_observer, make_observer, param_scheme_for
from .calibration.observers import all_reduce_observer
from .config import RuntimeConfig, check_exportable_bitwidth, load_config
from .encoding import Encoding
from .errors import QuantConfigError, did_you_mean
from .graph.apply import apply_plan, check_bn_folding
from .graph.patterns import OP_TYPES, op_type_of
from .graph.plan import QuantizerSite, QuantPlan, make_plan
from .graph.trace import LeafSpec, capture, leaf_names_of, propagate_shapes
from .quantizer import QuantizeDequantize

ConfigLike = Union[None, str, os.PathLike, dict, RuntimeConfig]


def _as_args(dummy_input: Any) -> tuple:
    return tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)


def _twin(old: QuantizeDequantize, bitwidth: int, name: str) -> QuantizeDequantize:
    """A new quantizer like ``old`` (symmetry, channel axis, learnability, per-sample gradient
    scale, enabled and train flags, device) at ``bitwidth``, without an encoding."""
    q = QuantizeDequantize(tuple(old.scale.shape), bitwidth, old.symmetric, old.axis, old.learnable, name=name,
                           per_sample=old.per_sample).to(old.scale.device)
    q.enabled = old.enabled
    q.train(old.training)
    return q


def check_bitwidth(name: str, value: Any) -> int:
    """``value`` if it is a bitwidth the simulation can run (an int in [2, 16]), else
    :class:`QuantConfigError`. (What ONNX can export is narrower: see ``check_exportable_bitwidth``.)"""
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
        capture_method: ``"auto"`` (torch.fx when it traces the model and sees into every module
            with parameters, else ``torch.export``), ``"fx"`` or ``"export"``; see
            :func:`qat_plugin.graph.trace.capture`. Token models take integer ids (and an int64
            attention mask) as ``dummy_input``.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, quant_scheme: str = "tf_enhanced",
                 default_param_bw: int = 8, default_output_bw: int = 8, config_file: ConfigLike = None,
                 in_place: bool = False, leaf_modules: Sequence[LeafSpec] = (), percentile: float = 99.99,
                 learnable: bool = False, bn_folding: str = "static", param_quant_scheme: Optional[str] = None,
                 capture_method: str = "auto"):
        self.param_quant_scheme = param_scheme_for(quant_scheme, param_quant_scheme)
        check_bn_folding(bn_folding)
        if not 50.0 < float(percentile) <= 100.0:
            raise QuantConfigError(f"percentile must be in (50, 100], got {percentile}")
        self.quant_scheme = quant_scheme
        self.param_bw = check_bitwidth("default_param_bw", default_param_bw)
        self.output_bw = check_bitwidth("default_output_bw", default_output_bw)
        self.percentile = float(percentile)
        self.config = load_config(config_file)
        args = _as_args(dummy_input)

        # Everything that can fail runs on a copy first; the user's model is touched only
        # once the plan exists (and only with in_place=True).
        work = model if in_place else copy.deepcopy(model)
        leaf_names = leaf_names_of(work, leaf_modules)
        gm = capture(work, leaf_modules, example_args=args, method=capture_method)
        propagate_shapes(gm, args)
        self.plan: QuantPlan = make_plan(gm, self.config, self.param_bw, self.output_bw, leaf_names)
        if self.plan.unsupported:
            warnings.warn("ops the runtime config does not know are left in float (their outputs are "
                          "quantized for their consumers): " + ", ".join(self.plan.unsupported), stacklevel=2)
        self._quantizers = apply_plan(gm, self.plan, learnable=learnable, bn_folding=bn_folding)
        gm.train(model.training)
        self.model: nn.Module = gm
        self._apply_config_precision()

    # ---- introspection -------------------------------------------------------------------
    def quantizer_sites(self) -> list[QuantizerSite]:
        """Every quantizer site of the plan, in graph order."""
        return list(self.plan.sites)

    def quantizers(self) -> dict[str, QuantizeDequantize]:
        """The live quantizer modules by site key."""
        return dict(self._quantizers)

    def encodings(self) -> dict[str, Optional[Encoding]]:
        return {k: q.encoding for k, q in self._quantizers.items()}

    # ---- per-layer precision -------------------------------------------------------------
    def set_precision(self, target: str, *, param_bw: Optional[int] = None,
                      output_bw: Optional[int] = None) -> list[str]:
        """Give the sites ``target`` matches other bitwidths; returns the keys of the sites changed.

        ``target`` is, in this order of precedence:

        * a site key (``"layer1.0.conv1.weight"``, ``"relu_2_output"``; see ``print(sim)``);
        * an op type (``"Conv"``, ``"Gemm"``, ``"MatMul"``, ``"Softmax"``, ...): weight sites of
          that op, and activation sites whose op is, or fuses, that type (``"Conv+Relu"``
          matches ``"Conv"`` and ``"Relu"``; a shared encoding ``"A|B"`` matches both);
        * a module path: that module's weight and the output quantizer of the op (or fused
          group) it belongs to; a parent path (``"layer1"``) covers every module below it;
        * a glob over module paths and site keys (``"layer1.*.conv?"``, ``"features.1[0-9].*"``).

        ``param_bw`` applies to the matched weight sites, ``output_bw`` to the matched activation
        sites (op outputs and model inputs). One site is one quantizer, so a shared encoding
        (e.g. a concat's inputs and output in the ``tensorrt`` preset) always keeps one bitwidth;
        an int32 bias keeps ``scale = input_scale * weight_scale`` with the new quantizers. The
        replaced quantizers keep their symmetry, channel axis, ``learnable`` and ``enabled``
        flags. Call it before building an optimizer (the new scale/offset are new parameters).

        Before ``compute_encodings`` this is the normal use. After it, the changed sites drop
        their encodings (a warning says so): run ``compute_encodings`` again before using the
        sim, or it raises :class:`NotCalibratedError` naming the site. Unchanged sites keep theirs.

        Errors (:class:`QuantConfigError`): a target that matches nothing (with the closest
        names), a bitwidth ONNX cannot express (e.g. 6: only 4, 8 and 16), ``param_bw`` on a
        target without weights, ``output_bw`` on a target without activation quantizers.

        >>> import torch
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
        >>> sim = QuantSimModel(m, torch.randn(1, 3, 8, 8))
        >>> sim.set_precision("Conv", param_bw=4)        # by op type: the conv's weight
        ['0.weight']
        >>> _ = sim.set_precision("3", output_bw=16)      # by module path: the linear's output
        >>> [(s.kind, s.op, s.bitwidth) for s in sim.quantizer_sites()]
        [('input', 'input', 8), ('param', 'Conv', 4), ('output', 'Conv+Relu', 8), ('param', 'Gemm', 8), ('output', 'Gemm', 16)]
        """
        if param_bw is None and output_bw is None:
            raise QuantConfigError("set_precision needs param_bw and/or output_bw")
        if param_bw is not None:
            check_exportable_bitwidth("param_bw", param_bw)
        if output_bw is not None:
            check_exportable_bitwidth("output_bw", output_bw)
        sites = self.match_sites(target)
        params = [s for s in sites if s.kind == "param"]
        acts = [s for s in sites if s.kind != "param"]
        if param_bw is not None and not params:
            raise QuantConfigError(f"param_bw: '{target}' matches no weight quantizer (it matches "
                                   f"{', '.join(s.key for s in acts)}); give output_bw only")
        if output_bw is not None and not acts:
            raise QuantConfigError(f"output_bw: '{target}' matches no activation quantizer (it matches "
                                   f"{', '.join(s.key for s in params)}); give param_bw only")
        new = {s.key: param_bw for s in params if param_bw is not None}
        new.update({s.key: output_bw for s in acts if output_bw is not None})
        calibrated = {k for k in new if self._quantizers[k].is_initialized()}
        changed = self.set_bitwidths(new)
        dropped = [k for k in changed if k in calibrated]
        if dropped:
            warnings.warn(f"set_precision after compute_encodings: {len(dropped)} site(s) lost their encodings "
                          f"({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}); run "
                          "compute_encodings again before using the sim", stacklevel=2)
        return changed

    def apply_precision(self, spec: PrecisionSpec) -> list[str]:
        """Apply precision overrides in order; returns the changed site keys.

        ``spec`` is ``{"<target>": {"param_bw": 4, "output_bw": 8}, ...}`` (targets as in
        :meth:`set_precision`), or the path of a JSON file holding such a mapping or a
        ``mixed_precision.json`` written by :func:`qat_plugin.mixed_precision.choose_mixed_precision`
        (its ``"bitwidths"``: site key -> bits). The callback's ``precision_overrides=`` takes the same.
        Later entries win; the keys returned are those whose bitwidth differs at the end.
        """
        before = {s.key: s.bitwidth for s in self.plan.sites}
        for target, param_bw, output_bw in precision_spec(spec):
            if target is None:  # a search result: site key -> bits
                self.set_bitwidths(param_bw)
            else:
                self.set_precision(target, param_bw=param_bw, output_bw=output_bw)
        return [s.key for s in self.plan.sites if s.bitwidth != before[s.key]]

    def set_bitwidths(self, bitwidths: dict[str, int]) -> list[str]:
        """Set the bitwidth of each named site (site key -> bits), replacing its quantizer where
        the bitwidth changes (the new one has no encoding); returns the changed keys in graph
        order. The low-level form of :meth:`set_precision`, used by the mixed-precision search."""
        unknown = [k for k in bitwidths if k not in self._quantizers]
        if unknown:
            raise QuantConfigError(f"unknown quantizer site '{unknown[0]}'." + did_you_mean(unknown[0], self._quantizers))
        for key, bw in bitwidths.items():
            check_exportable_bitwidth(f"bitwidth of '{key}'", bw)
        changed = [s.key for s in self.plan.sites if s.key in bitwidths and bitwidths[s.key] != s.bitwidth]
        if not changed:
            return []
        bias_users = {}
        for s in self.plan.sites:
            if s.module is not None and s.bias_from is not None:
                bias_users.setdefault(s.bias_from, []).append(s.module)
        for key in changed:
            old, site = self._quantizers[key], self._site(key)
            q = _twin(old, bitwidths[key], old.name)
            if site.module is not None:
                self.model.get_submodule(site.module).param_quantizers["weight"] = q
            else:
                self.model.get_submodule("quantizers")[key] = q
            for module in bias_users.get(key, []):  # the int32 bias grid reads the input's scale
                self.model.get_submodule(module).set_bias_input_quantizer(q)
            self._quantizers[key] = q
        self.plan = dataclasses.replace(self.plan, sites=tuple(
            dataclasses.replace(s, bitwidth=bitwidths[s.key]) if s.key in changed else s for s in self.plan.sites))
        return changed

    def split_site(self, key: str, consumers: Sequence[str], *, output_bw: Optional[int] = None) -> str:
        """Give some consumers of an activation site's value their own quantizer; returns its key.

        One tensor may feed ops that want different grids. In a post-LayerNorm transformer
        (BERT) a LayerNorm output feeds the next Linear layers, which need 8 bits for integer
        kernels, and the residual sum, which loses accuracy at 8 bits: splitting gives the sum a
        16-bit copy while the Linear layers keep theirs (see
        :func:`qat_plugin.outliers.set_residual_stream_precision`). The export writes one
        QuantizeLinear/DequantizeLinear pair per quantizer on the same tensor.

        ``consumers`` are graph node names (``node.name`` in ``sim.model.graph``) among the users
        of the site's value; they move to the new quantizer, of ``output_bw`` bits (default: the
        site's), with the site's symmetry, learnability and enabled flag and no encoding yet (run
        ``compute_encodings``). An int32 bias of a moved consumer follows it. Errors
        (:class:`QuantConfigError`): a weight or shared site, a name that is not a user of the
        value (the users are listed), or moving every user (use :meth:`set_precision`).

        >>> import torch
        >>> from torch import nn
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)
        ...     def forward(self, x):
        ...         y = self.norm(x)
        ...         return self.fc(y) + y
        >>> sim = QuantSimModel(Block(), torch.randn(2, 8))
        >>> sim.split_site("norm_output", ["add"], output_bw=16)
        'norm_output_to_add'
        >>> [(s.key, s.bitwidth, s.consumers) for s in sim.quantizer_sites() if s.key.startswith("norm")]
        [('norm_output', 8, ('fc',)), ('norm_output_to_add', 16, ('add',))]
        """
        site = self._site(key) if key in self._quantizers else None
        if site is None:
            raise QuantConfigError(f"unknown quantizer site '{key}'." + did_you_mean(key, self._quantizers))
        if site.kind == "param" or len(site.nodes) != 1:
            raise QuantConfigError(f"split_site: '{key}' is a {'weight' if site.kind == 'param' else 'shared'} site; "
                                   "only an activation site on one value can be split")
        if output_bw is not None:
            check_exportable_bitwidth("output_bw", output_bw)
        graph = self.model.graph
        qnode = self._quantizer_node(key)
        consumers = list(dict.fromkeys(consumers))
        direct = list(qnode.users)
        chain, fan_out = ([], direct) if set(consumers) <= {u.name for u in direct} else self._fan_out(qnode)
        users = [u.name for u in fan_out]
        strangers = [c for c in consumers if c not in users]
        if strangers or not consumers:
            raise QuantConfigError(f"split_site: {strangers or 'no consumers'} are not users of '{key}'; its users "
                                   f"are {users}")
        if len(consumers) == len(users):
            raise QuantConfigError(f"split_site: that moves every user of '{key}'; use set_precision('{key}', "
                                   "output_bw=...) instead")
        hoisted = self._hoist(qnode, chain)  # checked: now the graph changes
        new_key, i = f"{key}_to_{consumers[0]}", 0
        while new_key in self._quantizers:
            i += 1
            new_key = f"{key}_to_{consumers[0]}_{i}"
        old = self._quantizers[key]
        bits = old.bitwidth if output_bw is None else output_bw
        q = _twin(old, bits, new_key)
        self.model.get_submodule("quantizers")[new_key] = q
        with graph.inserting_after(qnode):
            new_node = graph.call_module(f"quantizers.{new_key}", (qnode.args[0],))
        for user in list(qnode.users):
            if user.name in consumers:
                user.replace_input_with(qnode, new_node)
        graph.lint()
        self.model.recompile()
        moved = set(consumers)
        passthrough = []
        by_name = {n.name: n for n in graph.nodes}
        for node_name, k in self.plan.passthrough:  # encodings repeated after value-preserving consumers
            if node_name in hoisted:  # now before the quantizer: nothing to repeat
                continue
            node = by_name.get(node_name)
            if k == key and (node_name in moved or (node is not None and {a.name for a in node.all_input_nodes} & moved)):
                moved.add(node_name)
                k = new_key
            passthrough.append((node_name, k))
        called = {n.name: str(n.target) for n in graph.nodes if n.op == "call_module"}
        layers = {called[c] for c in consumers if c in called}
        sites = []
        for s in self.plan.sites:
            if s.key == key:
                sites += [dataclasses.replace(s, consumers=tuple(u for u in users if u not in consumers)),
                          dataclasses.replace(s, key=new_key, bitwidth=bits, consumers=tuple(consumers))]
                continue
            if s.module is not None and s.bias_from == key and s.module in layers:
                self.model.get_submodule(s.module).set_bias_input_quantizer(q)
                s = dataclasses.replace(s, bias_from=new_key)
            sites.append(s)
        self.plan = dataclasses.replace(self.plan, sites=tuple(sites), passthrough=tuple(passthrough))
        self._quantizers = {k: (self._quantizers[k] if k != new_key else q) for k in (s.key for s in sites)}
        if old.is_initialized():
            warnings.warn(f"split_site after compute_encodings: '{new_key}' has no encoding yet; run "
                          "compute_encodings again before using the sim", stacklevel=2)
        return new_key

    def site_consumers(self, key: str) -> list[str]:
        """Names of the graph nodes that read activation site ``key``'s quantized value, looking
        past Dropout / Identity (which :meth:`split_site` moves the quantizer past)."""
        qnode = self._quantizer_node(key)
        return [] if qnode is None else [u.name for u in self._fan_out(qnode)[1]]

    def _quantizer_node(self, key: str):
        return next((n for n in self.model.graph.nodes if n.op == "call_module" and n.target == f"quantizers.{key}"),
                    None)

    def _fan_out(self, qnode) -> tuple[list, list]:
        """(the Dropout / Identity chain right after ``qnode``, each its only reader's only user;
        the nodes reading the end of that chain)."""
        modules = dict(self.model.named_modules())
        chain, users = [], list(qnode.users)
        while len(users) == 1 and op_type_of(users[0], modules) in ("Dropout", "Identity") \
                and users[0].args[:1] == ((chain[-1] if chain else qnode),):
            chain.append(users[0])
            users = list(users[0].users)
        return chain, users

    @staticmethod
    def _hoist(qnode, chain: list) -> set[str]:
        """Move ``qnode`` after ``chain`` (BERT's embeddings: LayerNorm -> quantizer -> Dropout ->
        {Linear layers, residual sum}) so that the fan-out is its own; returns the names moved
        past. Those ops pass values through at inference (the export drops them); in training,
        the quantizer then sees dropout's scaled values, and both branches share one mask."""
        for op in chain:
            op.replace_input_with(qnode, qnode.args[0])
            for u in list(op.users):
                u.replace_input_with(op, qnode)
            qnode.args = (op,)
            op.append(qnode)
        return {op.name for op in chain}

    def match_sites(self, target: str) -> list[QuantizerSite]:
        """The sites ``target`` names (see :meth:`set_precision`), in graph order; an error
        naming the closest site keys, module paths and op types if it matches nothing."""
        found = self._match(target)
        if not found:
            raise QuantConfigError(f"'{target}' matches no quantizer site, op type or module path."
                                   + did_you_mean(target, self._target_names()))
        return found

    def _match(self, target: str) -> list[QuantizerSite]:
        if not isinstance(target, str) or not target:
            raise QuantConfigError(f"a precision target is a non-empty string, got {target!r}")
        sites = self.plan.sites
        if target in self._quantizers:
            return [self._site(target)]
        if target in OP_TYPES or any(s.op == target for s in sites):
            return [s for s in sites if s.op == target or target in _member_ops(s.op)]
        paths = self.site_module_paths()
        if any(c in target for c in "*?["):
            return [s for s in sites if any(fnmatch.fnmatchcase(p, target) for p in paths[s.key] | {s.key})]
        return [s for s in sites if any(p == target or p.startswith(target + ".") for p in paths[s.key])]

    def _target_names(self) -> set[str]:
        names = set(self._quantizers) | {t for s in self.plan.sites for t in _member_ops(s.op)}
        return names | {p for ps in self.site_module_paths().values() for p in ps}

    def site_module_paths(self) -> dict[str, frozenset[str]]:
        """Module paths behind each site key: a weight's layer; for an activation site, the
        modules of its nodes and of the fused group (``Conv+BN+ReLU``) whose output it is."""
        graph = getattr(self.model, "graph", None)
        target_of = {n.name: str(n.target) for n in graph.nodes if n.op == "call_module"} if graph is not None else {}
        groups = [set(g) for g in self.plan.groups]
        out = {}
        for s in self.plan.sites:
            if s.module is not None:
                out[s.key] = frozenset({s.module})
                continue
            names = set(s.nodes)
            for g in groups:
                if g & set(s.nodes):
                    names |= g
            paths = {target_of[n] for n in names if n in target_of and not target_of[n].startswith("quantizers.")}
            if s.kind == "param":
                paths.add(s.where)
            out[s.key] = frozenset(paths)
        return out

    def _apply_config_precision(self) -> None:
        """The runtime config's ``op_type.*.param_bitwidth/output_bitwidth`` and ``names`` rules."""
        for rule in self.config.precision_rules():
            sites = self._match(rule.target)
            if not sites:
                if rule.required:
                    raise QuantConfigError(f"runtime config 'names.{rule.target}' matches no quantizer site, op "
                                           "type or module path." + did_you_mean(rule.target, self._target_names()))
                continue
            new = {}
            if rule.param_bitwidth is not None:
                new.update({s.key: rule.param_bitwidth for s in sites if s.kind == "param"})
            if rule.output_bitwidth is not None:
                new.update({s.key: rule.output_bitwidth for s in sites if s.kind != "param"})
            self.set_bitwidths(new)

    # ---- calibration ---------------------------------------------------------------------
    def compute_encodings(self, forward_pass_callback: Callable[[nn.Module, Any], Any],
                          forward_pass_callback_args: Any = None) -> None:
        """Run ``forward_pass_callback(sim.model, forward_pass_callback_args)`` with every
        activation quantizer observing (values pass through unchanged), then set all
        encodings at once. Weight encodings come from the weights. Under DDP the statistics
        are all-reduced first, so every rank holds identical encodings. On any error (NaN/Inf
        in the data, a failing callback) no encoding changes. A disabled activation quantizer
        sees no data and keeps the encoding it had (none, if it never had one)."""
        params = {k: q for k, q in self._quantizers.items() if self._site(k).kind == "param"}
        acts = {k: q for k, q in self._quantizers.items() if k not in params and q.enabled}
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
            f"{self._bitwidth_summary()}, {len(self.plan.sites)} quantizers, "
            f"{len(self.plan.bn_folds)} BatchNorms folded"))

    __repr__ = __str__

    def _bitwidth_summary(self) -> str:
        """``W8A8``, or the mix with site counts: ``mixed W4 x12, W8 x3, A8 x20, A16 x2``."""
        ws = sorted(s.bitwidth for s in self.plan.sites if s.kind == "param")
        as_ = sorted(s.bitwidth for s in self.plan.sites if s.kind != "param")
        if len(set(ws)) <= 1 and len(set(as_)) <= 1:
            return f"W{ws[0] if ws else self.param_bw}A{as_[0] if as_ else self.output_bw}"
        count = lambda p, v: [f"{p}{b} x{v.count(b)}" for b in sorted(set(v))]
        return "mixed " + ", ".join(count("W", ws) + count("A", as_))


PrecisionSpec = Union[None, str, os.PathLike, dict]


def precision_spec(spec: PrecisionSpec) -> list[tuple]:
    """Validate precision overrides (see :meth:`QuantSimModel.apply_precision`) without a model:
    ``[(target, param_bw, output_bw), ...]``, or ``[(None, {site: bits}, None)]`` for a search
    result. Errors are :class:`QuantConfigError` naming the bad entry.

    >>> precision_spec({"features.0": {"param_bw": 8}, "Softmax": {"output_bw": 16}})
    [('features.0', 8, None), ('Softmax', None, 16)]
    >>> precision_spec({"fc": {"param_bits": 8}})
    Traceback (most recent call last):
    ...
    qat_plugin.errors.QuantConfigError: precision['fc']: unknown key 'param_bits'. Did you mean 'param_bw'?
    """
    if spec is None:
        return []
    source = "precision"
    if isinstance(spec, (str, os.PathLike)):
        source = os.fspath(spec)
        if not os.path.isfile(source):
            raise QuantConfigError(f"precision: '{source}' is not a file; give a mapping "
                                   "{target: {param_bw, output_bw}} or the path of a JSON file with one "
                                   "(or a mixed_precision.json from choose_mixed_precision)")
        import json

        with open(source) as f:
            try:
                spec = json.load(f)
            except json.JSONDecodeError as e:
                raise QuantConfigError(f"{source}: not valid JSON ({e})") from None
        if isinstance(spec, dict) and isinstance(spec.get("bitwidths"), dict):
            bits = spec["bitwidths"]
            for key, bw in bits.items():
                check_exportable_bitwidth(f"{source}: bitwidths['{key}']", bw)
            return [(None, dict(bits), None)]
    if not isinstance(spec, dict):
        raise QuantConfigError(f"{source} must map targets to {{'param_bw': ..., 'output_bw': ...}}, got "
                               f"{type(spec).__name__}")
    rules = []
    for target, body in spec.items():
        where = f"{source}[{target!r}]"
        if not isinstance(body, dict) or not body:
            raise QuantConfigError(f"{where} must be a non-empty mapping with param_bw and/or output_bw, got {body!r}")
        for key in body:
            if key not in ("param_bw", "output_bw"):
                raise QuantConfigError(f"{where}: unknown key '{key}'." + did_you_mean(key, ("param_bw", "output_bw")))
        rules.append((target, *(check_exportable_bitwidth(f"{where}.{k}", body[k]) if body.get(k) is not None else None
                                for k in ("param_bw", "output_bw"))))
    return rules


def _member_ops(op: str) -> set[str]:
    """Op types inside a site's op name: ``"Conv+Relu|Add"`` -> {Conv, Relu, Add}."""
    return {t for part in op.split("|") for t in part.split("+")}


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
