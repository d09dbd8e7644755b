"""Modules the emitted GraphModule calls at its input and output.

They are submodules (not free functions) so that re-tracing the GraphModule, as
`torch.load` does, keeps them as calls instead of tracing through their Python branches.
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast


class DefaultAttentionMask(torch.nn.Module):
    """Graph module that stands in an all-ones attention mask when the caller passes none."""
    def forward(self, input_ids: torch.Tensor, attention_mask=None):
        """`attention_mask`, or ones shaped like `input_ids` when it is None."""
        return torch.ones_like(input_ids) if attention_mask is None else attention_mask


class CausalLMOutput(torch.nn.Module):
    """Graph module that wraps the logits in a Hugging Face output, so a pruned model is called like the original."""
    def forward(self, logits: torch.Tensor):
        """`logits` as a `CausalLMOutputWithPast`."""
        return CausalLMOutputWithPast(logits=logits)


def device_of(t: torch.Tensor) -> torch.device:
    """The tensor's device (a call the graph keeps, so the mask follows the input)."""
    return t.device
