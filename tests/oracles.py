"""Correctness oracles shared by the tests."""
from __future__ import annotations

import copy

import torch

import fxprune

OUTPUT_PROJECTION_KINDS = ("heads", "kv_groups", "group_heads", "mlp")


def random_scores(dg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {grp.id: torch.rand(grp.n_units, generator=g) for grp in dg.groups}


def zero_masked(model, dg, plan):
    """The original model with every removed head/channel zeroed at its output projection."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for gid, kept in plan.units.items():
            group = dg.groups[gid]
            assert group.kind in OUTPUT_PROJECTION_KINDS, group.kind
            keep = torch.zeros(group.n_units, dtype=torch.bool)
            keep[kept] = True
            for m in group.members:
                w = params.get(m.name)
                if w is None or w.dim() < 2 or m.dim != w.dim() - 1:
                    continue
                removed = (m.unit_of >= 0) & ~keep[m.unit_of.clamp(min=0)]
                w[..., removed] = 0
    return ref


def inputs(vocab=128, batch=3, seq=11, seed=1, padded=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0  # left padding in one row
    return ids, mask


def rel_err(a, b):
    a, b = a.detach(), b.detach()  # outputs of a compiled module still carry requires_grad
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def prune_random(model, ratio, targets=("heads", "mlp"), seed=0, allocation="global", dg=None, **kw):
    dg = dg or fxprune.analyze(model)
    plan = fxprune.plan(model, ratio, targets=targets, scores=random_scores(dg, seed), dg=dg,
                        allocation=allocation, **kw)
    return dg, plan, fxprune.apply(model, plan, dg=dg)


def module_inputs(module, model_call):
    """The first input `module` receives while `model_call()` runs, as [tokens, features]."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            model_call()
    finally:
        handle.remove()
    return seen[0]
