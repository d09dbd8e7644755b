"""Tokenised recovery examples as a torch Dataset, and their padding collate."""
from __future__ import annotations

import torch

from fxprune.util.lm import IGNORE_INDEX


class Examples(torch.utils.data.Dataset):
    def __init__(self, examples, cutoff_len: int):
        self.items = []
        for i, ex in enumerate(examples):
            if "input_ids" not in ex:
                raise ValueError(f"example {i} has no input_ids; tune() takes tokenised examples "
                                 f"(see fxprune.data.loaders.tokenize_alpaca)")
            ids = torch.as_tensor(ex["input_ids"], dtype=torch.long).flatten()[:cutoff_len]
            labels = ex.get("labels")
            labels = ids.clone() if labels is None else torch.as_tensor(labels, dtype=torch.long).flatten()[:cutoff_len]
            if labels.shape != ids.shape:
                raise ValueError(f"example {i}: labels has {labels.numel()} tokens, input_ids {ids.numel()}")
            if len(ids) == 0:
                raise ValueError(f"example {i} has no tokens")
            self.items.append((ids, labels))
        if not self.items:
            raise ValueError("tune() needs at least one example")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(batch, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, labels) to the longest: padding gets attention 0 and label -100."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, :len(ids)] = ids
        labels[row, :len(lab)] = lab
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
