"""What every exporter shares: the error type, the pruned model's base description, a staging area
that leaves nothing behind on failure, and a short probe input."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch


class ExportError(ValueError):
    """The pruned model cannot be written in the requested format (nothing was written)."""


def base_of(gm) -> dict:
    """The unpruned architecture and config recorded on `gm` by `fxprune.apply` / `compile` / `load`; raises
    `ExportError` for a GraphModule without them."""
    from fxprune.analysis.meta_keys import BASE_KEY
    base = getattr(gm, "meta", {}).get(BASE_KEY)
    if not base or not base.get("config"):
        raise ExportError("export needs a GraphModule made by fxprune.apply/compile/load "
                          "(it carries its base model's class and config at gm.meta['fxprune.base'])")
    return base


def model_type(gm) -> str:
    """The transformers `model_type` of the model `gm` was pruned from ("?" when unknown)."""
    return base_of(gm)["config"].get("model_type", "?")


def probe_inputs(gm, batch: int = 2, seq: int = 8):
    """(input_ids, attention_mask): token ids spread over the vocabulary, the first row left-padded."""
    vocab = int(base_of(gm)["config"].get("vocab_size") or 32)
    device = next(gm.parameters()).device
    ids = (torch.arange(batch * seq).reshape(batch, seq) * 7919 % max(vocab - 1, 1) + 1).to(device)
    return ids, torch.ones_like(ids)


def pruned_logits(gm, ids, mask=None) -> torch.Tensor:
    """Float logits of `gm` on `ids` (all-ones mask by default), without gradients."""
    with torch.no_grad():
        return gm(ids, attention_mask=mask if mask is not None else torch.ones_like(ids)).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of `a` and `b` over the largest magnitude of `b`."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def check_free(output) -> Path:
    """The output path must not exist, or be an empty directory: an export never overwrites."""
    output = Path(output)
    if output.is_file() or (output.is_dir() and any(output.iterdir())):
        raise ExportError(f"output {output} exists and is not empty; choose a new path (nothing was written)")
    return output


@contextlib.contextmanager
def staged_directory(output):
    """Yield a fresh directory beside `output`; renamed to `output` only if the block succeeds."""
    output = check_free(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        yield tmp
        if output.is_dir():
            output.rmdir()  # empty (check_free)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
