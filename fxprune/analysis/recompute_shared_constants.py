"""Graph pass: give each consumer its own copy of a shared, parameter-free tensor.

Bloom computes the ALiBi bias once and every layer reads it, so dimension analysis would tie
the heads of all layers together. The bias depends on no parameter, so recomputing it per
layer costs a few small ops and lets each layer keep its own heads (the kept heads' slopes
are then gathered per layer). Only nodes whose dimensions carry one of `atom_ids` are copied.
"""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.analysis.fx_util import get_attr_path, is_multi
from fxprune.analysis.contracts import require_dims
from fxprune.analysis.meta_keys import DIMS


def parameter_dependent(gm: torch.fx.GraphModule) -> set:
    """The nodes of `gm` whose value depends on a parameter."""
    params = {id(p) for p in gm.parameters()}
    dependent = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if id(get_attr_path(gm, node.target)) in params:
                dependent.add(node)
        elif any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


class RecomputeSharedConstantsPass(PassBase):
    """Gives each consumer its own copy of a shared, parameter-free computed tensor (Bloom's ALiBi bias) whose
    dimensions carry one of `atom_ids`, so each layer keeps its own heads."""
    def __init__(self, table, atom_ids: set[int]):
        super().__init__()
        self.T, self.atom_ids = table, atom_ids

    def carries(self, node) -> bool:
        dims = node.meta.get(DIMS)
        if not dims or is_multi(dims):
            return False
        return any(l.id in self.atom_ids for a in dims for l in self.T.leaves(a))

    def requires(self, gm: torch.fx.GraphModule) -> None:
        require_dims(gm, type(self).__name__)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        dependent = parameter_dependent(gm)
        changed = False
        for node in list(gm.graph.nodes):
            if node in dependent or node.op != "call_function" or not self.carries(node):
                continue
            consumers = [u for u in node.users if u in dependent]
            for user in consumers[1:]:
                memo = {}
                with gm.graph.inserting_before(user):
                    copy = self.copy_chain(gm.graph, node, memo, dependent)
                user.replace_input_with(node, copy)
                changed = True
        gm.recompile()
        return PassResult(gm, changed)

    def copy_chain(self, graph, node, memo, dependent):
        if node in memo:
            return memo[node]
        if node.op != "call_function" or node in dependent or not self.carries(node):
            return node
        new = graph.node_copy(node, lambda a: self.copy_chain(graph, a, memo, dependent))
        memo[node] = new
        return new
