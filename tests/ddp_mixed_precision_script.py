"""Run by test_mixed_precision.py: the mixed-precision search under a 2-process CPU process group
(gloo). ``python ddp_mixed_precision_script.py OUT``. Rank r searches on its own batches
(``rank_inputs(r)``) twice: with the default label-free score (``default``), and with a local
score (no collective) that differs between ranks (``disagree``: rank 1 turns it around). Each
rank saves its chosen bitwidths and its outputs on a fixed probe batch to ``OUT/<part>_rank<r>.pt``.
"""
import os
import socket
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qat_plugin import QuantSimModel
from qat_plugin.mixed_precision import MixedPrecisionConfig, search_on_batches

CONFIG = dict(candidates=[(4, 8), (8, 8)], max_relative_size=0.7, curve_points=0)


def network():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 5)).eval()


def rank_inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(8, 6, generator=g) * (1 + rank) for _ in range(2)]


PROBE = torch.linspace(-2, 2, 30).reshape(5, 6)


def sim():
    return QuantSimModel(network(), PROBE[:2], quant_scheme="tf")


def _worker(rank, out, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        for part in ("default", "disagree"):
            s = sim()
            score = None
            if part == "disagree":  # a local score (no collective), that rank 1 turns around
                ref = network()(PROBE).detach()
                sign = 1.0 if rank == 0 else -1.0
                score = lambda m: -sign * float((m(PROBE) - ref).pow(2).sum())  # noqa: E731
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                search_on_batches(s, rank_inputs(rank), MixedPrecisionConfig(**CONFIG, score=score), verbose=False)
            with torch.no_grad():
                y = s.model(PROBE)
            torch.save({"bits": {q.key: q.bitwidth for q in s.quantizer_sites()}, "probe": y,
                        "warned": any("rank 0" in str(w.message) for w in caught)},
                       os.path.join(out, f"{part}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    mp.spawn(_worker, args=(sys.argv[1], free_port), nprocs=2)
