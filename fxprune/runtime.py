"""Functions the emitted GraphModule calls at run time (kept tiny: they are part of its code)."""
from __future__ import annotations

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast


def default_attention_mask(input_ids: torch.Tensor, attention_mask):
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask


def causal_lm_output(logits: torch.Tensor) -> CausalLMOutputWithPast:
    return CausalLMOutputWithPast(logits=logits)


def device_of(t: torch.Tensor) -> torch.device:
    return t.device
