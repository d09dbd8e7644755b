"""Rewrite pass: replace every parameter and buffer by a sliced, freshly allocated copy.

The copy never shares storage with the input model. Reads of a tied weight under another
name were already pointed at the canonical name, so the tie survives the rewrite.
"""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.analysis.fx_util import get_attr_path, set_attr_path
from fxprune.analysis.contracts import ContractError


def slice_tensor(t: torch.Tensor, keep: dict[int, torch.Tensor]) -> torch.Tensor:
    """A copy of `t` holding only the `keep` positions (dim -> index tensor), in its own storage."""
    out = t.detach()
    for dim, index in keep.items():
        out = out.index_select(dim, index.to(out.device))
    return out.clone()


class SliceParametersPass(PassBase):
    """Replaces every parameter and buffer of the graph by a freshly allocated copy of its kept slice (`keep`: name
    -> {dim: positions}); buffers keep their persistence."""
    def __init__(self, source: torch.fx.GraphModule, params: dict, buffers: dict, aliases: dict, keep: dict):
        super().__init__()
        self.source, self.params, self.buffers, self.aliases, self.keep = source, params, buffers, aliases, keep

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        for name, t in self.params.items():
            set_attr_path(gm, name, torch.nn.Parameter(slice_tensor(t, self.keep.get(name, {})), t.requires_grad))
        persistent = set(self.source.state_dict())  # non-persistent buffers (rotary inv_freq) stay so
        for name, t in self.buffers.items():
            set_attr_path(gm, name, slice_tensor(t, self.keep.get(name, {})), persistent=name in persistent)
        return PassResult(gm, True)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        """The promise: every tensor has its kept shape and its own storage (none aliases the source)."""
        for name, t in list(self.params.items()) + list(self.buffers.items()):
            new = get_attr_path(gm, name)
            shape = list(t.shape)
            for dim, index in self.keep.get(name, {}).items():
                shape[dim] = len(index)
            if list(new.shape) != shape:
                raise ContractError(f"{name} has shape {list(new.shape)} after slicing, expected {shape}")
            if new.numel() and t.device.type != "meta" and new.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                raise ContractError(f"{name} still shares storage with the input model")
