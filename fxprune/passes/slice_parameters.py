"""Rewrite pass: replace every parameter and buffer by a sliced, freshly allocated copy.

The copy never shares storage with the input model. Reads of a tied weight under another
name were already pointed at the canonical name, so the tie survives the rewrite.
"""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult


def set_attr_path(root: torch.nn.Module, path: str, value, persistent: bool = True) -> None:
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    if isinstance(value, torch.nn.Parameter):
        mod.register_parameter(leaf, value)
    elif isinstance(value, torch.nn.Module):
        mod.add_module(leaf, value)
    else:
        mod.register_buffer(leaf, value, persistent=persistent)


def slice_tensor(t: torch.Tensor, keep: dict[int, torch.Tensor]) -> torch.Tensor:
    out = t.detach()
    for dim, index in keep.items():
        out = out.index_select(dim, index.to(out.device))
    return out.clone()


class SliceParametersPass(PassBase):
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
