"""Calibration as the scorers read it: `fxprune.data.calibration.Calibration`, checked against the model's vocabulary.

How the caller batches it never changes a result: its rows are re-cut to the scorer's `batch_size`.
"""
from __future__ import annotations

import torch

from fxprune.data.calibration import Calibration


def calibration_for(dg, calibration, who: str) -> Calibration:
    """`calibration` (any form `Calibration.of` accepts) checked against `dg`'s vocabulary; ValueError
    saying that `who` reads it when there is none."""
    if calibration is None:
        raise ValueError(f"{who} reads calibration text: pass calibration= token ids (a LongTensor [rows, seq], "
                         "a dict with 'input_ids', a list of them, or a fxprune.data.calibration.Calibration)")
    return Calibration.of(calibration, vocab_size(dg))


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
