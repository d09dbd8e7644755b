"""Modules the emitted GraphModule calls at its input and output.

They are submodules (not free functions) so that re-tracing the GraphModule, as
`torch.load` does, keeps them as calls instead of tracing through their Python branches.
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast


class DefaultAttentionMask(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask=None):
        return torch.ones_like(input_ids) if attention_mask is None else attention_mask


class CausalLMOutput(torch.nn.Module):
    def forward(self, logits: torch.Tensor):
        return CausalLMOutputWithPast(logits=logits)


def device_of(t: torch.Tensor) -> torch.device:
    return t.device
