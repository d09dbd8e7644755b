"""Where an interrupted streamed sweep starts again: the values handed on at a segment boundary and the sweep's
own state (its statistics so far), written atomically to one file after a segment finishes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch


class Snapshots:
    """The last finished boundary of one sweep, kept in `path`. `every`: seconds between two writes (0: after
    every segment); the next run of the same sweep resumes after the segment last written."""

    def __init__(self, path, every: float = 60.0):
        self.path, self.every = Path(path), every
        self._written = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._written >= self.every

    def save(self, segment: int, batches: list[dict], state: dict) -> None:
        """Record that every batch has passed segment `segment`, handing on `batches`, with the sweep's `state`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"segment": segment, "batches": batches, "state": state}, tmp)
        os.replace(tmp, self.path)
        self._written = time.monotonic()

    def load(self, device=None) -> tuple[int, list[dict], dict] | None:
        """(last finished segment, hand-on values per batch, state) of the last write; None when there is none."""
        if not self.path.is_file():
            return None
        saved = torch.load(self.path, map_location=device, weights_only=False)
        return saved["segment"], saved["batches"], saved["state"]

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class WorkFolder:
    """The resumable state of one streamed prune into `output`, kept beside it (`.NAME.fxprune-resume`) and
    removed once the output is complete. `key`: what makes two runs the same run (checkpoint files, settings,
    calibration); state left by a run with another key is discarded."""

    def __init__(self, output, key: dict):
        output = Path(output)
        self.path = output.parent / f".{output.name}.fxprune-resume"
        self.key = json.dumps(key, sort_keys=True, default=str)
        stamp = self.path / "key.json"
        if self.path.is_dir() and (not stamp.is_file() or stamp.read_text() != self.key):
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        stamp.write_text(self.key)

    def snapshots(self, sweep: str, every: float = 60.0) -> Snapshots:
        return Snapshots(self.path / f"{sweep}.pt", every)

    @property
    def plan_file(self) -> Path:
        return self.path / "plan.json"

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def checkpoint_key(directory, **settings) -> dict:
    """What identifies a run on checkpoint `directory`: its files' sizes and modification times, and `settings`
    (tensors among them by a hash of their bytes)."""
    directory = Path(directory)
    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(directory.iterdir()) if f.is_file()}
    digest = lambda v: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() if isinstance(v, torch.Tensor) \
        else v
    return {"checkpoint": str(directory.resolve()), "files": files, **{k: digest(v) for k, v in settings.items()}}
