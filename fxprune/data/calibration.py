"""`Calibration`: the token rows every data-reading stage (scoring, HyWIA, the refit) runs on.

Built once where calibration enters fxprune (`fxprune.plan` / `apply` / `compile`, the CLI, the public
scorers) from what a user may pass: a LongTensor [rows, seq], a dict with "input_ids" (and optionally
"attention_mask"), or an iterable of either; rows of different lengths are right-padded into one
[rows, seq] pair with their mask. The stages then cut it into batches or split off held-out rows
instead of converting again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Calibration:
    """Rows of token ids [n, seq] and their attention mask [n, seq] (1: a real token, 0: padding), both
    LongTensors; every row holds at least one real token. `Calibration.of(...)` builds one from the
    accepted forms; this constructor takes the two tensors as they are and only validates them."""
    ids: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        for name in ("ids", "mask"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.long or value.dim() != 2:
                got = (f"dtype {value.dtype}, shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                raise ValueError(f"Calibration.{name} must be a 2-D LongTensor [rows, seq], got {got}")
        if self.ids.shape != self.mask.shape:
            raise ValueError(f"Calibration.mask must have the shape of Calibration.ids {tuple(self.ids.shape)}, "
                             f"got {tuple(self.mask.shape)}")
        if self.ids.shape[0] < 1 or self.ids.shape[1] < 2:
            raise ValueError(f"Calibration.ids must have shape [rows >= 1, seq >= 2], got {tuple(self.ids.shape)}")
        empty = (self.mask != 0).sum(1) == 0
        if bool(empty.any()):
            raise ValueError(f"Calibration.mask: row {int(empty.nonzero()[0])} has no real token (its mask is all 0)")

    @classmethod
    def of(cls, value, vocab_size: int | None = None) -> "Calibration":
        """`value` as a Calibration: one as it is, or a LongTensor [rows, seq], a dict with "input_ids" (and
        "attention_mask"), or an iterable of them (ragged rows right-padded). `vocab_size`: also check that
        every real token id lies in [0, vocab_size). Errors name the offending item."""
        calibration = value if isinstance(value, cls) else cls.cat([_item(i, x) for i, x in enumerate(
            [value] if isinstance(value, (torch.Tensor, dict)) else _items(value))])
        if vocab_size is not None:
            calibration.check_vocab(vocab_size)
        return calibration

    @classmethod
    def cat(cls, parts: list["Calibration"]) -> "Calibration":
        """The rows of `parts` one after the other, right-padded (mask 0) to the longest."""
        if not parts:
            raise ValueError("calibration is empty: pass token ids (a LongTensor [rows, seq] or a list of them)")
        if len(parts) == 1:
            return parts[0]
        length = max(p.ids.shape[1] for p in parts)
        ids = torch.cat([torch.nn.functional.pad(p.ids, (0, length - p.ids.shape[1])) for p in parts])
        mask = torch.cat([torch.nn.functional.pad(p.mask, (0, length - p.mask.shape[1])) for p in parts])
        return cls(ids, mask)

    @classmethod
    def from_text(cls, tokenizer, source, n: int = 32, seq_len: int = 128, seed: int = 0) -> "Calibration":
        """`n` random windows of `seq_len` tokens of `source` (texts, or a JSON / JSONL / plain text file),
        drawn as `fxprune.data.loaders.calibration_samples` draws them."""
        from fxprune.data.loaders import calibration_samples
        ids = calibration_samples(source, tokenizer, n, seq_len, seed)
        return cls(ids, torch.ones_like(ids))

    @classmethod
    def packaged(cls, tokenizer, n: int = 32, seq_len: int = 128, seed: int = 0) -> "Calibration":
        """`n` windows of the C4 sample shipped in the package: the calibration when the user gives none."""
        from fxprune.data.loaders import PACKAGED_C4
        return cls.from_text(tokenizer, PACKAGED_C4, n, seq_len, seed)

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def target_tokens(self) -> int:
        """The number of next-token targets: real tokens after the first position of each row."""
        return int((self.mask[:, 1:] != 0).sum())

    def check_vocab(self, vocab_size: int) -> "Calibration":
        """Itself, once every real token id is known to lie in [0, vocab_size)."""
        real = self.ids[self.mask != 0]
        low, high = int(real.min()), int(real.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"calibration token ids must lie in [0, {vocab_size}), got values in [{low}, {high}]")
        return self

    def rows(self, start: int, stop: int | None = None) -> "Calibration":
        """Rows `start` to `stop` (exclusive)."""
        return Calibration(self.ids[start:stop], self.mask[start:stop])

    def held_out_rows(self, fraction: float) -> int:
        """How many of the last rows a hold-out of `fraction` keeps out: at least one when fraction > 0 and
        there are two rows or more, never all of them, none otherwise."""
        n = len(self)
        return min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0

    def split_holdout(self, n: int) -> tuple["Calibration", "Calibration | None"]:
        """(the first rows, the last `n` rows, or None when `n` is 0)."""
        if not 0 <= n < len(self):
            raise ValueError(f"split_holdout: n must be in [0, {len(self)}) for {len(self)} rows, got {n}")
        return (self, None) if n == 0 else (self.rows(0, len(self) - n), self.rows(len(self) - n))

    def batches(self, size: int, device=None):
        """(ids, mask) chunks of `size` rows in order, on `device` when given; each cut after its last real
        column, so padding added for longer rows elsewhere is not computed."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        for start in range(0, len(self), size):
            ids, mask = self.ids[start:start + size], self.mask[start:start + size]
            width = int((mask != 0).any(0).nonzero().max()) + 1
            if width < ids.shape[1]:
                ids, mask = ids[:, :width], mask[:, :width]
            yield (ids, mask) if device is None else (ids.to(device), mask.to(device))


def _items(value):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"calibration: expected token ids (a LongTensor [rows, seq], a dict with 'input_ids', or "
                         f"a list of them), got {type(value).__name__}")
    return list(value)


def _item(i: int, item) -> Calibration:
    """One accepted item (a tensor of ids or a dict with "input_ids") as a Calibration; errors name item `i`."""
    mask = None
    if isinstance(item, Calibration):
        return item
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
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape)):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"calibration item {i}: attention_mask must be a tensor shaped like input_ids "
                         f"{tuple(ids.shape)}, got {got}")
    ids = ids.long()
    try:
        return Calibration(ids, torch.ones_like(ids) if mask is None else mask.long())
    except ValueError as exc:
        raise ValueError(f"calibration item {i}: {exc}") from None
