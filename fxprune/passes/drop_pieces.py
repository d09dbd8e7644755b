"""Rewrite pass: drop the pieces of removed units where a dim was split into single units and put back.

After SliceParametersPass the split sees only the kept units, so its pieces are renumbered: piece
`kept[j]` is now output j. The cat takes the kept pieces' chains in order; the chains of removed
units become dead code and go, and so do the parameters only they read (fxprune.analysis.pieces).
"""
from __future__ import annotations

import operator

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.analysis.fx_util import owner_and_leaf
from fxprune.analysis.contracts import ContractError
from fxprune.analysis.meta_keys import PIECES


class DropPiecesPass(PassBase):
    """Removes a pruned unit's piece of a `split` into single positions: its ops up to the `cat`, its `cat` input
    and the parameters only it reads (`unit_parameters`), for the units not in `kept`."""
    def __init__(self, table, kept: dict, unit_parameters: dict):
        super().__init__()
        self.T, self.kept, self.unit_parameters = table, kept, unit_parameters

    def kept_units(self, node):
        """The kept units of the leaf a split or cat node's pieces are, or None if it keeps all."""
        atom = node.meta.get(PIECES)
        if atom is None:
            return None
        leaves = [l.id for l in self.T.leaves(atom) if l.id in self.kept]
        return self.kept[leaves[0]].tolist() if leaves else None

    def removed_parameters(self) -> list[str]:
        return [n for leaf, units in self.unit_parameters.items() if leaf in self.kept
                for i, names in enumerate(units) if i not in set(self.kept[leaf].tolist()) for n in names]

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        changed = False
        for node in list(gm.graph.nodes):
            kept = self.kept_units(node)
            if kept is None:
                continue
            if node.op == "call_function" and node.target is not operator.getitem and node.users and all(
                    u.target is operator.getitem for u in node.users):  # the split: renumber its outputs
                for u in list(node.users):
                    if u.args[1] in kept:
                        u.args = (node, kept.index(u.args[1]))
            else:  # the cat: only the kept pieces, in order
                pieces = node.args[0]
                node.args = ([pieces[i] for i in kept],) + tuple(node.args[1:])
            changed = True
        if changed:
            gm.graph.eliminate_dead_code()
            for name in self.removed_parameters():
                delattr(*owner_and_leaf(gm, name))
            gm.recompile()
        return PassResult(gm, changed)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        """No read of a removed unit's parameter is left."""
        gone = set(self.removed_parameters())
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target in gone:
                raise ContractError(f"{node.name} still reads {node.target}, a parameter of a removed unit")
