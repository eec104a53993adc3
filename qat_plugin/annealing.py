"""SQNR-based encoding annealing during fine-tuning (framework-free; the Lightning callback and
hand-written loops both drive it).

Every ``every_n_steps`` optimizer steps inside the window ``(start_step, end_step]``, each
quantizer's SQNR-optimal range is computed (activations: from histograms of the last
``stat_batches`` training batches; weights: from the current weights, per channel) and the
live range moves toward it::

    [min, max] <- (1 - alpha_t) * [min, max] + alpha_t * [min_sqnr, max_sqnr]
    alpha_t = alpha0 * 0.5 * (1 + cos(pi * u))      (schedule="cosine")
    alpha_t = alpha0 * (1 - u)                      (schedule="linear")
    u = (t - start_step) / (end_step - start_step)

The grid (scale, offset) follows from the blended range as in
:meth:`qat_plugin.encoding.Encoding.from_min_max`. After ``end_step`` no update happens again
(the encodings are frozen) and, with ``freeze_ranges=True``, learned ranges stop learning too.
``t`` counts applied optimizer steps: a step the loss scaler skips for inf/NaN gradients moves
neither the encodings nor the schedule.

>>> cfg = AnnealingConfig(start_step=0, end_step=100, every_n_steps=10, alpha0=0.5)
>>> [round(cfg.alpha(t), 3) for t in (10, 50, 100)]
[0.488, 0.25, 0.0]
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch

from .calibration import HistogramObserver
from .calibration.observers import all_reduce_observer
from .calibration.range_setting import encoding_sqnr, sqnr_search
from .encoding import Encoding
from .errors import QuantConfigError, did_you_mean

SCHEDULES = ("cosine", "linear")


@dataclass(frozen=True)
class AnnealingConfig:
    """When and how strongly encodings move toward their SQNR-optimal values."""

    start_step: int = 0
    end_step: int = 200
    every_n_steps: int = 10
    alpha0: float = 0.1
    schedule: str = "cosine"
    stat_batches: int = 2
    include_weights: bool = False
    freeze_ranges: bool = True

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise QuantConfigError(f"unknown annealing schedule '{self.schedule}'." + did_you_mean(self.schedule, SCHEDULES))
        if not 0.0 < self.alpha0 <= 1.0:
            raise QuantConfigError(f"alpha0 must be in (0, 1], got {self.alpha0}")
        if self.start_step < 0 or self.end_step <= self.start_step:
            raise QuantConfigError(f"need 0 <= start_step < end_step, got {self.start_step}, {self.end_step}")
        if self.every_n_steps < 1 or not 1 <= self.stat_batches <= self.every_n_steps:
            raise QuantConfigError("need every_n_steps >= 1 and 1 <= stat_batches <= every_n_steps, got "
                                   f"{self.every_n_steps}, {self.stat_batches}")

    @classmethod
    def for_run(cls, total_steps: int, updates: int = 20, **overrides) -> "AnnealingConfig":
        """The window the callback uses by default: the whole run of ``total_steps`` applied
        optimizer steps, with about ``updates`` updates (``every_n_steps = round(total / updates)``).

        >>> cfg = AnnealingConfig.for_run(92)
        >>> cfg.end_step, cfg.every_n_steps, cfg.stat_batches
        (92, 5, 2)
        >>> AnnealingConfig.for_run(3).every_n_steps
        1
        """
        if total_steps < 1 or updates < 1:
            raise QuantConfigError(f"need total_steps >= 1 and updates >= 1, got {total_steps}, {updates}")
        every = max(1, round(total_steps / updates))
        fields = dict(start_step=0, end_step=int(total_steps), every_n_steps=every, stat_batches=min(2, every))
        fields.update(overrides)
        return cls(**fields)

    def alpha(self, t: int) -> float:
        u = min(max((t - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * u)) if self.schedule == "cosine" else 1.0 - u
        return self.alpha0 * decay

    def is_update_step(self, t: int) -> bool:
        """Whether the encodings move after applied step ``t`` (1-based)."""
        return self.start_step < t <= self.end_step and (t - self.start_step) % self.every_n_steps == 0

    def is_monitored_step(self, t: int) -> bool:
        """Whether batch ``t`` (the one that becomes applied step ``t``) feeds the statistics."""
        if not self.start_step < t <= self.end_step:
            return False
        until_update = (-(t - self.start_step)) % self.every_n_steps
        return until_update < self.stat_batches


class _TrainingMonitor:
    """Shows an observer what a quantizer sees in training mode only: validation passes between
    training batches (``model.eval()``) do not feed the annealing statistics."""

    def __init__(self, quantizer, observer):
        self.quantizer, self.observer = quantizer, observer

    def observe(self, x: torch.Tensor) -> None:
        if self.quantizer.training:
            self.observer.observe(x)


class EncodingAnnealer:
    """Drives :class:`AnnealingConfig` over a :class:`~qat_plugin.QuantSimModel`.

    In a training loop::

        annealer = EncodingAnnealer(sim, AnnealingConfig(end_step=300))
        for x, y in loader:
            annealer.before_batch()
            loss = criterion(sim.model(x), y); loss.backward()
            applied = amp.step(optimizer)          # False when the scaler skipped the step
            metrics = annealer.after_step(applied)  # {"alpha": ..., "sqnr_db/<site>": ...} on updates

    Statistics come from training-mode forward passes only. NaN/Inf activations are left out of
    them and counted per site in ``nonfinite`` (with one warning), instead of stopping training.
    ``state_dict()`` holds the schedule and the statistics gathered so far in an unfinished
    window, so a run resumed from it continues exactly as an uninterrupted one.
    """

    def __init__(self, sim, config: Optional[AnnealingConfig] = None, *,
                 freeze_ranges_fn: Optional[Callable[[], None]] = None):
        self.sim = sim
        self.config = config if config is not None else AnnealingConfig()
        # how learned ranges stop at the window's end (the Lightning callback pins them under DDP)
        self.freeze_ranges_fn = freeze_ranges_fn or self._freeze_quantizers
        self.step = 0
        self.updates = 0
        self.frozen = False
        self.nonfinite: Dict[str, int] = {}
        self._observers: Dict[str, HistogramObserver] = {}  # the statistics window in progress
        self._restored: Optional[Dict[str, dict]] = None  # a checkpoint's unfinished window

    def _activation_quantizers(self):
        return {k: q for k, q in self.sim.quantizers().items()
                if self.sim.plan.site(k).kind != "param" and q.enabled and q.is_initialized()}

    def _param_quantizers(self):
        return {k: q for k, q in self.sim.quantizers().items()
                if self.sim.plan.site(k).kind == "param" and q.enabled and q.is_initialized()}

    # ---- loop hooks --------------------------------------------------------------------------
    def before_batch(self) -> None:
        """Attach or detach the statistics monitors for the coming batch."""
        want = not self.frozen and self.config.is_monitored_step(self.step + 1)
        if want and not self._observers:
            restored, self._restored = self._restored or {}, None
            for key, q in self._activation_quantizers().items():
                obs = HistogramObserver(num_bins=512, name=key, count_nonfinite=True)
                if key in restored:
                    obs.load_state_dict(restored[key])
                self._observers[key] = obs
                q.start_monitoring(_TrainingMonitor(q, obs))
        elif not want:
            self._restored = None
            self._stop_monitors()

    def after_step(self, applied: bool = True) -> dict:
        """Advance the schedule by one applied optimizer step; update encodings when due."""
        if not applied:
            return {}
        self.step += 1
        metrics = {}
        if not self.frozen and self.config.is_update_step(self.step):
            metrics = self.update(self.config.alpha(self.step))
        if not self.frozen and self.step >= self.config.end_step:
            self.freeze()
        return metrics

    # ---- the update --------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, alpha: float) -> dict:
        """Blend every quantizer toward its SQNR-optimal encoding with weight ``alpha``."""
        metrics: dict = {"alpha": alpha}
        observers = self._stop_monitors()
        quantizers = self.sim.quantizers()
        bad = {}
        for key, obs in observers.items():
            all_reduce_observer(obs)  # every rank takes part, with or without data
            if obs.nonfinite:
                bad[key] = obs.nonfinite
            if obs.has_data():
                metrics[f"sqnr_db/{key}"] = self._blend(quantizers[key], obs.hist, alpha)
        if self.config.include_weights:
            for key, q in self._param_quantizers().items():
                obs = HistogramObserver(num_bins=256, axis=q.axis, name=key)
                obs.observe(self.sim.weight_of(key))
                metrics[f"sqnr_db/{key}"] = self._blend(q, obs.hist, alpha)
        self.updates += 1
        dbs = {k: v for k, v in metrics.items() if k.startswith("sqnr_db/")}
        if dbs:
            metrics["sqnr_db_min"] = min(dbs.values())
        if bad:
            if not self.nonfinite:
                warnings.warn(f"SQNR annealing: NaN/Inf activations at {sorted(bad)} (counts {bad}); they are left "
                              "out of the statistics and counted in EncodingAnnealer.nonfinite. Check the model's "
                              "numerics (learning rate, loss scale) upstream of these sites.", RuntimeWarning,
                              stacklevel=2)
            for key, n in bad.items():
                self.nonfinite[key] = self.nonfinite.get(key, 0) + n
            metrics["nonfinite"] = sum(bad.values())
        return metrics

    @staticmethod
    def _blend(q, hist, alpha: float) -> float:
        cur = q.encoding
        if alpha > 0:
            best = sqnr_search(hist, q.bitwidth, q.symmetric)
            target = Encoding.from_min_max(best.min.reshape(cur.scale.shape), best.max.reshape(cur.scale.shape),
                                           q.bitwidth, q.symmetric, q.axis)
            (lo, hi), (tlo, thi) = cur.range(), target.range()
            cur = Encoding.from_min_max((1 - alpha) * lo + alpha * tlo, (1 - alpha) * hi + alpha * thi,
                                        q.bitwidth, q.symmetric, q.axis)
            q.set_encoding(cur)
        return float(encoding_sqnr(hist, cur).mean())

    def freeze(self) -> None:
        """No more updates; learned ranges stop learning if ``freeze_ranges``."""
        self._stop_monitors()
        self._restored = None
        self.frozen = True
        if self.config.freeze_ranges:
            self.freeze_ranges_fn()

    def _freeze_quantizers(self) -> None:
        for q in self.sim.quantizers().values():
            q.freeze()

    def _stop_monitors(self) -> Dict[str, HistogramObserver]:
        observers, self._observers = self._observers, {}
        quantizers = self.sim.quantizers()
        for key in observers:
            quantizers[key].stop_monitoring()
        return observers

    # ---- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain values and tensors (``torch.load(weights_only=True)`` reads them back)."""
        window = {k: obs.state_dict() for k, obs in self._observers.items()} if self._observers else self._restored
        return {"step": self.step, "updates": self.updates, "frozen": self.frozen, "config": asdict(self.config),
                "nonfinite": dict(self.nonfinite), "window": window}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.updates = int(state["step"]), int(state["updates"])
        self.nonfinite = dict(state.get("nonfinite", {}))
        self._stop_monitors()
        self._restored = state.get("window")
        if state["frozen"] and not self.frozen:
            self.freeze()
        self.frozen = bool(state["frozen"])
