"""The running ``torch.distributed`` process group, for the tools that share statistics across
ranks (calibration observers, the mixed-precision search, the post-training tools)."""
from __future__ import annotations

import torch


def world():
    """``torch.distributed`` when a process group with more than one rank is running, else ``None``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def collective_device(dist) -> torch.device:
    """Where a tensor must live to take part in a collective: the current GPU under NCCL, else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
