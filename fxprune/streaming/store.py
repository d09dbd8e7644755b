"""The values one segment hands on to the next, per calibration batch: in memory up to a byte budget, the
rest written to disk (torch.save in a temporary directory) and read back when the next segment takes them."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def nbytes(values: dict) -> int:
    """Bytes of the tensors among `values` (ints and other small values count as nothing)."""
    return sum(v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor))


class ActivationStore:
    """Hand-on values by batch index (or any hashable key). `budget`: bytes kept in memory (None: no limit); a batch that would
    exceed it goes to a file under `directory` (a temporary one by default), removed once taken back."""

    def __init__(self, budget: int | None = None, directory=None, device=None):
        self.budget, self.device = budget, device
        self._root = directory
        self._tmp = None
        self._memory: dict[int, dict] = {}
        self._disk: dict[int, Path] = {}
        self.in_memory = 0      # bytes held in memory now
        self.spilled = 0        # batches written to disk so far
        self.peak = 0           # the most bytes held in memory at once

    def put(self, batch: int, values: dict) -> None:
        """Keep `values` (a dict of node name -> value) of `batch`."""
        size = nbytes(values)
        if self.budget is not None and self.in_memory + size > self.budget:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="fxprune-stream-", dir=self._root)
            path = Path(self._tmp.name) / f"{self.spilled}.pt"  # keys may be tuples: (segment, batch)
            torch.save(values, path)
            self._disk[batch] = path
            self.spilled += 1
            return
        self._memory[batch] = values
        self.in_memory += size
        self.peak = max(self.peak, self.in_memory)

    def take(self, batch: int) -> dict:
        """The values of `batch`, forgotten here (read back from disk when they were spilled)."""
        if batch in self._disk:
            path = self._disk.pop(batch)
            values = torch.load(path, map_location=self.device, weights_only=True)
            path.unlink()
            return values
        values = self._memory.pop(batch)
        self.in_memory -= nbytes(values)
        return values

    def peek(self, batch: int) -> dict:
        """The values of `batch`, kept here (a new dict: what the caller pops from it stays)."""
        if batch in self._disk:
            return torch.load(self._disk[batch], map_location=self.device, weights_only=True)
        return dict(self._memory[batch])

    def close(self) -> None:
        """Remove the spill directory and forget every value."""
        self._memory.clear()
        self._disk.clear()
        self.in_memory = 0
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
