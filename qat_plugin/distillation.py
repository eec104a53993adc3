"""Label-free QAT by distillation: a frozen FP32 copy of the network teaches the quantized one.

The student is trained on the KL divergence between the teacher's and its own
temperature-softened output distributions (Hinton et al., 2015), scaled by ``T^2`` so that
gradients keep their size across temperatures; optionally plus the task loss when labels exist.
No labels are needed: any images the network accepts will do.

Three ways to use it:

* plain loop: ``distiller = Distiller(fp32_net)``, then ``loss = distiller.loss(student(x), x)``;
* Lightning: :class:`qat_plugin.models.ImageClassifier` with ``distillation={"temperature": 4}``
  (its teacher is made at the start of fit), or your own LightningModule calling a
  :class:`Distiller` in ``training_step``;
* recipes: ``recipes/mobilenet_v2_w4a8_distill.yaml`` (unlabeled digits).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QuantConfigError
from .quantizer import QuantizeDequantize


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, *,
                      targets: Optional[torch.Tensor] = None, task_weight: float = 0.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (mean over the batch), plus
    ``task_weight * cross_entropy(student, targets)`` when ``targets`` are given.

    Class scores are on dimension 1 (``(N, C)`` or ``(N, C, ...)`` as for cross-entropy).

    >>> s = torch.tensor([[2.0, 0.0, -1.0]]); t = torch.tensor([[2.0, 0.0, -1.0]])
    >>> float(distillation_loss(s, t, temperature=4.0))
    0.0
    >>> round(float(distillation_loss(torch.zeros(1, 3), t, temperature=1.0)), 4)
    0.5743
    """
    if not temperature > 0:
        raise QuantConfigError(f"temperature must be > 0, got {temperature!r}")
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1).mean() * t * t
    if targets is not None and task_weight:
        kl = kl + task_weight * F.cross_entropy(student_logits.float(), targets)
    return kl


def frozen_teacher(network: nn.Module) -> nn.Module:
    """A frozen FP32 copy of ``network``: deep-copied, in eval mode, without gradients, and with
    every quantizer inside bypassed (so the ``sim.model`` of an uncalibrated or freshly calibrated
    :class:`~qat_plugin.QuantSimModel` gives its FP32 twin)."""
    teacher = copy.deepcopy(network).eval()
    teacher.requires_grad_(False)
    for m in teacher.modules():
        if isinstance(m, QuantizeDequantize):
            m.enabled = False
    return teacher


class Distiller:
    """A frozen FP32 teacher and the distillation loss, for any training loop.

    Args:
        teacher: the FP32 network (copied and frozen here; later changes to it do not leak in).
        temperature: softening temperature ``T`` (> 0).
        task_weight: weight of the cross-entropy on labels when a loss call passes ``targets``.

    The teacher is a plain attribute, not a registered submodule: it stays out of the
    student's ``state_dict``, optimizer and checkpoints, and follows the inputs' device.

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> teacher = nn.Linear(4, 3); student = nn.Linear(4, 3)
    >>> distiller = Distiller(teacher, temperature=2.0)
    >>> x = torch.randn(16, 4)
    >>> opt = torch.optim.SGD(student.parameters(), lr=0.5)
    >>> first = float(distiller.loss(student(x), x).detach())
    >>> for _ in range(20):
    ...     opt.zero_grad(); distiller.loss(student(x), x).backward(); opt.step()
    >>> float(distiller.loss(student(x), x).detach()) < first / 2
    True
    """

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, task_weight: float = 0.0):
        if not temperature > 0:
            raise QuantConfigError(f"Distiller: temperature must be > 0, got {temperature!r}")
        if not task_weight >= 0:
            raise QuantConfigError(f"Distiller: task_weight must be >= 0, got {task_weight!r}")
        self.teacher = frozen_teacher(teacher)
        self.temperature = float(temperature)
        self.task_weight = float(task_weight)

    @torch.no_grad()
    def teacher_logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        device = inputs[0].device
        if next(self.teacher.parameters(), torch.empty(0, device=device)).device != device:
            self.teacher.to(device)
        with torch.autocast(device_type=device.type, enabled=False):
            return self.teacher(*(i.float() if i.is_floating_point() else i for i in inputs))

    def loss(self, student_logits: torch.Tensor, *inputs: torch.Tensor,
             targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The distillation loss of ``student_logits`` on ``inputs`` (labels optional)."""
        return distillation_loss(student_logits, self.teacher_logits(*inputs), self.temperature,
                                 targets=targets, task_weight=self.task_weight)
