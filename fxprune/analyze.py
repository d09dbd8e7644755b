"""`analyze`: capture a model and find its groups of coupled dimensions."""
from __future__ import annotations

import torch

from fxprune.capture import capture
from fxprune.groups import DependencyGraph
from fxprune.passes.propagate_dimensions import PropagateDimensionsPass
from fxprune.passes.recompute_shared_constants import RecomputeSharedConstantsPass


def label(gm) -> DependencyGraph:
    propagate = PropagateDimensionsPass()
    propagate(gm)
    return DependencyGraph(gm, propagate.labels)


def heads_shared_across_layers(dg: DependencyGraph) -> set[int]:
    """Head atoms that appear in the batch dimensions of more than one attention op."""
    seen, shared = {}, set()
    for i, (_, dq, _) in enumerate(dg.attention_ops):
        for atom in dq[:-2]:
            for leaf in dg.table.leaves(atom):
                if leaf.static and int(leaf.size) > 1:
                    if seen.setdefault(leaf.id, i) != i:
                        shared.add(leaf.id)
    return shared


def analyze(model: torch.nn.Module, example_inputs=None, dynamic: bool = True) -> DependencyGraph:
    """Trace `model` with torch.export and return its dependency groups.

    Works on the meta device: build the model under `torch.device("meta")` to analyse the
    structure of a 70B model without its weights.
    """
    captured = capture(model, example_inputs, dynamic=dynamic)
    dg = label(captured.gm)
    shared = heads_shared_across_layers(dg)
    if shared:
        RecomputeSharedConstantsPass(dg.table, shared)(captured.gm)
        dg = label(captured.gm)
    dg.exported = captured.exported
    dg.model = model
    return dg
