"""Emit the pruned GraphModule for a choice of kept units on an analysed graph."""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_manager import PassManager

from fxprune.analysis.groups import DependencyGraph
from fxprune.passes.drop_pieces import DropPiecesPass
from fxprune.analysis.contracts import check_graph
from fxprune.passes.insert_gathers import InsertGathersPass
from fxprune.passes.lift_linear_modules import LiftLinearModulesPass
from fxprune.analysis.meta_keys import READ_AS
from fxprune.passes.normalize_signature import NormalizeSignaturePass
from fxprune.passes.rewrite_shape_literals import RewriteShapeLiteralsPass
from fxprune.passes.slice_parameters import SliceParametersPass


def kept_positions(dg: DependencyGraph, kept: dict[int, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    """For every parameter and buffer, the surviving positions of each pruned dimension."""
    out = {}
    for name in list(dg.parameters) + list(dg.buffers):
        for d, atom in enumerate(dg.dims_of(name) or []):
            index = dg.table.kept_index(atom, kept)
            if index is not None:
                out.setdefault(name, {})[d] = index
    return out


def unique_tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, a tied tensor once. Non-persistent buffers are saved too: a model
    rebuilt on the meta device has no values for them (rotary inv_freq); gather indices are
    rebuilt by the plan."""
    seen, out = set(), {}
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if id(t) in seen or name.rsplit(".", 1)[-1].startswith("_fxprune_gather"):
            continue
        seen.add(id(t))
        out[name] = t
    return out


def copy_graph_module(dg: DependencyGraph) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of the analysed graph; node meta (and labels) are shared.

    Its tensors still alias the model's until SliceParametersPass replaces every one of them;
    reads of a tied weight's other names are pointed at the canonical name first.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(dg.gm.graph, {}))
    for node in graph.nodes:
        if node.op == "get_attr":
            node.meta[READ_AS] = node.target  # the name this read had (lm_head.weight for a tied head)
            node.target = dg.aliases.get(node.target, node.target)
    gm = torch.fx.GraphModule(dg.gm, graph)
    for node in graph.nodes:
        if node.op == "get_attr" and isinstance(getattr(gm, node.target, None), torch.fx.GraphModule):
            body = getattr(gm, node.target)  # higher-order op body: copied, since its literals get rewritten
            sub = torch.fx.Graph()
            sub.output(sub.graph_copy(body.graph, {}))
            setattr(gm, node.target, torch.fx.GraphModule(body, sub))
    return gm


def rewrite(dg: DependencyGraph, kept: dict[int, torch.Tensor], finish=None) -> torch.fx.GraphModule:
    """`kept` maps a group's atom id to the sorted unit indices that survive. `finish` (a pass, or a list of
    passes) replaces the last pass (the causal-LM signature), for programs with another signature (the
    KV-cache capture)."""
    kept = {a: torch.as_tensor(k, dtype=torch.long).sort().values for a, k in kept.items()}
    counts = {a: len(k) for a, k in kept.items()}
    gm = copy_graph_module(dg)
    passes = [
        SliceParametersPass(dg.gm, dg.parameters, dg.buffers, dg.aliases, kept_positions(dg, kept)),
        RewriteShapeLiteralsPass(dg.table, counts, kept),
        DropPiecesPass(dg.table, kept, dg.unit_parameters),
        InsertGathersPass(dg.table, kept),
        LiftLinearModulesPass(),
        *(finish if isinstance(finish, (list, tuple)) else [finish or NormalizeSignaturePass()]),
    ]
    return run_passes(gm, passes)


def _code_made_at_the_end() -> None:
    """Stands in for `GraphModule.recompile` while passes run (see `run_passes`)."""


def run_passes(gm: torch.fx.GraphModule, passes) -> torch.fx.GraphModule:
    """`passes` in order under a PassManager that checks the graph before and after every one. The module's Python
    code is generated once, after the last pass: no pass or check calls that code (the refit interprets the
    graph), and each recompile of a decoder's graph (after every pass, by the pass and by the PassManager) costs
    about as much as a pass."""
    manager = PassManager(passes=list(passes), run_checks_after_each_pass=True)
    manager.add_checks(check_graph)  # lint and resolvable attributes, before and after every pass
    gm.recompile = _code_made_at_the_end  # an instance attribute: shadows the method for this module only
    try:
        out = manager(gm).graph_module
    finally:
        del gm.recompile
    out.recompile()
    return out
