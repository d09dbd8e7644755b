"""The causal LM loss and the logits of a model's output: written once for scoring, LoRA and evaluation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of positions that no loss is taken on (padding, prompts)


def logits_of(out) -> torch.Tensor:
    """The logits in a model's output: a ModelOutput (`.logits`), a dict, a tuple (first item) or a tensor."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def model_logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`model(ids, attention_mask=mask)`'s logits in float32.

    Float32 whatever the model's dtype: bf16 log-softmax sums drift visibly over long texts.
    """
    return logits_of(model(ids, attention_mask=mask)).float()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross entropy: the mean over the target positions whose label is not -100 and whose
    attention_mask (if given) is not 0.

    With no valid position the loss is 0, still attached to `logits`' graph (so a backward pass, and
    DDP's reducer, see every parameter on an all-masked batch).
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none",
                         ignore_index=IGNORE_INDEX)
    valid = target.reshape(-1) != IGNORE_INDEX
    if mask is not None:
        valid = valid & (mask[:, 1:] != 0).to(logits.device).reshape(-1)
    valid = valid.to(ce.dtype)
    return (ce * valid).sum() / valid.sum().clamp_min(1)


def mean_token_loss(logits_for, batches) -> float:
    """The LM loss over all `batches` ((ids, mask) pairs) with every target token weighted alike: the sum
    of the token losses over the number of target tokens, however the rows are cut into batches.
    `logits_for(ids, mask)` gives a batch's logits. What every held-out validation reports."""
    total, count = 0.0, 0
    for ids, mask in batches:
        n = int((mask[:, 1:] != 0).sum())
        total += float(lm_loss(logits_for(ids, mask), ids, mask)) * n
        count += n
    return total / max(count, 1)
