"""The ``qat-plugin`` command.

* ``qat-plugin fit|validate|test --config recipes/X.yaml`` is LightningCLI: recipes are plain
  LightningCLI config files and every field can be overridden (``--trainer.max_epochs 2``).
  ``fit`` adds two steps around ``trainer.fit``: the model's FP32 warm-up (and FP32 / PTQ
  accuracy) before, and after it an INT8 export, an ONNX Runtime check and a report table
  (``--report false`` turns both extra measurements off). When the callback has ``ptq=`` steps
  (CLE, AdaRound, bias correction), they run once, in the callback; the table gets a
  "PTQ + ..." row measured right after them, and their report (AdaRound's per-layer table) is
  printed and saved as ``ptq_report.txt`` next to ``report.md``.
* ``qat-plugin export X.yaml C.ckpt --out_dir D``: a QAT checkpoint to ``D/<prefix>.onnx`` +
  ``.encodings`` (+ ``_fp32.onnx``).
* ``qat-plugin verify M.onnx``: the ONNX Runtime check of an exported file.
"""
from __future__ import annotations

import copy
import os
import sys
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI

from .callbacks import QuantizationAwareTraining
from .quantsim import QuantSimModel


def _qat_callback(trainer: pl.Trainer) -> Optional[QuantizationAwareTraining]:
    found = [c for c in trainer.callbacks if isinstance(c, QuantizationAwareTraining)]
    return found[0] if found else None


@torch.no_grad()
def _accuracy(network: torch.nn.Module, loader, device: torch.device) -> float:
    was = network.training
    network.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((network(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    network.train(was)
    return 100.0 * correct / max(1, total)


def _ptq_label(ptq) -> str:
    steps = [name for name, on in (("CLE", ptq.cle), ("AdaRound", ptq.adaround is not None),
                                   ("bias correction", ptq.bias_correction is not None)) if on]
    return " + ".join(steps) or "nothing"


def ptq_report_text(report: dict) -> str:
    """The callback's ``ptq_report`` as text: AdaRound's per-layer table and the bias shifts."""
    parts = []
    if "adaround" in report:
        parts.append(str(report["adaround"]))
    if "bias_correction" in report:
        shifts = report["bias_correction"]
        parts.append(f"bias correction: {len(shifts)} layers, largest shift "
                     + (f"{max(shifts.values()):.4g}" if shifts else "-"))
        parts += [f"  {name:40s} {shift:.4g}" for name, shift in shifts.items()]
    return "\n".join(parts)


class _PTQAccuracy(pl.Callback):
    """After the QAT callback's calibration (with its ``ptq=`` steps) at the start of training,
    the validation accuracy of the simulation as PTQ left it: the report's "PTQ + ..." row,
    without running the PTQ steps a second time on a copy. With the callback's
    ``mixed_precision`` search (run in its ``setup``), the row "PTQ, searched mix"."""

    def __init__(self, qat: QuantizationAwareTraining, dm, results: dict):
        self.qat, self.dm, self.results = qat, dm, results

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.qat.ptq_report:  # empty when resumed (no calibration in this fit)
            key = f"PTQ + {_ptq_label(self.qat.ptq)}"
        elif getattr(self.qat, "mixed_precision_result", None) is not None and trainer.ckpt_path is None:
            key = "PTQ, searched mix"
        else:
            return
        self.results[key] = _accuracy(self.qat.sim.model, self.dm.val_dataloader(), pl_module.device)
        print(f"{key}: {self.results[key]:.2f}")


class QatCLI(LightningCLI):
    """LightningCLI with the QAT report around ``fit``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--report", type=bool, default=True,
                            help="fit: FP32/PTQ accuracy before, INT8 export + ONNX Runtime check + table after")
        parser.add_argument("--report_dir", type=Optional[str], default=None,
                            help="where the report's export goes (default: <log dir>/export)")

    def _cfg(self, key: str):
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        return cfg.get(key)

    def before_fit(self) -> None:
        model, dm, trainer = self.model, self.datamodule, self.trainer
        self.results: dict = {}
        epochs = getattr(model, "hparams", {}).get("fp32_warmup_epochs", 0)
        if epochs:
            print(f"FP32 warm-up: {epochs} epochs")
            warm = pl.Trainer(accelerator=trainer.strategy.root_device.type, devices=1, max_epochs=epochs,
                              logger=False, enable_checkpointing=False, enable_model_summary=False,
                              num_sanity_val_steps=0, default_root_dir=trainer.default_root_dir)
            model.warmup = True
            # the bundled demo data has labels: a label-free recipe (labels: false) gets them for
            # the FP32 warm-up only, which stands in for the pretrained model a user would bring
            hidden = getattr(dm, "labels", True) is False
            if hidden:
                dm.labels = True
            try:
                warm.fit(model, datamodule=dm)
            finally:
                model.warmup = False
                if hidden:
                    dm.labels = False
        qat = _qat_callback(trainer)
        if not self._cfg("report") or qat is None or dm is None:
            return
        dm.setup("fit")
        network = model.get_submodule(qat.resolve_module_name(model))
        self.results["FP32"] = _accuracy(network, dm.val_dataloader(), model.device)
        train = dm.train_dataloader()
        batches = [qat.input_fn(b) for _, b in zip(range(qat.calibration_batches), train)]
        sim = QuantSimModel(copy.deepcopy(network).eval(), batches[0], **qat.sim_kwargs)
        sim.compute_encodings(lambda m, _: [m(b.to(model.device)) for b in batches])
        self.results["PTQ"] = _accuracy(sim.model, dm.val_dataloader(), model.device)
        if getattr(qat, "ptq", None) is not None:  # measured once the callback has run them (no second run)
            print(f"PTQ toolbox: {_ptq_label(qat.ptq)} (run by the callback right after calibration)")
        if getattr(qat, "ptq", None) is not None or getattr(qat, "mixed_precision", None) is not None:
            trainer.callbacks.append(_PTQAccuracy(qat, dm, self.results))

    def after_fit(self) -> None:
        qat, dm, trainer = _qat_callback(self.trainer), self.datamodule, self.trainer
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, _PTQAccuracy)]
        if not self._cfg("report") or qat is None or dm is None or not trainer.is_global_zero:
            return
        results = self.results
        results["QAT"] = _accuracy(qat.sim.model, dm.val_dataloader(), self.model.device)
        out = self._cfg("report_dir") or os.path.join(trainer.log_dir or trainer.default_root_dir, "export")
        if qat.ptq_report:  # the callback's PTQ steps (run once, at calibration)
            text = ptq_report_text(qat.ptq_report)
            print("\n" + text)
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "ptq_report.txt"), "w") as f:
                f.write(text + "\n")
        res = qat.sim.export(out, "model", qat._tracing_input, export_fp32=True)
        from .export.verify import median_latency, session, verify

        sess = session(res.onnx_path, optimize=True, threads=1)
        name = sess.get_inputs()[0].name
        correct = total = 0
        xs = []
        for x, y in dm.val_dataloader():
            correct += int((sess.run(None, {name: x.numpy()})[0].argmax(1) == y.numpy()).sum())
            total += len(y)
            xs.append(x)
        results["ONNX Runtime (exported file)"] = 100.0 * correct / max(1, total)
        report = verify(res.onnx_path, qat.sim, torch.cat(xs))
        shape = (1, *qat._tracing_input.shape[1:])
        lat = {k: median_latency(p, shape, runs=30) for k, p in (("fp32", res.fp32_path), ("int8", res.onnx_path))}
        size = {k: os.path.getsize(p) / 2**20 for k, p in (("fp32", res.fp32_path), ("int8", res.onnx_path))}
        rows = [(k, f"{v:.2f}") for k, v in results.items()]
        rows += [("ORT vs simulation", f"SQNR {report.sqnr_db:.1f} dB, top-1 agreement {100 * report.top1_agreement:.2f}%"),
                 ("float Conv/Gemm left in ORT graph", f"{report.float_compute_ops}"),
                 ("ONNX size FP32 / INT8 (MiB)", f"{size['fp32']:.2f} / {size['int8']:.2f} ({size['int8'] / size['fp32']:.2f}x)"),
                 ("ORT latency FP32 / INT8, batch 1, 1 thread (ms)",
                  f"{lat['fp32'] * 1e3:.2f} / {lat['int8'] * 1e3:.2f} ({lat['int8'] / lat['fp32']:.2f}x)")]
        width = max(len(r[0]) for r in rows)
        table = "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
        print("\n" + "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
        print(f"\nINT8 model: {res.onnx_path}\nencodings:  {res.encodings_path}\nTensorBoard: tensorboard --logdir "
              f"{os.path.dirname(trainer.log_dir) if trainer.log_dir else trainer.default_root_dir}")
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(table + "\n")
        self.results = results


def export(recipe: str, ckpt_path: str, out_dir: str = "export", prefix: str = "model", export_fp32: bool = True,
           opset_version: Optional[int] = None) -> str:
    """Export a checkpoint saved by a QAT fit to ONNX (QDQ, INT8) and an encodings file.

    Args:
        recipe: the recipe (LightningCLI config) the checkpoint was trained with.
        ckpt_path: the checkpoint.
        out_dir: output folder.
        prefix: file name prefix.
        export_fp32: also write ``<prefix>_fp32.onnx``.
        opset_version: ONNX opset (default: 20, or 21 for 4/16-bit grids).
    """
    cli = QatCLI(args=["--config", recipe, "--trainer.logger", "false"], run=False,
                 subclass_mode_model=True, subclass_mode_data=True)
    qat = _qat_callback(cli.trainer)
    if qat is None:
        raise SystemExit(f"{recipe} has no QuantizationAwareTraining callback under trainer.callbacks")
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    res = qat.sim.export(out_dir, prefix, qat._tracing_input, export_fp32=export_fp32, opset_version=opset_version)
    print(f"wrote {res.onnx_path}\n      {res.encodings_path}" + (f"\n      {res.fp32_path}" if res.fp32_path else ""))
    return res.onnx_path


def verify(onnx_path: str, n: int = 256, inputs: Optional[str] = None, min_sqnr: Optional[float] = None) -> int:
    """Run an exported model in ONNX Runtime (fused integer kernels) against the same file with
    graph optimizations off (the simulation's arithmetic); print the report.

    Args:
        onnx_path: the exported QDQ model.
        n: random inputs when ``inputs`` is not given.
        inputs: a .npy file of inputs.
        min_sqnr: exit with status 1 below this logit SQNR (dB).
    """
    from .export.verify import main as verify_main

    argv = [onnx_path, "--n", str(n)] + (["--inputs", inputs] if inputs else []) + \
        (["--min-sqnr", str(min_sqnr)] if min_sqnr is not None else [])
    return verify_main(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("export", "verify"):
        from jsonargparse import CLI

        result = CLI([export, verify], args=argv)
        if argv[0] == "verify" and result:
            raise SystemExit(result)
        return None
    QatCLI(subclass_mode_model=True, subclass_mode_data=True, args=argv, save_config_kwargs={"overwrite": True})
    return None


if __name__ == "__main__":
    main()
