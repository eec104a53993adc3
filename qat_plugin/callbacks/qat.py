"""QuantizationAwareTraining: one Lightning callback that quantizes, calibrates, anneals and exports.

Lifecycle:

* ``setup`` (every stage): the network is replaced by its simulation, so the optimizer that
  Lightning builds next holds the learnable ranges, and a checkpoint's quantizer state loads
  into matching modules (resume, ``validate``/``test`` with ``ckpt_path``).
* ``on_train_start``: calibration on ``calibration_batches`` training batches, no gradient
  steps (skipped when a checkpoint already brought encodings).
* every optimizer step: SQNR annealing (:mod:`qat_plugin.annealing`) and range freezing; a step
  the precision plugin's GradScaler skips moves nothing.
* ``on_fit_end``: optional ONNX export.

The callback's own state is plain values; encodings live in the model's ``state_dict``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import move_data_to_device

from ..annealing import AnnealingConfig, EncodingAnnealer
from ..calibration import param_scheme_for
from ..errors import NotCalibratedError, QuantConfigError, did_you_mean
from ..precision import loss_scaler
from ..graph.apply import check_bn_folding
from ..config import check_exportable_bitwidth
from ..outliers import set_residual_stream_precision
from ..quantsim import QuantSimModel, check_bitwidth, precision_spec
from ..ptq.pipeline import PTQConfig
from ..mixed_precision import MixedPrecisionConfig, MixedPrecisionResult, search_on_batches


def _default_input(batch: Any) -> Any:
    """The model input in a batch: the batch itself, its first element, or ``batch["x"|"input"]``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images"):
            if key in batch:
                return batch[key]
    raise ValueError("cannot find the model input in the batch; pass input_fn=lambda batch: ... to "
                     "QuantizationAwareTraining")


def _stage_loader(trainer: Trainer) -> Optional[Any]:
    """The loader given to ``trainer.fit`` (training), ``validate``, ``test`` or ``predict``.

    ``setup`` runs before Lightning builds ``trainer.train_dataloader`` (and the others), and
    Lightning has no public accessor for the loaders given to ``fit`` before then, so this reads
    the loops' data sources; ``None`` where there is none (the caller asks for ``dummy_input=``).
    """
    for loop in ("fit_loop", "validate_loop", "test_loop", "predict_loop"):
        source = getattr(getattr(trainer, loop, None), "_data_source", None)
        if source is None or not callable(getattr(source, "is_defined", None)) or not source.is_defined():
            continue
        try:
            loader = source.dataloader()
        except Exception:  # e.g. a LightningModule without that *_dataloader() hook
            continue
        if isinstance(loader, (list, tuple)) and loader:
            loader = loader[0]
        if hasattr(loader, "__iter__"):
            return loader
    return None


@contextlib.contextmanager
def rng_preserved(loader: Any):
    """Restore the global CPU random number generator and ``loader``'s own generator(s) on exit,
    so that reading batches (tracing, calibration) leaves the training run's data order and
    randomness as they would be without the callback."""
    generators = [g for g in (getattr(loader, "generator", None),
                              getattr(getattr(loader, "sampler", None), "generator", None)) if g is not None]
    states = [g.get_state() for g in generators]
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)


def first_batch(loader: Any) -> Any:
    """The first batch of ``loader`` (its first ``min(2, len)`` samples, collated, for a map-style
    ``DataLoader``, so that no sampler is drawn), with :func:`rng_preserved`.

    >>> from torch.utils.data import TensorDataset
    >>> g = torch.Generator().manual_seed(0)
    >>> loader = DataLoader(TensorDataset(torch.arange(6.0)), batch_size=4, shuffle=True, generator=g)
    >>> first_batch(loader)
    [tensor([0., 1.])]
    >>> torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    True
    """
    with rng_preserved(loader):
        dataset = getattr(loader, "dataset", None)
        collate = getattr(loader, "collate_fn", None)
        if (isinstance(loader, DataLoader) and collate is not None and not isinstance(dataset, IterableDataset)
                and hasattr(dataset, "__len__") and len(dataset) > 0):
            return collate([dataset[i] for i in range(min(2, len(dataset)))])
        return next(iter(loader))


class QuantizationAwareTraining(Callback):
    """Quantization-aware fine-tuning of a LightningModule's network.

    Args:
        quant_scheme, param_quant_scheme, default_param_bw, default_output_bw, config_file,
            leaf_modules: as in :class:`~qat_plugin.QuantSimModel`.
        module_name: the attribute (dotted path) of the LightningModule holding the network
            to quantize. Default: its only child module with parameters.
        dummy_input: an input for tracing; default ``example_input_array``, else the model input
            of the first samples of ``calibration_dataloader``, the datamodule's training loader,
            or the loader passed to ``fit`` (``validate``/``test``/``predict``: theirs), read
            without moving any random number generator.
        calibration_batches: training batches used to calibrate at the start of fit.
        calibration_dataloader: calibrate on this instead of the training data.
        annealing: SQNR encoding annealing (:mod:`qat_plugin.annealing`). ``True`` (default): over
            the whole run, ``AnnealingConfig.for_run(trainer.estimated_stepping_batches)`` (about 20
            updates; a resumed run keeps the window saved in its checkpoint). An
            :class:`~qat_plugin.annealing.AnnealingConfig` or its fields as a dict: that window.
            ``None``/``False``: none.
        learn_ranges: give scale/offset gradients (LSQ-style).
        freeze_ranges_step: stop learning ranges after this many applied optimizer steps.
        bn_folding: ``"static"`` (BN folded into the weights at setup, statistics frozen) or
            ``"simulated"`` (BN statistics keep training until ``freeze_bn_step``).
        freeze_bn_step: freeze BatchNorm statistics after this many applied optimizer steps
            (``bn_folding="simulated"``).
        export_dir, export_prefix: export ONNX + encodings there at the end of fit.
        input_fn: picks the model input out of a batch (default: tensor, ``batch[0]`` or ``batch["x"]``).
        log_every_n_steps: how often (in applied optimizer steps) the loss scale and encodings are
            logged; annealing updates log ``qat/alpha`` and ``qat/sqnr_db/<site>`` when they happen.
        precision_overrides: per-layer bitwidths applied right after the network is quantized
            (before the optimizer exists): ``{"<target>": {"param_bw": 4, "output_bw": 8}}`` with
            targets as in :meth:`QuantSimModel.set_precision` (site key, module path, glob, op
            type), or the path of a JSON file with such a mapping or a ``mixed_precision.json``
            from :func:`qat_plugin.mixed_precision.choose_mixed_precision` (search -> QAT -> export).
        ptq: post-training steps (a :class:`~qat_plugin.ptq.PTQConfig` or its fields as a dict,
            e.g. ``{"cle": True, "adaround": {"num_iterations": 200}, "bias_correction": True}``):
            CLE on the FP32 network before it is quantized; AdaRound and bias correction on the
            calibration batches right after calibration. Their reports: ``ptq_report``.
        residual_stream_bw: for transformer encoders, e.g. ``16``: the residual stream at that
            bitwidth, every Linear input and attention matmul staying at ``default_output_bw``
            (:func:`qat_plugin.outliers.set_residual_stream_precision`; applied before
            ``precision_overrides``).
        mixed_precision: search per-layer bitwidths before QAT (search -> QAT -> export in one
            fit): a :class:`~qat_plugin.mixed_precision.MixedPrecisionConfig` or its fields as a
            dict, e.g. ``{"candidates": [[4, 8], [8, 8]], "max_relative_size": 0.6}``. Runs in
            ``setup`` of ``fit``, after ``precision_overrides`` and before the optimizer exists,
            on the first ``num_batches`` (default ``calibration_batches``) batches of the
            calibration data, scored without labels (``-100 x KL(FP32 || sim)`` of the outputs)
            unless the config gives a ``score``; the sim stays calibrated from the search (a
            relative ``results_dir`` is taken under ``trainer.default_root_dir``). Under
            DDP every rank ends with rank 0's bitwidths. The chosen bitwidths are saved in the
            checkpoint (``validate``/``test``/resume with ``ckpt_path`` restore them); result:
            ``mixed_precision_result``. Under ``fast_dev_run``: at most that many batches,
            ``phase1="sqnr"``, no curve points (a smoke run of the path).

    Example::

        qat = QuantizationAwareTraining(export_dir="out")   # W8A8, SQNR annealing over the run
        trainer = pl.Trainer(max_epochs=2, callbacks=[qat])
        trainer.fit(lightning_module, train_loader, val_loader)   # plain loaders are enough
    """

    def __init__(self, quant_scheme: str = "tf_enhanced", default_param_bw: int = 8, default_output_bw: int = 8,
                 config_file: Any = None, module_name: Optional[str] = None, dummy_input: Any = None,
                 leaf_modules: Sequence = (), calibration_batches: int = 16,
                 calibration_dataloader: Optional[Any] = None,
                 annealing: Union[None, bool, dict, AnnealingConfig] = True, learn_ranges: bool = False,
                 freeze_ranges_step: Optional[int] = None, bn_folding: str = "static",
                 freeze_bn_step: Optional[int] = None, export_dir: Optional[str] = None,
                 export_prefix: str = "model", input_fn: Optional[Callable[[Any], Any]] = None,
                 log_every_n_steps: int = 50, param_quant_scheme: Optional[str] = None,
                 ptq: Union[None, bool, dict, PTQConfig] = None,
                 precision_overrides: Union[None, str, dict] = None,
                 mixed_precision: Union[None, dict, MixedPrecisionConfig] = None,
                 residual_stream_bw: Optional[int] = None):
        param_scheme_for(quant_scheme, param_quant_scheme)
        if calibration_batches < 1:
            raise QuantConfigError(f"calibration_batches must be >= 1, got {calibration_batches}")
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise QuantConfigError(f"log_every_n_steps must be an int >= 1, got {log_every_n_steps!r}")
        check_bitwidth("default_param_bw", default_param_bw)
        check_bitwidth("default_output_bw", default_output_bw)
        check_bn_folding(bn_folding)
        self.auto_annealing = annealing is True  # window set from the run's length at train start
        if annealing is True:
            annealing = AnnealingConfig()
        elif isinstance(annealing, dict):
            fields = set(AnnealingConfig.__dataclass_fields__)
            for key in annealing:
                if key not in fields:
                    raise QuantConfigError(f"unknown annealing field '{key}'." + did_you_mean(key, fields))
            annealing = AnnealingConfig(**annealing)
        elif annealing is False:
            annealing = None
        elif annealing is not None and not isinstance(annealing, AnnealingConfig):
            raise QuantConfigError(f"annealing must be True/False, a dict or an AnnealingConfig, got {annealing!r}")
        self.sim_kwargs = dict(quant_scheme=quant_scheme, param_quant_scheme=param_quant_scheme,
                               default_param_bw=default_param_bw,
                               default_output_bw=default_output_bw, config_file=config_file,
                               leaf_modules=tuple(leaf_modules), learnable=learn_ranges, bn_folding=bn_folding)
        if freeze_bn_step is not None and bn_folding != "simulated":
            raise QuantConfigError("freeze_bn_step needs bn_folding='simulated' (static folding freezes BN at setup)")
        self.freeze_bn_step = freeze_bn_step
        self.bn_frozen = False
        self.module_name = module_name
        self.dummy_input = dummy_input
        self.calibration_batches = calibration_batches
        self.calibration_dataloader = calibration_dataloader
        self.annealing: Optional[AnnealingConfig] = annealing
        self.freeze_ranges_step = freeze_ranges_step
        self.export_dir, self.export_prefix = export_dir, export_prefix
        self.input_fn = input_fn or _default_input
        self.log_every_n_steps = log_every_n_steps
        precision_spec(precision_overrides)  # a bad target key, bitwidth or path fails here, not in setup
        self.precision_overrides = precision_overrides
        if residual_stream_bw is not None:
            check_exportable_bitwidth("residual_stream_bw", residual_stream_bw)
        self.residual_stream_bw = residual_stream_bw
        self.ptq: Optional[PTQConfig] = PTQConfig.from_value(ptq)
        self.ptq_report: dict = {}
        self.mixed_precision = MixedPrecisionConfig.from_value(mixed_precision)
        self.mixed_precision_result: Optional[MixedPrecisionResult] = None
        self.mixed_precision_bitwidths: Optional[dict] = None  # site key -> bits, once searched or restored

        self.sim: Optional[QuantSimModel] = None
        self.annealer: Optional[EncodingAnnealer] = None
        self.applied_steps = 0
        self.ranges_frozen = False
        self._tracing_input = None
        self._scale_before: Optional[float] = None
        self._stepping = False
        self._pending_state: Optional[dict] = None
        self._window_restored = False
        self._ddp_wrapped = False
        self._pinned: list = []
        self._bypassed: list = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module_name=self.module_name)

    # ---- structure ---------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.sim is not None:
            return
        name = self.resolve_module_name(pl_module)
        network = pl_module.get_submodule(name)
        self._tracing_input = self._find_dummy_input(trainer, pl_module)
        if self.ptq is not None:
            self.ptq.prepare(network, self._tracing_input)
        self.sim = QuantSimModel(network, self._tracing_input, **self.sim_kwargs)
        if self.residual_stream_bw is not None:
            set_residual_stream_precision(self.sim, output_bw=self.residual_stream_bw)
        if self.precision_overrides is not None:
            self.sim.apply_precision(self.precision_overrides)
        if self.mixed_precision is not None and stage == "fit":
            self.search_precision(trainer)
        parent, _, attr = name.rpartition(".")
        setattr(pl_module.get_submodule(parent) if parent else pl_module, attr, self.sim.model)
        if self.annealing is not None:
            self.annealer = EncodingAnnealer(self.sim, self.annealing, freeze_ranges_fn=self.freeze_ranges)
        self._bypass()
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    def resolve_module_name(self, pl_module: LightningModule) -> str:
        if self.module_name is not None:
            try:
                pl_module.get_submodule(self.module_name)
            except AttributeError:
                names = [n for n, _ in pl_module.named_modules() if n]
                raise QuantConfigError(f"the LightningModule has no submodule '{self.module_name}'."
                                       + did_you_mean(self.module_name, names)) from None
            return self.module_name
        candidates = [n for n, m in pl_module.named_children() if any(True for _ in m.parameters())]
        if len(candidates) != 1:
            raise QuantConfigError("cannot tell which submodule to quantize; pass module_name= one of "
                                   f"{candidates or [n for n, _ in pl_module.named_children()]}")
        return candidates[0]

    def _find_dummy_input(self, trainer: Trainer, pl_module: LightningModule):
        if self.dummy_input is not None:
            return self.dummy_input
        if getattr(pl_module, "example_input_array", None) is not None:
            return pl_module.example_input_array
        loader = self.calibration_dataloader
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        if loader is None:
            loader = _stage_loader(trainer)
        if loader is not None:
            return self.input_fn(first_batch(loader))
        raise QuantConfigError("QuantizationAwareTraining needs an input to trace the network: set dummy_input=, "
                               "the LightningModule's example_input_array, or pass a loader or datamodule to "
                               "trainer.fit/validate/test")

    # ---- mixed-precision search (mixed_precision=) -------------------------------------------
    def search_precision(self, trainer: Trainer) -> MixedPrecisionResult:
        """Run the ``mixed_precision`` search on the first ``num_batches`` batches of the
        calibration data (``calibration_dataloader``, else the datamodule's training loader or
        the loader given to ``fit``, read without moving any random number generator); then the
        ``ptq`` steps on the same batches. Called by ``setup``, before the optimizer exists."""
        cfg = self.mixed_precision
        n = cfg.num_batches or self.calibration_batches
        if trainer.fast_dev_run:  # a smoke run of the path: few batches, no phase-1 evaluations
            n = min(n, int(trainer.fast_dev_run))
            cfg = dataclasses.replace(cfg, phase1="sqnr", curve_points=0)
        if cfg.results_dir is not None and not os.path.isabs(cfg.results_dir):  # beside the run's logs
            cfg = dataclasses.replace(cfg, results_dir=os.path.join(trainer.default_root_dir, cfg.results_dir))
        loader = self.calibration_dataloader
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        if loader is None:
            loader = _stage_loader(trainer)
        if loader is None:
            raise QuantConfigError("mixed_precision needs calibration data: pass calibration_dataloader= or give "
                                   "trainer.fit a training loader or datamodule")
        device = next((p.device for p in self.sim.model.parameters()), torch.device("cpu"))
        with rng_preserved(loader):
            inputs = [move_data_to_device(self.input_fn(b), device) for _, b in zip(range(n), loader)]
        self.mixed_precision_result = search_on_batches(self.sim, inputs, cfg, verbose=trainer.is_global_zero)
        self.mixed_precision_bitwidths = {s.key: s.bitwidth for s in self.sim.quantizer_sites()}
        if self.ptq is not None:
            self.ptq_report = self.ptq.apply(self.sim, inputs)
        return self.mixed_precision_result

    def _restore_bitwidths(self, bits: dict) -> None:
        """A checkpoint's searched bitwidths: the model's state has just been loaded into
        quantizers of this setup's bitwidths; move each changed one's state to a quantizer of
        the checkpoint's bitwidth."""
        for q in self._bypassed:
            q.enabled = True
        qs = self.sim.quantizers()
        states = {k: qs[k].state_dict() for k, b in bits.items() if k in qs and qs[k].bitwidth != b}
        self.sim.set_bitwidths(bits)
        for k, state in states.items():
            self.sim.quantizers()[k].load_state_dict(state)
        self.mixed_precision_bitwidths = dict(bits)
        self._bypass()

    # ---- calibration -------------------------------------------------------------------------
    # Until calibrated (or restored from a checkpoint), the quantizers are bypassed, so that
    # Lightning's own forward passes (model summary, sanity check) run before calibration does.
    def _bypass(self) -> None:
        self._bypassed = [q for q in self.sim.quantizers().values() if q.enabled and not q.is_initialized()]
        for q in self._bypassed:
            q.enabled = False

    def _enable_if_ready(self) -> bool:
        if all(q.is_initialized() for q in self._bypassed):
            for q in self._bypassed:
                q.enabled = True
            self._bypassed = []
        return not self._bypassed

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Calibrate before the sanity check when a loader is at hand (calibration_dataloader or a
        datamodule); otherwise the sanity check runs in float and calibration waits for train start."""
        if self._enable_if_ready():
            return
        if self.calibration_dataloader is not None or trainer.datamodule is not None:
            loader = self.calibration_dataloader
            self.calibrate(trainer, pl_module, loader if loader is not None else trainer.datamodule.train_dataloader())

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.annealer is not None and self.auto_annealing and not self._window_restored:
            self.annealer.config = self.annealing_window(trainer)
        if not self._enable_if_ready():
            self.calibrate(trainer, pl_module)

    def annealing_window(self, trainer: Trainer) -> AnnealingConfig:
        """The default (``annealing=True``) window: the whole run, about 20 updates; the fixed
        :class:`AnnealingConfig` defaults when the run's length is unknown (infinite)."""
        total = trainer.estimated_stepping_batches
        if total == float("inf") or total < 1:
            return AnnealingConfig()
        return AnnealingConfig.for_run(int(total))

    def _require_encodings(self, trainer: Trainer, stage: str) -> None:
        if not self._enable_if_ready() and not trainer.sanity_checking:
            raise NotCalibratedError(f"{stage} through the simulation needs encodings: fit with this callback "
                                     f"first, or pass ckpt_path= of a checkpoint saved with it")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._require_encodings(trainer, "validation")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._require_encodings(trainer, "test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._require_encodings(trainer, "predict")

    def calibrate(self, trainer: Trainer, pl_module: LightningModule, loader=None) -> None:
        """Set every encoding from ``calibration_batches`` batches, without gradient steps."""
        if loader is None:
            loader = self.calibration_dataloader if self.calibration_dataloader is not None else trainer.train_dataloader
        for q in self._bypassed:
            q.enabled = True
        self._bypassed = []
        model = self.sim.model
        was_training = model.training

        seen = []

        def forward(m, _):
            for i, batch in enumerate(loader):
                if i >= self.calibration_batches:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                x = self.input_fn(batch)
                seen.append(x)
                m(*x) if isinstance(x, (tuple, list)) else m(x)

        model.eval()
        try:
            with rng_preserved(loader):  # calibration batches do not change the training data order
                self.sim.compute_encodings(forward)
                if self.ptq is not None:
                    self.ptq_report = self.ptq.apply(self.sim, seen)
        finally:
            model.train(was_training)
        self._log_encodings(trainer)

    # ---- per step ----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.annealer is not None:
            self.annealer.before_batch()

    # ---- freezing learned ranges --------------------------------------------------------------
    # DDP builds its gradient reducer once, from the parameters that require gradients when it
    # wraps the model, and expects a gradient for each of them in every backward pass. Turning
    # requires_grad off after that (freeze_ranges_step, the annealing window's end) leaves the
    # reducer waiting for gradients that never come, and the next step fails with "parameters that
    # were not used in producing the loss". So a freeze during a DDP fit *pins* the ranges
    # instead: the values are snapped exactly as QuantizeDequantize.freeze() does, requires_grad
    # stays on (DDP's parameter set does not change), and their averaged gradients are dropped
    # before the optimizer step (and before gradient clipping), so that neither the optimizer,
    # momentum nor weight decay moves them. At the end of fit they are frozen for good.
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self._ddp_wrapped = isinstance(trainer.strategy.model, DistributedDataParallel)

    def freeze_ranges(self) -> None:
        """Stop learning every quantizer's range (pinned instead while DDP wraps the model)."""
        for q in self.sim.quantizers().values():
            if any(q is p for p in self._pinned):
                continue
            pin = self._ddp_wrapped and q.learnable
            q.freeze()
            if pin:
                q.unfreeze()
                self._pinned.append(q)
        self.ranges_frozen = True

    def _drop_pinned_gradients(self) -> None:
        for q in self._pinned:
            q.scale.grad = None
            q.offset.grad = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._drop_pinned_gradients()
        scaler = loss_scaler(trainer)
        self._scale_before = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        self._stepping = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepping:
            return  # gradient accumulation: no optimizer step on this batch
        self._stepping = False
        scaler = loss_scaler(trainer)
        applied = self._scale_before is None or scaler.get_scale() >= self._scale_before
        if not applied:
            return  # the GradScaler skipped the step: nothing moves
        self.applied_steps += 1
        metrics = self.annealer.after_step(True) if self.annealer is not None else {}
        if self.freeze_ranges_step is not None and not self.ranges_frozen and self.applied_steps >= self.freeze_ranges_step:
            self.freeze_ranges()
        if self.freeze_bn_step is not None and not self.bn_frozen and self.applied_steps >= self.freeze_bn_step:
            self.sim.freeze_batch_norm()
            self.bn_frozen = True
        if metrics:
            self._log_annealing(trainer, metrics)
        if self.applied_steps % self.log_every_n_steps == 0:
            extra = {"qat/loss_scale": scaler.get_scale()} if scaler is not None and scaler.is_enabled() else {}
            self._log_encodings(trainer, extra)

    # ---- end of fit --------------------------------------------------------------------------
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for q in self._pinned:
            q.freeze()
        self._pinned, self._ddp_wrapped = [], False
        if self.export_dir is not None and trainer.is_global_zero:
            self.sim.export(self.export_dir, self.export_prefix, self._tracing_input)

    # ---- logging -----------------------------------------------------------------------------
    def _log(self, trainer: Trainer, metrics: dict) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _log_encodings(self, trainer: Trainer, extra: Optional[dict] = None) -> None:
        metrics = dict(extra or {})
        for key, q in self.sim.quantizers().items():
            enc = q.encoding
            if enc is not None:
                metrics[f"qat/scale/{key}"] = float(enc.scale.mean())
                metrics[f"qat/offset/{key}"] = float(enc.offset.mean())
        self._log(trainer, metrics)

    def _log_annealing(self, trainer: Trainer, metrics: dict) -> None:
        out = {f"qat/{k}": v for k, v in metrics.items()}
        scaler = loss_scaler(trainer)
        if scaler is not None and scaler.is_enabled():
            out["qat/loss_scale"] = scaler.get_scale()
        self._log(trainer, out)
        worst = sorted((v, k[len("sqnr_db/"):]) for k, v in metrics.items() if k.startswith("sqnr_db/"))[:5]
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if worst and hasattr(experiment, "add_text") and trainer.is_global_zero:
                table = "| site | SQNR (dB) |\n|---|---|\n" + "\n".join(f"| {k} | {v:.1f} |" for v, k in worst)
                experiment.add_text("qat/worst_sqnr", table, global_step=trainer.global_step)

    # ---- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"applied_steps": self.applied_steps, "ranges_frozen": self.ranges_frozen, "bn_frozen": self.bn_frozen,
                "annealer": self.annealer.state_dict() if self.annealer is not None else None,
                "mixed_precision_bitwidths": self.mixed_precision_bitwidths}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.sim is None:
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict) -> None:
        if state.get("mixed_precision_bitwidths"):
            self._restore_bitwidths(state["mixed_precision_bitwidths"])
        self.applied_steps = int(state["applied_steps"])
        if state["ranges_frozen"]:
            self.freeze_ranges()
        self.ranges_frozen = bool(state["ranges_frozen"])
        if state.get("bn_frozen"):
            self.sim.freeze_batch_norm()
        self.bn_frozen = bool(state.get("bn_frozen", False))
        if self.annealer is not None and state.get("annealer") is not None:
            if self.auto_annealing:  # keep the window the run started with
                self.annealer.config = AnnealingConfig(**state["annealer"]["config"])
                self._window_restored = True
            self.annealer.load_state_dict(state["annealer"])
