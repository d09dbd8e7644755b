"""A streamed run's cost before it runs: sizes from the captured graph, time and memory from a probe of its
first decoder layer, multiplied out over the layers and the sweeps the settings need."""
from __future__ import annotations

from dataclasses import dataclass

from fxprune.streaming.probe import Probe

# The probe's layer time in one sweep of each kind: a backward sweep recomputes the layer and differentiates
# it; a refit runs the dense and the pruned layer; a plain write only reads, slices and saves.
SWEEP_COST = {"score": 1.0, "backward": 2.0, "refit": 2.0}


@dataclass(frozen=True)
class CostEstimate:
    """What `prune_checkpoint` with the same arguments will need; `lines()` is the dry run's report."""
    parameters: int
    parameters_after: int
    checkpoint_bytes: int
    output_bytes: int
    layers: int                  # decoder-layer segments (the embedding and the head come besides)
    largest: str                 # the segment with the most weight bytes, described
    largest_bytes: int
    sweeps: tuple[str, ...]      # "score", "backward", "refit" or "write", in order
    budget: int | None
    probe: Probe
    setup_seconds: float         # the meta-device capture and analysis, made once per run
    refit_work: float = 0.0      # float64 multiply-adds of the refit's sums, solves and candidate scores

    def sweep_seconds(self, sweep: str) -> float:
        per_layer = (self.probe.write_seconds if sweep == "write" else
                     self.probe.layer_seconds * SWEEP_COST[sweep])
        solves = self.refit_work / self.probe.float64_rate if sweep == "refit" and self.probe.float64_rate else 0.0
        return per_layer * (self.layers + 2) + solves

    @property
    def seconds(self) -> float:
        return self.setup_seconds + sum(self.sweep_seconds(s) for s in self.sweeps)

    @property
    def spill_bytes(self) -> int:
        """Bytes of activations written to disk at a layer boundary: what exceeds the budget left by the weights."""
        room = None if self.budget is None else max(self.budget - self.largest_bytes, 0)
        return 0 if room is None else max(self.probe.handed_on - room, 0)

    @property
    def peak_bytes(self) -> int | None:
        """Resident peak expected: the probe's, or the write sweep's (a segment's dense tensors, their pruned
        copies and the shard being written) where that is larger."""
        if self.probe.peak is None:
            return None
        base = self.probe.before or 0
        in_memory = self.probe.handed_on - self.spill_bytes
        write = base + 3 * self.largest_bytes + in_memory if "write" in self.sweeps else 0
        return max(self.probe.peak, write)

    def lines(self) -> list[tuple[str, str]]:
        rows = [("parameters", f"{self.parameters:,} -> about {self.parameters_after:,}"),
                ("checkpoint", size(self.checkpoint_bytes)),
                ("decoder layers", str(self.layers)),
                ("largest segment", f"{self.largest}: {size(self.largest_bytes)} of weights (the least --max-memory)"),
                ("probe (embedding + layer 0)", " + ".join(duration(s) for s in self.probe.seconds)
                 + f"; reading and writing a layer {duration(self.probe.write_seconds)}"),
                ("activations per boundary", size(self.probe.handed_on)),
                ("activations spilled to disk", size(self.spill_bytes)),
                ("output on disk", f"about {size(self.output_bytes)}")]
        counts = {s: self.sweeps.count(s) for s in self.sweeps}
        rows += [("capture and analysis", duration(self.setup_seconds))]
        rows += [(f"{s} sweep" + (f" x {n}" if n > 1 else ""), f"about {duration(self.sweep_seconds(s))} each")
                 for s, n in counts.items()]
        rows += [("time", f"about {duration(self.seconds)}"), ("peak memory", f"about {size(self.peak_bytes)}")]
        return rows


def size(count: int | None) -> str:
    """Bytes in the largest unit that keeps a number >= 1 (decimal units, as --max-memory reads them)."""
    if count is None:
        return "unknown"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def duration(seconds: float) -> str:
    """Seconds, or minutes, or hours, as a person reads a duration."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def refit_work(kept: dict[str, dict[int, list[int]]], shapes: dict[str, tuple], settings, tokens: int) -> float:
    """Float64 multiply-adds the refit under `settings` (a `Refit`) makes for the projections whose inputs the plan
    prunes (`kept`: name -> {dim: kept positions}; `shapes`: each weight's shape) on `tokens` calibration tokens:
    the sums (tokens x n^2), each candidate's held-out score (m x n^2) and each ridge solve (n^3 / 3 + m x n^2),
    n the kept inputs and m the kept outputs."""
    from fxprune.reconstruction.least_squares import RIDGES
    from fxprune.reconstruction.settings import AUTO
    if not settings.enabled:
        return 0.0
    auto, lstsq = settings.ridge == AUTO, settings.mode == "lstsq"
    candidates = (2 + len(RIDGES) * lstsq) if auto else 0
    solves = (len(RIDGES) + 1 if auto else 1) if lstsq else 0
    work = 0.0
    for name, dims in kept.items():
        shape = shapes.get(name)
        if shape is None or len(shape) != 2 or 1 not in dims:
            continue
        n, m = len(dims[1]), len(dims.get(0, range(shape[0])))
        work += tokens * n * n + candidates * m * n * n + solves * (n ** 3 / 3 + m * n * n)
    return work
