"""Wall-clock timing of forward passes: the one measurement that eval/ and compression/ figures share."""
from __future__ import annotations

import time

import numpy as np
import torch


def time_forward(model, x: torch.Tensor, runs: int, warmup: int = 3) -> np.ndarray:
    """Seconds per forward pass, `runs` of them after `warmup` untimed ones (compiles and caches settle there)."""
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return np.asarray(times)
