"""What a model costs to deploy: parameter count, size and CPU latency at its working size."""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["Footprint", "model_footprint"]


class Footprint(NamedTuple):
    """Attributes:
        params: number of parameters.
        size_mb: bytes of the state dict's tensors (parameters and persistent buffers, as
            stored) / 1e6.
        latency_ms: median wall time of one forward pass at batch 1 on the CPU, in ms.
    """

    params: int
    size_mb: float
    latency_ms: float


@torch.no_grad()
def model_footprint(model: nn.Module, img_size: int, *, threads: int, runs: int = 5,
                    warmup: int = 1) -> Footprint:
    """Measure ``model`` (left in eval mode on the CPU) at batch 1.

    Args:
        model: takes ``float32 (1, 3, img_size, img_size)`` images in 0..255.
        img_size: input size (the model's working size).
        threads: torch intra-op threads during the measurement (restored afterwards).
        runs: timed forward passes (the median is reported).
        warmup: untimed passes first.
    """
    params = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model = model.cpu().eval()
    x = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)) * 255
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(max(1, runs)):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return Footprint(params=params, size_mb=size / 1e6, latency_ms=1000 * statistics.median(times))
