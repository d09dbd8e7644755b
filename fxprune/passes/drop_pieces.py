"""Rewrite pass: drop the pieces of removed positions where a dim was split into single positions and put back.

After SliceParametersPass the split sees only the kept positions (those whose units all survive), so
its pieces are renumbered: piece `kept[j]` is now output j. The cat takes the kept pieces' chains in
order; the chains of removed positions become dead code and go, and so do the parameters only they
read (fxprune.analysis.pieces).
"""
from __future__ import annotations

import operator

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.analysis.fx_util import owner_and_leaf
from fxprune.analysis.contracts import ContractError
from fxprune.analysis.meta_keys import PIECES


class DropPiecesPass(PassBase):
    """Removes a pruned position's piece of a `split` into single positions: its ops up to the `cat`, its `cat`
    input and the parameters only it reads (`unit_parameters`), for the positions whose units are not all kept."""
    def __init__(self, table, kept: dict, unit_parameters: list):
        super().__init__()
        self.T, self.kept, self.unit_parameters = table, kept, unit_parameters

    def kept_positions(self, node):
        """The kept positions of the dim a split or cat node's pieces are, or None if it keeps all."""
        atom = node.meta.get(PIECES)
        index = None if atom is None else self.T.kept_index(atom, self.kept)
        return None if index is None else index.tolist()

    def removed_parameters(self) -> list[str]:
        out = []
        for pieces in self.unit_parameters:
            kept = pieces.kept_positions(self.T, self.kept)
            if kept is not None:
                out += [n for i, names in enumerate(pieces.names) if i not in set(kept) for n in names]
        return out

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        changed = False
        for node in list(gm.graph.nodes):
            kept = self.kept_positions(node)
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
