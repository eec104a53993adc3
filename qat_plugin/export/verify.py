"""Run an exported model in ONNX Runtime and compare it with the simulation.

    python -m qat_plugin.export.verify model.onnx [--reference model.onnx|none] [--n 256]

From the command line, the reference is the same QDQ file run with every ONNX Runtime graph
optimization disabled: Q/DQ then execute as float math, which is exactly the simulation's
arithmetic, while the checked session runs ORT's fused integer kernels.
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

    def __str__(self) -> str:
        ops = ", ".join(f"{k}={v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: -kv[1]))
        rows = [("inputs compared", f"{self.n_inputs}"), ("max |ORT - reference|", f"{self.max_abs_diff:.4g}"),
                ("logit SQNR (dB)", f"{self.sqnr_db:.1f}"), ("top-1 agreement", f"{100 * self.top1_agreement:.2f}%"),
                ("float Conv/Gemm/MatMul left", f"{self.float_compute_ops}"),
                ("unfused Q/DQ (DQ feeding float ops)", f"{self.unfused_qdq}"),
                ("file size", f"{self.file_bytes / 2**20:.2f} MiB"), ("ORT optimized graph ops", ops)]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def session(path: str, optimize: bool = True, threads: Optional[int] = None, optimized_path: Optional[str] = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
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


def _run(sess, inputs: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: np.ascontiguousarray(x[i:i + batch_size])})[0]
                           for x in inputs for i in range(0, len(x), batch_size)])


def compare(out: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    out, ref = out.astype(np.float64), ref.astype(np.float64)
    noise = float(np.mean((out - ref) ** 2))
    sqnr = float("inf") if noise == 0 else 10 * np.log10(float(np.mean(ref**2)) / noise)
    top1 = float(np.mean(out.reshape(len(out), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1)))
    return float(np.max(np.abs(out - ref))), sqnr, top1


def verify(onnx_path: str, reference=None, inputs=None, batch_size: int = 64, threads: Optional[int] = None) -> VerifyReport:
    """Compare ONNX Runtime (all optimizations, integer kernels) with ``reference``.

    ``reference``: a ``QuantSimModel`` or ``nn.Module`` (run in torch, eval mode), or ``None``
    (the same file in ORT with optimizations disabled). ``inputs``: a tensor/array or a list of
    them (batched along dim 0).
    """
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = [inputs]
    arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in inputs]
    arrays = [a.astype(np.float32) for a in arrays]
    out = _run(session(onnx_path, True, threads), arrays, batch_size)
    if reference is None:
        ref = _run(session(onnx_path, False, threads), arrays, batch_size)
    else:
        module = getattr(reference, "model", reference)
        was = module.training
        module.eval()
        with torch.no_grad():
            ref = np.concatenate([module(torch.from_numpy(a[i:i + batch_size])).numpy()
                                  for a in arrays for i in range(0, len(a), batch_size)])
        module.train(was)
    max_diff, sqnr, top1 = compare(out, ref)
    counts, float_ops, unfused = optimized_graph_stats(onnx_path)
    return VerifyReport(len(out), max_diff, sqnr, top1, dict(counts), float_ops, unfused, os.path.getsize(onnx_path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qat_plugin.export.verify", description=__doc__.splitlines()[0])
    p.add_argument("onnx_path")
    p.add_argument("--inputs", help=".npy file of inputs (default: standard normal, shape from the model)")
    p.add_argument("--n", type=int, default=256, help="random inputs when --inputs is not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-sqnr", type=float, default=None, help="exit 1 if the logit SQNR is below this")
    args = p.parse_args(argv)
    if args.inputs:
        x = np.load(args.inputs)
    else:
        shape = [d.dim_value if d.dim_value > 0 else args.n
                 for d in onnx.load(args.onnx_path).graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    report = verify(args.onnx_path, None, x)
    print(report)
    if args.min_sqnr is not None and report.sqnr_db < args.min_sqnr:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
