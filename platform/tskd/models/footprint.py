"""What a model costs to deploy: parameter count, size and CPU latency at its working size."""

from __future__ import annotations

import statistics
import time
from typing import Callable, NamedTuple

import torch
from torch import nn

__all__ = ["Footprint", "compare_latency", "model_footprint"]


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
    latency = compare_latency({"model": (model, img_size)}, threads=threads, rounds=runs,
                              warmup=warmup)["model"]
    return Footprint(params=params, size_mb=size / 1e6, latency_ms=latency)


@torch.no_grad()
def compare_latency(models: dict[str, tuple[nn.Module, int]], *, threads: int,
                    rounds: int = 10, warmup: int = 1,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median batch-1 CPU latency in ms of each model, measured so that they can be compared.

    The models take turns (round ``r`` times one forward pass of each, in order), so a change in
    the machine's load during the measurement reaches every model alike; latencies measured in
    different stages at different moments differed 10× for one architecture on a shared CPU.

    Args:
        models: name -> (model taking ``float32 (1, 3, size, size)`` images in 0..255, size);
            each is left in eval mode on the CPU.
        threads: torch intra-op threads during the measurement (restored afterwards).
        rounds: timed passes per model (the median is reported).
        warmup: untimed passes per model first.
        clock: seconds (tests pass a fake one).
    """
    inputs = {}
    for name, (model, size) in models.items():
        model.cpu().eval()
        inputs[name] = torch.rand(1, 3, size, size,
                                  generator=torch.Generator().manual_seed(0)) * 255
    times: dict[str, list[float]] = {name: [] for name in models}
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        for _ in range(warmup):
            for name, (model, _) in models.items():
                model(inputs[name])
        for _ in range(max(1, rounds)):
            for name, (model, _) in models.items():
                start = clock()
                model(inputs[name])
                times[name].append(clock() - start)
    finally:
        torch.set_num_threads(previous)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}
