"""Mixed precision with loss scaling, on CUDA and on CPU.

* Lightning: ``Trainer(precision="16-mixed")`` on CUDA and ``"bf16-mixed"`` anywhere work as
  they are. On CPU, Lightning turns ``"16-mixed"`` into bf16 without a scaler; for real fp16
  with loss scaling pass ``plugins=[fp16_mixed_precision("cpu")]``.
* Hand-written loops: :class:`AmpHelper` (autocast + ``torch.amp.GradScaler``).

Quantizers always compute in float32 (autocast disabled inside), and a skipped step (inf/NaN
gradients) is reported so that encodings and annealing schedules stay put.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


def fp16_mixed_precision(device: str = "cpu", init_scale: float = 2.0**16):
    """Lightning's own ``MixedPrecision`` plugin in fp16 with a ``torch.amp.GradScaler(device)``.

    >>> plugin = fp16_mixed_precision("cpu")
    >>> plugin.precision, type(plugin.scaler).__name__
    ('16-mixed', 'GradScaler')
    """
    from pytorch_lightning.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", device, torch.amp.GradScaler(device, init_scale=init_scale))


def loss_scaler(trainer) -> Optional[torch.amp.GradScaler]:
    """The GradScaler of the trainer's precision plugin (``None`` when it has none)."""
    return getattr(trainer.precision_plugin, "scaler", None)


class AmpHelper:
    """Autocast plus loss scaling for a hand-written loop.

    >>> _ = torch.manual_seed(0)
    >>> amp = AmpHelper("cpu", torch.float16, init_scale=2.0**10)
    >>> model = torch.nn.Linear(4, 1); opt = torch.optim.SGD(model.parameters(), 0.1)
    >>> with amp.autocast():
    ...     loss = model(torch.randn(8, 4)).float().pow(2).mean()
    >>> amp.backward(loss)
    >>> amp.step(opt)            # True: applied; False: skipped for inf/NaN gradients
    True
    """

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float16, enabled: bool = True,
                 init_scale: float = 2.0**16):
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        self.device, self.dtype, self.enabled = device, dtype, enabled
        use_scaler = enabled and dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device, init_scale=init_scale, enabled=use_scaler)

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, clip_grad_norm: Optional[float] = None) -> bool:
        """Unscale, optionally clip, step and update the scale; return whether the step was applied."""
        if clip_grad_norm is not None:
            self.scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return before is None or self.scaler.get_scale() >= before

    @property
    def scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)
