"""Helpers shared by several test modules (import as ``from helpers import ...``)."""
import os

import torch
from torch import nn


def calibrate(sim, *batches):
    """Run compute_encodings over the given input batches (tensors or tuples)."""
    def forward(model, _):
        for b in batches:
            model(*b) if isinstance(b, tuple) else model(b)
    sim.compute_encodings(forward)
    return sim


def randomize_bn(model):
    """Give every BatchNorm non-trivial running statistics and affine parameters (in place)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


class ConvFc(nn.Module):
    """A conv, a ReLU and a linear layer on 1x8x8 inputs: the smallest net with weight, output and
    input quantizers (the annealing tests)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def once_per_module(fixture_name, config):
    """Scope of the fixtures that export a model: once per module, except under mutmut's stats
    run (``MUTANT_UNDER_TEST=stats``), where mutmut records which functions each test calls: a
    module-scoped fixture runs inside the first test only, and every later test using it would be
    recorded as calling nothing, so no mutant of the export would run it."""
    return "function" if os.environ.get("MUTANT_UNDER_TEST") == "stats" else "module"
