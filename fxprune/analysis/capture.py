"""Capture: trace a Hugging Face causal LM into an FX graph with torch.export."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class CaptureError(RuntimeError):
    """Raised when `torch.export` cannot capture the model (or its KV-cache step); the message says what failed."""
    pass


@dataclass
class Captured:
    """The result of `capture`: the unlifted `GraphModule` (its parameters alias the model's) and the
    `ExportedProgram` it came from."""
    gm: torch.fx.GraphModule          # unlifted graph; its parameters alias the model's
    exported: torch.export.ExportedProgram


def example_inputs_for(model, batch: int = 2, seq: int = 8):
    """Example `(input_ids, attention_mask)` of `batch` x `seq` tokens on the model's device, for the capture."""
    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", 32)
    ids = torch.arange(batch * seq, device="cpu").reshape(batch, seq) % max(vocab - 1, 1) + 1
    return ids.to(device), torch.ones(batch, seq, dtype=torch.long, device=device)


def capture(model: torch.nn.Module, example_inputs=None, dynamic: bool = True) -> Captured:
    """Export `model` (non-strict, use_cache=False) with dynamic batch and sequence.

    `example_inputs` is `input_ids` or `(input_ids, attention_mask)`; its batch must be at
    least 2, since torch.export specialises a batch of 1.
    """
    if example_inputs is None:
        ids, mask = example_inputs_for(model)
    elif isinstance(example_inputs, torch.Tensor):
        ids, mask = example_inputs, torch.ones_like(example_inputs)
    else:
        ids, mask = example_inputs
    if ids.dim() != 2 or ids.shape[0] < 2:
        raise ValueError(f"example input_ids must be [batch >= 2, seq], got shape {tuple(ids.shape)}")
    dynamic_shapes = None
    if dynamic:
        seq_max = int(getattr(model.config, "max_position_embeddings", None) or 4096)
        batch = torch.export.Dim("batch", min=1, max=1024)
        seq = torch.export.Dim("seq", min=2, max=max(seq_max, ids.shape[1]))
        dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "use_cache": None}
    was_training = model.training
    model.eval()  # dropout must not be traced; restored below so the input model is unchanged
    try:
        ep = torch.export.export(model, (ids,), kwargs={"attention_mask": mask, "use_cache": False},
                                 dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise CaptureError(
            f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            "Hint: fxprune needs a model whose forward(input_ids, attention_mask=..., use_cache=False) "
            "exports with torch.export(strict=False); data-dependent Python branches on tensor values "
            "must be removed, or try dynamic=False."
        ) from exc
    finally:
        model.train(was_training)
    gm = ep.module()
    drop_input_guards(gm)
    return Captured(gm, ep)


def drop_input_guards(gm: torch.fx.GraphModule) -> None:
    """Remove export's `_guards_fn` check and the pytree hook: fxprune gives the output its own signature."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
