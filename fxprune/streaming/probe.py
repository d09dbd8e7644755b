"""Time and memory of the first segments of a streamed run: what a dry run extrapolates to the whole model."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from fxprune.streaming.executor import StreamedExecutor
from fxprune.util.memory import reset_resident_peak, resident_peak


@dataclass(frozen=True)
class Probe:
    """What running the first `len(seconds)` segments over every calibration batch took."""
    seconds: tuple[float, ...]   # wall time of each segment: its weights read, every batch through it
    write_seconds: float         # reading the last probed segment's tensors and writing them to a shard
    handed_on: int               # bytes the last probed segment hands on, all batches together
    before: int | None           # resident bytes before the probe (the capture, the analysis, the imports)
    peak: int | None             # resident high-water mark during the probe
    float64_rate: float = 0.0    # float64 multiply-adds per second of a square matrix product (the refit's algebra)

    @property
    def layer_seconds(self) -> float:
        """Seconds of the last probed segment (a decoder layer when two or more are probed)."""
        return self.seconds[-1]


def probe(executor: StreamedExecutor, batches, count: int = 2) -> Probe:
    """Run the first `count` segments of `executor` (the embedding and the first decoder layer by default) on
    `batches` and measure them; nothing is kept."""
    batches = list(batches)
    marks, handed = [], []
    previous = executor.progress

    def record(segment):
        marks.append(time.perf_counter())
        handed.append(executor.store.in_memory)

    budget, executor.budget, executor.progress = executor.budget, None, record
    before = resident_peak() if reset_resident_peak() else None
    try:
        start = time.perf_counter()
        executor.run(batches, logits=False, segments=count)
        peak = resident_peak() if before is not None else None
        write = write_seconds(executor, executor.segments[count - 1])
    finally:
        executor.budget, executor.progress = budget, previous
    seconds = tuple(b - a for a, b in zip([start] + marks, marks))
    return Probe(seconds, write, handed[-1], before, peak, float64_rate())


def float64_rate(n: int = 1024) -> float:
    """Multiply-adds per second of an n x n float64 matrix product here (best of three)."""
    a = torch.randn(n, n, dtype=torch.float64)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return n ** 3 / best


def write_seconds(executor: StreamedExecutor, segment) -> float:
    """Seconds to read `segment`'s tensors and save them as one safetensors shard (in a directory removed after)."""
    start = time.perf_counter()
    tensors = {name: executor.read(name).contiguous() for name in segment.tensors if name in executor.stored_as}
    with tempfile.TemporaryDirectory(prefix="fxprune-probe-") as folder:
        save_file(tensors, Path(folder) / "probe.safetensors")
        return time.perf_counter() - start
