"""Run an exported model in ONNX Runtime and compare it with the simulation, beside the
simulation's own noise floor.

    python -m qat_plugin.export.verify model.onnx [--inputs x.npy | --n 256] [--min-sqnr DB]
                                                  [--max-below-floor DB]

From the command line, the reference is the same QDQ file run with every ONNX Runtime graph
optimization disabled: Q/DQ then execute as float math, which is exactly the simulation's
arithmetic, while the checked session runs ORT's fused integer kernels.

A deep quantized network is chaotic: a one-ulp change of a value that sits near a rounding tie
flips one LSB, and the flip grows through the layers. So ``verify`` also measures the
reference against itself (:func:`noise_floor`): with every activation quantizer's input
perturbed by ``floor_rel`` (1e-7, about one float32 ulp, the size of the re-association
differences between two runtimes' float kernels), and batch 1 against batch N. The lower of the
two is the floor; ORT vs reference is judged against it (``report.within_floor``).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import onnx
import torch

#: float compute ops that should have become integer kernels in a W8A8 graph
FLOAT_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}


@dataclass
class VerifyReport:
    n_inputs: int
    max_abs_diff: float
    sqnr_db: float
    top1_agreement: float
    op_counts: dict = field(default_factory=dict)
    float_compute_ops: int = 0
    unfused_qdq: int = 0
    file_bytes: int = 0
    #: reference vs itself with each activation quantizer's input perturbed (``floor_rel``)
    perturbed_sqnr_db: Optional[float] = None
    #: reference vs itself, batch 1 against batch N (same inputs)
    batch_sqnr_db: Optional[float] = None
    #: how far (dB) below the floor ORT vs reference may lie and still be "at the floor"
    floor_margin_db: float = 3.0
    #: DequantizeLinear nodes per integer type (``{"int4": 12, "uint8": 60, ...}``): the bitwidth mix
    qdq_types: dict = field(default_factory=dict)
    #: ORT with all optimizations vs ORT with none, same file and inputs (``None`` when the
    #: reference is that unoptimized session already): a fusion whose integer arithmetic is not
    #: the QDQ float arithmetic (e.g. a lookup-table QLinearSoftmax) shows up here
    unoptimized_sqnr_db: Optional[float] = None

    @property
    def floor_sqnr_db(self) -> Optional[float]:
        """The reference's own noise floor: the lower of :attr:`perturbed_sqnr_db` and
        :attr:`batch_sqnr_db` (``None`` when not measured; ``inf`` when both runs were identical)."""
        measured = [v for v in (self.perturbed_sqnr_db, self.batch_sqnr_db) if v is not None]
        return min(measured) if measured else None

    @property
    def within_floor(self) -> Optional[bool]:
        """Whether ORT vs reference is no worse than the floor minus :attr:`floor_margin_db`."""
        floor = self.floor_sqnr_db
        return None if floor is None else bool(self.sqnr_db >= floor - self.floor_margin_db) and \
            self.fusions_within_floor is not False

    @property
    def fusions_within_floor(self) -> Optional[bool]:
        """Whether ORT's graph optimizations leave the numbers at the floor (optimized vs
        unoptimized ORT no more than :attr:`floor_margin_db` below it); None when not measured."""
        floor = self.floor_sqnr_db
        if floor is None or self.unoptimized_sqnr_db is None:
            return None
        return bool(self.unoptimized_sqnr_db >= floor - self.floor_margin_db)

    def floor_verdict(self) -> str:
        floor = self.floor_sqnr_db
        if floor is None:
            return "not measured"
        if self.within_floor:
            return f"at the floor ({self.sqnr_db - floor:+.1f} dB)"
        return f"BELOW the floor by {floor - self.sqnr_db:.1f} dB (more than the {self.floor_margin_db:g} dB margin)"

    def __str__(self) -> str:
        ops = ", ".join(f"{k}={v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: -kv[1]))
        fmt = lambda v: "-" if v is None else f"{v:.1f}"
        rows = [("inputs compared", f"{self.n_inputs}"), ("max |ORT - reference|", f"{self.max_abs_diff:.4g}"),
                ("logit SQNR (dB)", f"{self.sqnr_db:.1f}"),
                ("reference noise floor (dB)", f"{fmt(self.floor_sqnr_db)} (perturbed {fmt(self.perturbed_sqnr_db)}, "
                                               f"batch 1 vs N {fmt(self.batch_sqnr_db)})"),
                ("ORT vs floor", self.floor_verdict()),
                ("ORT optimized vs unoptimized (dB)", fmt(self.unoptimized_sqnr_db) + (
                    " (BELOW the floor: an ORT fusion changes the numbers)" if self.fusions_within_floor is False else "")),
                ("top-1 agreement", f"{100 * self.top1_agreement:.2f}%"),
                ("float Conv/Gemm/MatMul left", f"{self.float_compute_ops}"),
                ("unfused Q/DQ (DQ feeding float ops)", f"{self.unfused_qdq}"),
                ("file size", f"{self.file_bytes / 2**20:.2f} MiB"), ("ORT optimized graph ops", ops)]
        if self.qdq_types:
            rows.append(("Q/DQ mix (DequantizeLinear)", ", ".join(f"{k} x{v}" for k, v in sorted(self.qdq_types.items()))))
        if self.op_counts.get("MatMulNBits"):
            rows.append(("MatMulNBits (int8 weights on float inputs)",
                         f"{self.op_counts['MatMulNBits']}: ORT quantizes those inputs to int8 at run time; "
                         "session.qdq_matmulnbits_accuracy_level=1 keeps them float"))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def session(path: str, optimize: bool = True, *, threads: Optional[int] = None, optimized_path: Optional[str] = None,
            config: Optional[dict[str, str]] = None):
    """A CPU ONNX Runtime session; ``config`` adds session config entries, e.g.
    ``{"session.qdq_matmulnbits_accuracy_level": "1"}`` (see the README's export section)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = optimized_path
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def optimized_graph_stats(path: str) -> tuple[Counter, int, int]:
    """Op counts of ORT's optimized graph, float compute ops left, and DQ nodes feeding float ops."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        session(path, optimized_path=out)
        model = onnx.load(out)
    nodes = model.graph.node
    counts = Counter(n.op_type for n in nodes)
    graph_outputs = {o.name for o in model.graph.output}
    consumers = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    unfused = 0
    for n in nodes:
        if n.op_type == "DequantizeLinear" and n.output[0] not in graph_outputs:
            if any(c.op_type != "QuantizeLinear" for c in consumers.get(n.output[0], [])):
                unfused += 1
    return counts, sum(counts[t] for t in FLOAT_COMPUTE), unfused


def median_latency(path: str, input_shape: Sequence[int], runs: int = 20, threads: int = 1) -> float:
    """Median seconds of one ``session.run`` on a random input (2 warm-up runs first)."""
    import time

    sess = session(path, optimize=True, threads=threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)
    for _ in range(2):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _parts(x) -> tuple:
    """One batch as a tuple of arrays, one per model input (token models take ids and a mask)."""
    return tuple(x) if isinstance(x, tuple) else (x,)


def _slice(x, i: int, j: int):
    return tuple(np.ascontiguousarray(a[i:j]) for a in _parts(x))


def _first_tensor(out) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a tuple, or a transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if hasattr(out, "values") else out
    return next(v for v in values if isinstance(v, torch.Tensor))


def _run(sess, inputs: Sequence, batch_size: int) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    return np.concatenate([sess.run(None, dict(zip(names, _slice(x, i, i + batch_size))))[0]
                           for x in inputs for i in range(0, len(_parts(x)[0]), batch_size)])


def _perturb_floats(x, rel: float, seed: int):
    out = tuple((a * _perturbation(a.shape, rel, seed).numpy()).astype(np.float32) if a.dtype.kind == "f" else a
                for a in _parts(x))
    return out if isinstance(x, tuple) else out[0]


def compare(out: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    out, ref = out.astype(np.float64), ref.astype(np.float64)
    noise = float(np.mean((out - ref) ** 2))
    sqnr = float("inf") if noise == 0 else 10 * np.log10(float(np.mean(ref**2)) / noise)
    top1 = float(np.mean(out.reshape(len(out), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1)))
    return float(np.max(np.abs(out - ref))), sqnr, top1


def _activation_quantizers(module) -> list:
    from ..quantizer import QuantizeDequantize

    return [m for name, m in module.named_modules()
            if isinstance(m, QuantizeDequantize) and "param_quantizers" not in name.split(".")]


def _perturbation(shape, rel: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 1 + rel * (torch.randint(0, 2, tuple(shape), generator=g).float() * 2 - 1)


def _reference_runner(onnx_path: str, reference, threads: Optional[int]):
    """``run(arrays, batch_size, rel)``: the reference's outputs, with every activation quantizer's
    input (or, without quantizers, the model input) multiplied by ``1 +- rel`` when ``rel``."""
    if reference is None:
        sess = session(onnx_path, False, threads=threads)

        def run(arrays, batch_size, rel=0.0):
            if rel:
                arrays = [_perturb_floats(a, rel, 0) for a in arrays]
            return _run(sess, arrays, batch_size)
        return run

    module = getattr(reference, "model", reference)
    quantizers = _activation_quantizers(module)

    def run(arrays, batch_size, rel=0.0):
        hooks, calls = [], [0]
        if rel and quantizers:
            def perturb(_, args):
                calls[0] += 1
                return (args[0] * _perturbation(args[0].shape, rel, calls[0]).to(args[0]),) + tuple(args[1:])
            hooks = [q.register_forward_pre_hook(perturb) for q in quantizers]
        elif rel:
            arrays = [_perturb_floats(a, rel, 0) for a in arrays]
        was = module.training
        module.eval()
        try:
            with torch.no_grad():
                return np.concatenate([
                    _first_tensor(module(*(torch.from_numpy(p) for p in _slice(a, i, i + batch_size)))).numpy()
                    for a in arrays for i in range(0, len(_parts(a)[0]), batch_size)])
        finally:
            module.train(was)
            for h in hooks:
                h.remove()
    return run


def noise_floor(run, arrays: Sequence[np.ndarray], batch_size: int, reference_out: np.ndarray, *,
                rel: float = 1e-7, batch_inputs: int = 16) -> tuple[float, float]:
    """The reference's SQNR (dB) against itself: ``(perturbed, batch 1 vs N)``.

    ``perturbed``: every activation quantizer's input multiplied by ``1 +- rel`` (random signs,
    seeded). ``batch 1 vs N``: the first ``batch_inputs`` inputs one at a time against the same
    inputs in batches of ``batch_size``.
    """
    perturbed = compare(run(arrays, batch_size, rel), reference_out)[1]
    first = tuple(np.concatenate([_parts(a)[k] for a in arrays])[:batch_inputs] for k in range(len(_parts(arrays[0]))))
    first = first if isinstance(arrays[0], tuple) else first[0]
    batch = compare(run([first], 1), reference_out[:len(_parts(first)[0])])[1]
    return perturbed, batch


def verify(onnx_path: str, reference=None, inputs=None, batch_size: int = 64, threads: Optional[int] = None, *,
           floor: bool = True, floor_rel: float = 1e-7, floor_margin_db: float = 3.0) -> VerifyReport:
    """Compare ONNX Runtime (all optimizations, integer kernels) with ``reference``, beside the
    reference's own noise floor.

    ``reference``: a ``QuantSimModel`` or ``nn.Module`` (run in torch, eval mode), or ``None``
    (the same file in ORT with optimizations disabled). ``inputs``: a tensor/array or a list of
    them (batched along dim 0); for a model with several inputs (token ids and an attention
    mask), a tuple with one array per input, or a list of such tuples. Outputs compared: the
    first (a ModelOutput's first field, e.g. ``last_hidden_state``). ``floor``: also measure :func:`noise_floor` (two more reference
    runs); ``report.within_floor`` then says whether ORT vs reference is within
    ``floor_margin_db`` of it.

    >>> report = verify("m.onnx", sim, test_images)                       # doctest: +SKIP
    >>> report.sqnr_db, report.floor_sqnr_db, report.within_floor         # doctest: +SKIP
    (44.9, 42.5, True)
    """
    if isinstance(inputs, (torch.Tensor, np.ndarray, tuple)):
        inputs = [inputs]

    def as_array(x):
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return a.astype(np.float32) if a.dtype.kind == "f" else a  # token ids and masks stay integer

    arrays = [tuple(as_array(p) for p in x) if isinstance(x, tuple) else as_array(x) for x in inputs]
    out = _run(session(onnx_path, True, threads=threads), arrays, batch_size)
    run = _reference_runner(onnx_path, reference, threads)
    ref = run(arrays, batch_size)
    max_diff, sqnr, top1 = compare(out, ref)
    perturbed = batch = None
    if floor:
        perturbed, batch = noise_floor(run, arrays, batch_size, ref, rel=floor_rel)
    unoptimized = None if reference is None else compare(out, _run(session(onnx_path, False, threads=threads), arrays,
                                                                   batch_size))[1]
    counts, float_ops, unfused = optimized_graph_stats(onnx_path)
    return VerifyReport(len(out), max_diff, sqnr, top1, dict(counts), float_ops, unfused, os.path.getsize(onnx_path),
                        perturbed, batch, floor_margin_db, qdq_mix(onnx_path), unoptimized)


def qdq_mix(path: str) -> dict:
    """DequantizeLinear nodes of a QDQ file per integer type read (``int4``, ``uint8``, ``int32``...)."""
    graph = onnx.load(path).graph
    types = {t.name: t.data_type for t in graph.initializer}
    q_zero_point = {n.output[0]: n.input[2] for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    mix = Counter()
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            src = n.input[0]
            t = types.get(src) or (types.get(n.input[2]) if len(n.input) > 2 else None) \
                or types.get(q_zero_point.get(src, "")) or onnx.TensorProto.UINT8
            mix[onnx.TensorProto.DataType.Name(t).lower()] += 1
    return dict(mix)


def random_inputs(graph_inputs, *, n: int, seq: int = 32, vocab: int = 100, seed: int = 0):
    """Random inputs for an ONNX graph's inputs: standard normal floats (dynamic dimensions: ``n``);
    integer inputs are token ids in ``[0, vocab)``, or an attention mask (name holding "mask") of
    ones with random right padding, ``(n, seq)``. One array, or a tuple for several inputs."""
    rng = np.random.default_rng(seed)
    out = []
    for gi in graph_inputs:
        tt = gi.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else None for d in tt.shape.dim]
        if tt.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            out.append(rng.standard_normal([d or n for d in dims]).astype(np.float32))
            continue
        shape = [dims[0] or n] + [d or seq for d in dims[1:]]
        if "mask" in gi.name.lower():
            lengths = rng.integers(max(1, shape[-1] // 2), shape[-1] + 1, size=shape[0])
            out.append((np.arange(shape[-1])[None] < lengths[:, None]).astype(np.int64))
        else:
            out.append(rng.integers(0, vocab, size=shape).astype(np.int64))
    return tuple(out) if len(out) > 1 else out[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qat_plugin.export.verify", description=__doc__.splitlines()[0])
    p.add_argument("onnx_path")
    p.add_argument("--inputs", help=".npy file of inputs, or .npz with one array per model input name (default: "
                                    "random inputs shaped like the model's)")
    p.add_argument("--n", type=int, default=256, help="random inputs when --inputs is not given")
    p.add_argument("--seq", type=int, default=32, help="sequence length of random token inputs")
    p.add_argument("--vocab", type=int, default=100, help="random token ids are drawn from [0, vocab)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-sqnr", type=float, default=None, help="exit 1 if the logit SQNR is below this")
    p.add_argument("--max-below-floor", type=float, default=None,
                   help="exit 1 if the logit SQNR is more than this many dB below the reference's own noise floor")
    args = p.parse_args(argv)
    graph_inputs = onnx.load(args.onnx_path).graph.input
    if args.inputs:
        loaded = np.load(args.inputs)
        x = tuple(loaded[i.name] for i in graph_inputs) if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    else:
        x = random_inputs(graph_inputs, n=args.n, seq=args.seq, vocab=args.vocab, seed=args.seed)
    margin = args.max_below_floor if args.max_below_floor is not None else 3.0
    report = verify(args.onnx_path, None, x, floor_margin_db=margin)
    print(report)
    if args.min_sqnr is not None and report.sqnr_db < args.min_sqnr:
        return 1
    if args.max_below_floor is not None and not report.within_floor:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
