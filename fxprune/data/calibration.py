"""Calibration inputs: validated (input_ids, attention_mask) pairs, cut into chunks of a batch size.

Accepted forms: a LongTensor [batch, seq], a dict with "input_ids" (and optionally "attention_mask"),
or an iterable of either. How they are batched never changes a result: chunks are re-cut to the
scorer's `batch_size` whatever the caller's split.
"""
from __future__ import annotations

import torch

def batches(calibration, vocab_size=None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Validated (input_ids [B, L], attention_mask or None) pairs."""
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, dict)):
        calibration = [calibration]
    out = []
    for i, item in enumerate(calibration):
        mask = None
        if isinstance(item, dict):
            if "input_ids" not in item:
                raise ValueError(f"calibration item {i} is a dict without 'input_ids' (keys: {sorted(item)})")
            ids, mask = item["input_ids"], item.get("attention_mask")
        else:
            ids = item
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"calibration item {i}: expected a LongTensor of input_ids [batch, seq] or a dict "
                             f"with 'input_ids', got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"calibration item {i}: input_ids must be an integer tensor (token ids), "
                             f"got dtype {ids.dtype} with shape {tuple(ids.shape)}")
        if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
            raise ValueError(f"calibration item {i}: input_ids must have shape [batch >= 1, seq >= 2], "
                             f"got shape {tuple(ids.shape)}")
        if vocab_size is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"calibration item {i}: token ids must lie in [0, {vocab_size}), "
                             f"got values in [{int(ids.min())}, {int(ids.max())}]")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"calibration item {i}: attention_mask must be a tensor shaped like input_ids "
                                 f"{tuple(ids.shape)}, got {got}")
        out.append((ids.long(), None if mask is None else mask.long()))
    return out


def vocab_size(dg) -> int | None:
    """The model config's vocab_size, else the rows of the weight read by the first embedding op."""
    vocab = getattr(dg.model_config, "vocab_size", None)
    if vocab is not None:
        return int(vocab)
    for node in dg.gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] == "embedding":
            src = node.args[0]
            if isinstance(src, torch.fx.Node) and src.op == "get_attr":
                weight = dg.parameters.get(dg.aliases.get(src.target, src.target))
                if weight is not None and weight.dim() == 2:
                    return int(weight.shape[0])
            return None
    return None


def chunks(batches, size):
    """Split each (ids, mask) batch into batches of at most `size` rows."""
    for ids, mask in batches:
        for start in range(0, ids.shape[0], size):
            yield ids[start:start + size], None if mask is None else mask[start:start + size]


def to_device(batch, device):
    """A chunk (input_ids, attention_mask or None) on `device`."""
    return tuple(None if t is None else t.to(device) for t in batch)
