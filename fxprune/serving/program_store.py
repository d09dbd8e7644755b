"""On-disk store of pruned KV-cache step programs: a later process (or Generator) of the same plan skips the capture.

A program's structure depends only on the base architecture and config, the dtype, the batch size, the plan,
and the code that captured and rewrote it (fxprune's sources, torch and transformers): `program_key` hashes all
of them, so a program written by other code or for another plan is never read. Weights are not stored (every
model tensor is kept on the meta device in the file); the Generator copies them in after `fetch`.

The store is a folder in the user's own cache (`FXPRUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/fxprune/programs`,
else `~/.cache/fxprune/programs`; `FXPRUNE_CACHE_DIR=""` turns it off), never a saved model's directory: the
files are pickles (a GraphModule's generated code), and a directory received from someone else must not run
code when it is served.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

ENV = "FXPRUNE_CACHE_DIR"
STORE_FORMAT = 1
KEEP_PROGRAMS = 16  # the newest programs kept in the folder (several plans and batch sizes of one model)
_SOURCES_HASH: list[str] = []  # fxprune's sources, hashed once per process


def sources_hash() -> str:
    """Hash of every fxprune source file: a program built by other fxprune code is not reused."""
    if not _SOURCES_HASH:
        root = Path(__file__).resolve().parent.parent
        digest = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
        _SOURCES_HASH.append(digest.hexdigest())
    return _SOURCES_HASH[0]


def program_key(base: dict, plan, dtype: torch.dtype, batch: int, capture_len: int) -> str:
    """Hash of everything a pruned KV-cache program's structure depends on (its weights excepted)."""
    import transformers
    described = {"format": STORE_FORMAT, "architecture": base["architecture"], "config": base["config"],
                 "dtype": str(dtype), "batch": batch, "capture_len": capture_len, "plan": plan.to_json(),
                 "torch": torch.__version__, "transformers": transformers.__version__, "fxprune": sources_hash()}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def default_folder() -> Path | None:
    """The store's folder from the environment (see the module's docstring), or None when it is turned off."""
    if ENV in os.environ:
        return Path(os.environ[ENV]) if os.environ[ENV] else None
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "fxprune" / "programs"


def swap_tensors(gm: torch.nn.Module, chosen, replace) -> list:
    """Replace each parameter/buffer that `chosen(name, tensor)` accepts by `replace(tensor)`, in place; returns
    what to hand to `restore_tensors`."""
    swapped = []
    for prefix, module in gm.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for leaf, t in list(table.items()):
                if t is not None and chosen(f"{prefix}.{leaf}" if prefix else leaf, t):
                    swapped.append((table, leaf, t))
                    new = replace(t)
                    table[leaf] = torch.nn.Parameter(new, t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
    return swapped


def restore_tensors(swapped: list) -> None:
    """Put back what `swap_tensors` replaced."""
    for table, leaf, t in reversed(swapped):
        table[leaf] = t


class ProgramStore:
    """Pruned step programs by key in `folder` (None: a store that keeps nothing)."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None

    def path(self, key: str, batch: int) -> Path:
        """The file of the program `key` for `batch` rows."""
        return self.folder / f"kv_step_b{batch}_{key[:32]}.pt"

    def fetch(self, key: str, batch: int) -> tuple[torch.fx.GraphModule, dict] | None:
        """The stored program `key` (uninitialised CPU storage for its model tensors) and its tied tensors' aliases,
        or None when there is none (or it cannot be read, or it was stored under another key)."""
        if self.folder is None or not self.path(key, batch).is_file():
            return None
        try:
            stored = torch.load(self.path(key, batch), weights_only=False)
        except Exception as exc:  # a truncated or foreign file: build the program again
            warnings.warn(f"fxprune: ignoring the unreadable stored program {self.path(key, batch)} ({exc})")
            return None
        if not isinstance(stored, dict) or stored.get("key") != key:
            return None
        program = stored["program"]
        swap_tensors(program, lambda name, t: t.is_meta, lambda t: torch.empty(t.shape, dtype=t.dtype))
        return program, stored["aliases"]

    def store(self, key: str, batch: int, program: torch.fx.GraphModule, aliases: dict, is_weight) -> None:
        """Write `program` and `aliases` under `key` atomically, the tensors that `is_weight(name)` accepts kept as
        meta tensors (their values come from the model); the oldest files past KEEP_PROGRAMS are removed."""
        if self.folder is None:
            return
        swapped = swap_tensors(program, lambda name, t: is_weight(name), lambda t: t.to("meta"))
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".kv_step-", dir=self.folder)
            with os.fdopen(fd, "wb") as f:
                torch.save({"key": key, "program": program, "aliases": aliases}, f)
            os.replace(tmp, self.path(key, batch))
            tmp = None
            for old in sorted(self.folder.glob("kv_step_b*.pt"), key=lambda p: p.stat().st_mtime)[:-KEEP_PROGRAMS]:
                old.unlink(missing_ok=True)
        except OSError as exc:  # a read-only or full cache folder: serving goes on without the store
            warnings.warn(f"fxprune: could not store the KV-cache program in {self.folder} ({exc})")
        finally:
            restore_tensors(swapped)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
