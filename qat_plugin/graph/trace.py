"""Graph capture: one replaceable function from an ``nn.Module`` to a torch.fx GraphModule.

Everything after capture reads only the graph. Two tracers sit behind :func:`capture`:

* ``torch.fx.symbolic_trace`` (``method="fx"``): torch-level ops, leaf modules as black boxes
  with quantized inputs and outputs;
* ``torch.export`` (``method="export"``, :mod:`qat_plugin.graph.export_trace`): ATen-level ops
  with module calls given back, for models fx cannot trace (shape-dependent Python, Hugging Face
  transformers) and for attention that fx would keep as an opaque ``nn.MultiheadAttention``.

``method="auto"`` (the default) uses fx when it traces the model and leaves no opaque torch
module with parameters behind, and torch.export otherwise.
"""
from __future__ import annotations

import linecache
import sys
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import fx, nn

from ..errors import UnsupportedModelError

LeafSpec = Union[str, type]


class _Tracer(fx.Tracer):
    def __init__(self, leaf_names: frozenset[str], leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_names, self.leaf_types = leaf_names, leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)


def split_leaf_modules(model: nn.Module, leaf_modules: Iterable[LeafSpec]) -> tuple[frozenset[str], tuple[type, ...]]:
    """Validate ``leaf_modules`` (qualified names or module classes) against ``model``."""
    names, types = set(), []
    known = dict(model.named_modules())
    for spec in leaf_modules:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            types.append(spec)
        elif isinstance(spec, str):
            if spec not in known or spec == "":
                from ..errors import did_you_mean
                raise UnsupportedModelError(f"leaf_modules: the model has no submodule '{spec}'."
                                            + did_you_mean(spec, [k for k in known if k]))
            names.add(spec)
        else:
            raise TypeError(f"leaf_modules entries are qualified names or nn.Module classes, got {spec!r}")
    return frozenset(names), tuple(types)


def leaf_names_of(model: nn.Module, leaf_modules: Sequence[LeafSpec]) -> frozenset[str]:
    """Qualified names of every module treated as a leaf (names and instances of classes)."""
    names, types = split_leaf_modules(model, leaf_modules)
    return names | {n for n, m in model.named_modules() if types and isinstance(m, types) and n}


def offending_frame(model: nn.Module, tb) -> tuple[str, str]:
    """The user's module (qualified name) and source line where tracing failed."""
    by_id = {id(m): name for name, m in model.named_modules()}
    found = ("<model>", "")
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in by_id:
            line = linecache.getline(frame.f_code.co_filename, tb.tb_lineno).strip()
            where = f"{frame.f_code.co_filename}:{tb.tb_lineno}: {line}"
            found = (by_id[id(owner)] or "<model>", where)
        tb = tb.tb_next
    return found


CAPTURE_METHODS = ("auto", "fx", "export")


def capture(model: nn.Module, leaf_modules: Sequence[LeafSpec] = (), *, example_args: Optional[tuple] = None,
            method: str = "auto") -> fx.GraphModule:
    """Capture ``model`` as a GraphModule whose submodules are ``model``'s own.

    ``method``: ``"fx"``, ``"export"`` (needs ``example_args``) or ``"auto"``: fx when it traces
    and leaves no opaque module with parameters (e.g. ``nn.MultiheadAttention``), else
    torch.export. ``leaf_modules`` apply to fx only. Failures become
    :class:`UnsupportedModelError` naming the module, the source line and the way out.
    """
    if method not in CAPTURE_METHODS:
        from ..errors import QuantConfigError, did_you_mean
        raise QuantConfigError(f"unknown capture method '{method}'." + did_you_mean(method, CAPTURE_METHODS))
    if method == "export" or (method == "auto" and example_args is not None):
        if method == "auto":
            try:
                gm = _fx_capture(model, leaf_modules)
            except UnsupportedModelError:
                if leaf_modules:
                    raise
                gm = None
            if gm is not None and not opaque_ops(gm, leaf_names_of(model, leaf_modules)):
                return gm
        if example_args is None:
            raise ValueError("capture(method='export') needs example_args")
        if leaf_modules:
            raise UnsupportedModelError("leaf_modules= is a torch.fx option; torch.export capture traces every "
                                        "module (pass method='fx' to keep black boxes)")
        from .export_trace import capture_with_export
        return capture_with_export(model, tuple(example_args))
    return _fx_capture(model, leaf_modules)


def opaque_ops(gm: fx.GraphModule, leaf_names: frozenset[str] = frozenset()) -> list[str]:
    """What fx kept as black boxes computing with parameters the planner cannot see into: modules
    such as ``nn.MultiheadAttention``, and functions wrapped with ``torch.fx.wrap`` that take a
    parameter (torchvision's ``shifted_window_attention``). The user's ``leaf_modules`` are not."""
    from .patterns import op_type_of

    modules = dict(gm.named_modules())
    found = []
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function") or n.target in leaf_names or op_type_of(n, modules) is not None:
            continue
        if n.op == "call_module":
            holds = any(True for _ in modules[n.target].parameters())
        else:
            params = []
            fx.node.map_arg((n.args, n.kwargs), lambda a: params.append(a) if a.op == "get_attr" else None)
            holds = any(isinstance(_attr(gm, a.target), nn.Parameter) for a in params)
        if holds:
            found.append(str(n.target))
    return found


def _attr(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name, None)


def _fx_capture(model: nn.Module, leaf_modules: Sequence[LeafSpec]) -> fx.GraphModule:
    names, types = split_leaf_modules(model, leaf_modules)
    tracer = _Tracer(names, types)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # torch.fx raises many kinds (TraceError, TypeError, RuntimeError...)
        module, where = offending_frame(model, sys.exc_info()[2])
        hint = (f"pass leaf_modules=['{module}'] to treat it as a black box with quantized inputs "
                "and outputs, or rewrite the data-dependent code") if module != "<model>" else \
            "rewrite the data-dependent control flow in forward(), or wrap it in a submodule and pass it in leaf_modules="
        raise UnsupportedModelError(
            f"torch.fx cannot trace module '{module}' ({type(e).__name__}: {e}).\n  at {where or 'unknown line'}\n"
            f"  way out: {hint}") from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def propagate_shapes(gm: fx.GraphModule, args: tuple) -> None:
    """Run ``gm`` on ``args`` in eval mode and record in ``node.meta['qat_kind']`` what each
    node produces (``'float'`` tensor, ``'float_seq'`` of tensors, ``'tensor'`` non-float, ``'other'``)."""
    class _Interp(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["qat_kind"] = _kind(out)
            if isinstance(out, torch.Tensor):
                n.meta["qat_shape"] = tuple(out.shape)
            return out

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _Interp(gm).run(*args)
    except Exception as e:
        raise UnsupportedModelError(f"the model failed on dummy_input ({type(e).__name__}: {e}); "
                                    "pass an input the model's forward accepts") from e
    finally:
        gm.train(was_training)


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return "float" if value.is_floating_point() else "tensor"
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in value):
        return "float_seq"
    return "other"
