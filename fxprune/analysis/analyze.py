"""`analyze`: capture a model and find its groups of coupled dimensions."""
from __future__ import annotations

import torch

from fxprune.analysis.capture import capture
from fxprune.analysis.fx_util import owner_and_leaf
from fxprune.analysis.groups import DependencyGraph
from fxprune.analysis.propagate_dimensions import PropagateDimensionsPass
from fxprune.analysis.recompute_shared_constants import RecomputeSharedConstantsPass


def label(gm, exported=None, model=None) -> DependencyGraph:
    """Run dimension propagation on an already captured `gm` and wrap its labels in a `DependencyGraph` (with the
    exported program and the source model, when given, for later rewrites)."""
    propagate = PropagateDimensionsPass()
    propagate(gm)
    return DependencyGraph(gm, propagate.labels, exported=exported, model=model)


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


def fill_constants(gm: torch.fx.GraphModule, values: dict) -> None:
    """Give tensor constants that the graph creates (Falcon's index tensors), captured without values
    on the meta device, the values in `values` (by attribute path, e.g. from a saved pruned model)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in values:
            module, leaf = owner_and_leaf(gm, node.target)
            current = getattr(module, leaf)
            if isinstance(current, torch.Tensor) and current.is_meta and leaf not in module._parameters \
                    and leaf not in module._buffers and current.shape == values[node.target].shape:
                setattr(module, leaf, values[node.target].to(current.dtype))


def analyze(model: torch.nn.Module, example_inputs=None, dynamic: bool = True, constants=None) -> DependencyGraph:
    """Trace `model` with torch.export and return its dependency groups.

    Works on the meta device: build the model under `torch.device("meta")` to analyse the
    structure of a 70B model without its weights. The values of constants the graph creates
    are then unknown (what they index freezes) unless `constants` supplies them.
    """
    return analyze_captured(capture(model, example_inputs, dynamic=dynamic), model, constants)


def analyze_captured(captured, model, constants=None) -> DependencyGraph:
    """Dependency groups of an already captured program of `model` (the plain or the KV-cache capture)."""
    fill_constants(captured.gm, constants or {})
    dg = label(captured.gm, captured.exported, model)
    shared = heads_shared_across_layers(dg)
    if shared:
        RecomputeSharedConstantsPass(dg.table, shared)(captured.gm)
        dg = label(captured.gm, captured.exported, model)
    return dg
