"""torch.export program (.pt2) and AOTInductor package of a pruned GraphModule.

The program's signature is `(input_ids, attention_mask) -> logits` (a plain tensor), so loading it
needs torch only: no transformers output class, no fxprune.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fxprune.export.common import ExportError, base_of, check_free, probe_inputs


class LogitsOnly(torch.nn.Module):
    """`gm(input_ids, attention_mask=...).logits` as a module with positional tensor inputs."""

    def __init__(self, gm: torch.nn.Module):
        super().__init__()
        self.gm = gm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped GraphModule, as a plain tensor for `torch.export`."""
        return self.gm(input_ids, attention_mask=attention_mask).logits


def max_positions(gm) -> int:
    """Longest sequence the base config allows (4096 when it does not say)."""
    config = base_of(gm)["config"]
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 4096)


def export_logits_program(gm: torch.fx.GraphModule, example_inputs=None) -> torch.export.ExportedProgram:
    """ExportedProgram of the pruned model with dynamic batch (1-1024) and sequence (2-max positions)."""
    return logits_program(LogitsOnly(gm), example_inputs or probe_inputs(gm), max_positions(gm))


def logits_program(module: torch.nn.Module, example_inputs, max_seq: int) -> torch.export.ExportedProgram:
    """Export any `module(input_ids, attention_mask) -> logits` with dynamic batch and sequence."""
    ids, mask = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs, torch.ones_like(example_inputs))
    if ids.dim() != 2 or ids.shape[0] < 2:
        raise ValueError(f"example input_ids must be [batch >= 2, seq], got shape {tuple(ids.shape)}")
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=max(max_seq, ids.shape[1]))
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with torch.no_grad():
        return torch.export.export(module.eval(), (ids, mask), dynamic_shapes=shapes, strict=False)


def export_program(gm: torch.fx.GraphModule, path, example_inputs=None, aoti: bool = False) -> Path:
    """Write the pruned model as a `.pt2` program (`torch.export.load(path).module()(ids, mask)` gives
    the logits) or, with `aoti=True`, as an AOTInductor package (`torch._inductor.aoti_load_package`),
    compiled C++ that runs without Python model code. Nothing is written if export fails."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ExportError(f"export_program writes a .pt2 file; got {path}")
    check_free(path)
    ep = export_logits_program(gm, example_inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.pt2")  # torch wants the .pt2 suffix
    try:
        if aoti:
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
        else:
            torch.export.save(ep, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
