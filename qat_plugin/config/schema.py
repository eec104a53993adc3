"""The runtime config: where the target runtime rounds, as data.

A config is JSON in the spirit of AIMET's quantsim config::

    {
      "name": "default",
      "description": "ONNX Runtime CPU, QDQ format",
      "defaults": {
        "ops":    {"is_output_quantized": true, "is_symmetric": false},
        "params": {"is_quantized": true, "is_symmetric": true},
        "per_channel_quantization": true
      },
      "params":  {"bias": {"is_quantized": false}},
      "op_type": {"Concat": {"shared_encoding": false},
                  "Gemm": {"per_channel_quantization": true},
                  "Softmax": {"output_bitwidth": 16}},
      "names": {"features.0.*": {"param_bitwidth": 8},
                "classifier.1": {"param_bitwidth": 8, "output_bitwidth": 16}},
      "supergroups": [{"op_list": ["Conv", "BatchNormalization", "Relu"]}],
      "model_input":  {"is_input_quantized": true},
      "model_output": {"is_output_quantized": true}
    }

Fields (every one optional; booleans must be JSON booleans):

``defaults.ops``
    ``is_output_quantized`` for value-changing ops; ``is_symmetric`` for activations.
    Value-preserving ops (MaxPool, Reshape, Flatten, Transpose, Dropout, Identity, Pad,
    Slice, Squeeze, Unsqueeze, Split, Expand) never re-quantize unless ``op_type`` says so.
``defaults.params``
    ``is_quantized`` / ``is_symmetric`` for weights.
``defaults.per_channel_quantization``
    Per-output-channel weight encodings for Conv / ConvTranspose / Gemm.
``params.weight`` / ``params.bias``
    Overrides per parameter kind. A quantized bias is int32 with
    ``scale = input_scale * weight_scale`` and zero offset (what integer kernels use).
``op_type.<OpType>``
    ``is_output_quantized``, ``is_symmetric``, ``per_channel_quantization`` and
    ``shared_encoding`` (Concat: the inputs and the output share one encoding, so no
    re-quantization happens at the concat). ``param_bitwidth`` (ops with a weight: Conv,
    ConvTranspose, Gemm) and ``output_bitwidth`` override ``default_param_bw`` /
    ``default_output_bw`` for that op type, as ``sim.set_precision("<OpType>", ...)`` does: a
    fused site (``Conv+Relu``) matches each of its member op types. A model without that op
    type is not an error (a config serves many models).
``names``
    Per-layer bitwidths: ``{"<target>": {"param_bitwidth": 4, "output_bitwidth": 8}}`` where
    ``<target>`` is a site key, a module path (its weight and its output quantizer; a parent
    path covers its children) or a glob over module paths (``"layer1.*"``), as in
    ``sim.set_precision``. Applied after the ``op_type`` bitwidths, in file order, so a name wins
    over an op type; a name that matches nothing in the model is an error naming the closest.
    Bitwidths must be ones ONNX QuantizeLinear can express: 4, 8 or 16.
``supergroups``
    Op chains the runtime fuses into one kernel: one output quantizer at the end, none
    inside. BatchNormalization after Conv/ConvTranspose/Gemm is always folded into it.
``model_input.is_input_quantized`` / ``model_output.is_output_quantized``
    Quantize the model's inputs; keep (or drop) the quantizers on the model's outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping, Optional

from ..errors import QuantConfigError, did_you_mean
from ..graph.patterns import OP_TYPES, WEIGHT_AXIS


def check_exportable_bitwidth(name: str, value: Any) -> int:
    """``value`` if ONNX QuantizeLinear can express a grid of that many bits, else
    :class:`QuantConfigError` saying why (the reason comes from the exporter's opset table).

    >>> check_exportable_bitwidth("param_bw", 4)
    4
    >>> check_exportable_bitwidth("param_bw", 6)
    Traceback (most recent call last):
    ...
    qat_plugin.errors.QuantConfigError: param_bw=6 cannot be exported: ONNX QuantizeLinear has 4-bit (opset 21+), 8-bit (opset 13+), 16-bit (opset 21+) integer types only; use one of 4, 8, 16
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise QuantConfigError(f"{name} must be an int bitwidth, got {value!r}")
    from ..export.onnx import MIN_OPSET  # the exporter owns which grids an opset can express

    if value not in MIN_OPSET:
        kinds = ", ".join(f"{b}-bit (opset {MIN_OPSET[b]}+)" for b in sorted(MIN_OPSET))
        raise QuantConfigError(f"{name}={value} cannot be exported: ONNX QuantizeLinear has {kinds} integer "
                               f"types only; use one of {', '.join(map(str, sorted(MIN_OPSET)))}")
    return value


def _check_keys(obj: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise QuantConfigError(f"{where} must be a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in allowed:
            raise QuantConfigError(f"unknown key '{where}.{key}' in runtime config." + did_you_mean(key, allowed))
    return obj


def _bool(obj: dict, key: str, where: str, default: Optional[bool]) -> Optional[bool]:
    if key not in obj:
        return default
    value = obj[key]
    if not isinstance(value, bool):
        raise QuantConfigError(
            f"'{where}.{key}' must be a JSON boolean (true or false), got {value!r}"
            + (" (a string: write true/false without quotes)" if isinstance(value, str) else ""))
    return value


@dataclass(frozen=True)
class OpRule:
    """How one op type is treated; ``None`` means: use the defaults."""

    is_output_quantized: Optional[bool] = None
    is_symmetric: Optional[bool] = None
    per_channel_quantization: Optional[bool] = None
    shared_encoding: bool = False
    param_bitwidth: Optional[int] = None
    output_bitwidth: Optional[int] = None


@dataclass(frozen=True)
class PrecisionRule:
    """Bitwidths for the sites one target matches (``None``: leave as they are)."""

    target: str
    param_bitwidth: Optional[int] = None
    output_bitwidth: Optional[int] = None
    #: a target that matches nothing is an error (names) or skipped (op types)
    required: bool = True


@dataclass(frozen=True)
class ParamRule:
    is_quantized: Optional[bool] = None
    is_symmetric: Optional[bool] = None


_EMPTY: Mapping = MappingProxyType({})


def _runtime_config(items: tuple) -> "RuntimeConfig":
    """Unpickle a :class:`RuntimeConfig` (its mappings arrive as dicts)."""
    return RuntimeConfig(**{k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in items})


@dataclass(frozen=True)
class RuntimeConfig:
    """A validated runtime config. Build it with :func:`qat_plugin.config.load_config`."""

    name: str = "custom"
    description: str = ""
    ops_output_quantized: bool = True
    ops_symmetric: bool = False
    params_quantized: bool = True
    params_symmetric: bool = True
    per_channel_quantization: bool = True
    params: Mapping[str, ParamRule] = field(default_factory=lambda: _EMPTY)
    op_type: Mapping[str, OpRule] = field(default_factory=lambda: _EMPTY)
    supergroups: tuple[tuple[str, ...], ...] = ()
    model_input_quantized: bool = True
    model_output_quantized: bool = True
    names: Mapping[str, PrecisionRule] = field(default_factory=lambda: _EMPTY)

    # The mappings are read-only views (MappingProxyType), which neither pickle nor deep-copy;
    # the config is an immutable value, so a deep copy is the config itself, and pickling
    # rebuilds it from plain dicts (copy.deepcopy(sim), torch.save(sim), spawned processes).
    def __deepcopy__(self, memo: dict) -> "RuntimeConfig":
        return self

    def __reduce__(self):
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return _runtime_config, (tuple((k, dict(v) if isinstance(v, Mapping) else v) for k, v in values.items()),)

    def __post_init__(self):
        for name in self.op_type:
            if name not in OP_TYPES:
                raise QuantConfigError(f"unknown op type 'op_type.{name}'." + did_you_mean(name, OP_TYPES))
        for group in self.supergroups:
            if len(group) < 2:
                raise QuantConfigError(f"supergroup {list(group)} needs at least two op types")
            for name in group:
                if name not in OP_TYPES:
                    raise QuantConfigError(f"unknown op type '{name}' in supergroup {list(group)}."
                                           + did_you_mean(name, OP_TYPES))
        for name, rule in self.op_type.items():
            if rule.shared_encoding and name != "Concat":
                raise QuantConfigError(f"'op_type.{name}.shared_encoding' is only meaningful for Concat")
            if rule.per_channel_quantization is not None and name not in WEIGHT_AXIS:
                raise QuantConfigError(f"'op_type.{name}.per_channel_quantization': {name} has no weight;"
                                       f" valid for {sorted(WEIGHT_AXIS)}")
            if rule.param_bitwidth is not None and name not in WEIGHT_AXIS:
                raise QuantConfigError(f"'op_type.{name}.param_bitwidth': {name} has no weight;"
                                       f" valid for {sorted(WEIGHT_AXIS)}")
            for key in ("param_bitwidth", "output_bitwidth"):
                if getattr(rule, key) is not None:
                    check_exportable_bitwidth(f"'op_type.{name}.{key}'", getattr(rule, key))
        for name, rule in self.names.items():
            for key in ("param_bitwidth", "output_bitwidth"):
                if getattr(rule, key) is not None:
                    check_exportable_bitwidth(f"'names.{name}.{key}'", getattr(rule, key))

    # ---- queries used by the planner -------------------------------------------------------
    def rule(self, op_type: str) -> OpRule:
        return self.op_type.get(op_type, OpRule())

    def is_output_quantized(self, op_type: str) -> bool:
        explicit = self.rule(op_type).is_output_quantized
        if explicit is not None:
            return explicit
        from ..graph.patterns import VALUE_PRESERVING
        return False if op_type in VALUE_PRESERVING else self.ops_output_quantized

    def is_activation_symmetric(self, op_type: Optional[str]) -> bool:
        explicit = self.rule(op_type).is_symmetric if op_type else None
        return self.ops_symmetric if explicit is None else explicit

    def weight_per_channel(self, op_type: str) -> bool:
        explicit = self.rule(op_type).per_channel_quantization
        return self.per_channel_quantization if explicit is None else explicit

    def param_quantized(self, kind: str) -> bool:
        rule = self.params.get(kind, ParamRule())
        if rule.is_quantized is not None:
            return rule.is_quantized
        return self.params_quantized if kind == "weight" else False

    def param_symmetric(self, kind: str) -> bool:
        rule = self.params.get(kind, ParamRule())
        return self.params_symmetric if rule.is_symmetric is None else rule.is_symmetric

    def precision_rules(self) -> list[PrecisionRule]:
        """The bitwidth overrides in the order they apply: op types (optional), then names."""
        rules = [PrecisionRule(op, r.param_bitwidth, r.output_bitwidth, required=False)
                 for op, r in self.op_type.items() if r.param_bitwidth is not None or r.output_bitwidth is not None]
        return rules + list(self.names.values())

    # ---- parsing ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "RuntimeConfig":
        top = _check_keys(data, {"name", "description", "defaults", "params", "op_type", "supergroups",
                                 "model_input", "model_output", "names"}, "config")
        defaults = _check_keys(top.get("defaults", {}), {"ops", "params", "per_channel_quantization"}, "defaults")
        dops = _check_keys(defaults.get("ops", {}), {"is_output_quantized", "is_symmetric"}, "defaults.ops")
        dpar = _check_keys(defaults.get("params", {}), {"is_quantized", "is_symmetric"}, "defaults.params")
        params = {}
        for kind, body in _check_keys(top.get("params", {}), {"weight", "bias"}, "params").items():
            body = _check_keys(body, {"is_quantized", "is_symmetric"}, f"params.{kind}")
            params[kind] = ParamRule(_bool(body, "is_quantized", f"params.{kind}", None),
                                     _bool(body, "is_symmetric", f"params.{kind}", None))
        op_rules = {}
        op_type = top.get("op_type", {})
        if not isinstance(op_type, dict):
            raise QuantConfigError("'op_type' must be a JSON object mapping op types to rules")
        for name, body in op_type.items():
            where = f"op_type.{name}"
            if name not in OP_TYPES:
                raise QuantConfigError(f"unknown op type '{where}'." + did_you_mean(name, OP_TYPES))
            body = _check_keys(body, {"is_output_quantized", "is_symmetric", "per_channel_quantization",
                                      "shared_encoding", "param_bitwidth", "output_bitwidth"}, where)
            op_rules[name] = OpRule(_bool(body, "is_output_quantized", where, None),
                                    _bool(body, "is_symmetric", where, None),
                                    _bool(body, "per_channel_quantization", where, None),
                                    _bool(body, "shared_encoding", where, False),
                                    body.get("param_bitwidth"), body.get("output_bitwidth"))
        names = top.get("names", {})
        if not isinstance(names, dict):
            raise QuantConfigError("'names' must be a JSON object mapping module paths, site keys or globs "
                                   "to {\"param_bitwidth\": ..., \"output_bitwidth\": ...}")
        name_rules = {}
        for target, body in names.items():
            body = _check_keys(body, {"param_bitwidth", "output_bitwidth"}, f"names.{target}")
            if not body:
                raise QuantConfigError(f"'names.{target}' sets nothing: give param_bitwidth and/or output_bitwidth")
            name_rules[target] = PrecisionRule(target, body.get("param_bitwidth"), body.get("output_bitwidth"))
        groups = top.get("supergroups", [])
        if not isinstance(groups, list):
            raise QuantConfigError("'supergroups' must be a list of {\"op_list\": [...]} objects")
        supergroups = []
        for i, g in enumerate(groups):
            g = _check_keys(g, {"op_list"}, f"supergroups[{i}]")
            ops = g.get("op_list")
            if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
                raise QuantConfigError(f"'supergroups[{i}].op_list' must be a list of op type names")
            supergroups.append(tuple(ops))
        mi = _check_keys(top.get("model_input", {}), {"is_input_quantized"}, "model_input")
        mo = _check_keys(top.get("model_output", {}), {"is_output_quantized"}, "model_output")
        for key in ("name", "description"):
            if key in top and not isinstance(top[key], str):
                raise QuantConfigError(f"'{key}' must be a string")
        return cls(
            name=top.get("name", "custom"), description=top.get("description", ""),
            ops_output_quantized=_bool(dops, "is_output_quantized", "defaults.ops", True),
            ops_symmetric=_bool(dops, "is_symmetric", "defaults.ops", False),
            params_quantized=_bool(dpar, "is_quantized", "defaults.params", True),
            params_symmetric=_bool(dpar, "is_symmetric", "defaults.params", True),
            per_channel_quantization=_bool(defaults, "per_channel_quantization", "defaults", True),
            params=MappingProxyType(params), op_type=MappingProxyType(op_rules),
            supergroups=tuple(supergroups),
            model_input_quantized=_bool(mi, "is_input_quantized", "model_input", True),
            model_output_quantized=_bool(mo, "is_output_quantized", "model_output", True),
            names=MappingProxyType(name_rules),
        )
