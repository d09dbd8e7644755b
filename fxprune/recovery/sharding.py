"""After training under FSDP: the trained weights gathered whole into an unsharded copy of the model.

FSDP2 (`fully_shard`, what accelerate's FSDP config sets up) leaves every parameter a DTensor holding this
rank's shard and the module's class swapped for one with gathering hooks; peft's merge and `fxprune.save`
need plain tensors. So `tune()` keeps an unsharded copy of the GraphModule from before sharding and loads
the trained (LoRA or all) weights into it once training ends.
"""
from __future__ import annotations

import copy

import torch
from torch.distributed.tensor import DTensor


def unsharded_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of `gm` (its meta shared, not copied: the plan there holds fake tensors deepcopy cannot copy)."""
    meta = gm.meta
    gm.meta = {}
    try:
        copied = copy.deepcopy(gm)
    finally:
        gm.meta = meta
    copied.meta = dict(meta)
    return copied


def trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of `model` whole, on the CPU, by name: a sharded one (a DTensor) gathered
    from all ranks, so every rank calls it in the same order; the others as they are."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = value.detach().cpu()
    return out


def load_trained(plain: torch.nn.Module, sharded: torch.nn.Module) -> torch.nn.Module:
    """`plain` (an unsharded model with `sharded`'s parameter names: the same peft wrapping of an unsharded copy)
    given `sharded`'s trained weights whole, in place; returned. ValueError naming the parameters that differ."""
    state, own = trained_tensors(sharded), dict(plain.named_parameters())
    trainable = {n for n, p in own.items() if p.requires_grad}
    if set(state) != trainable:
        raise ValueError(f"the sharded model trained other parameters than the unsharded copy has: missing "
                         f"{sorted(trainable - set(state))[:5]}, unexpected {sorted(set(state) - trainable)[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)
    return plain
