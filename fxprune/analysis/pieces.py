"""Per-unit parameters of a dimension split into single positions and put back by a cat.

A ModuleList of per-head norms splits the heads dimension into single heads, normalises head i with
its own weights and concatenates the heads back (dimension_rules.split_rule / cat_rule). The ops
between piece i and the cat, and the parameters only they read, belong to position i of that
dimension. The dimension may be one unit space (heads) or built from several (grouped-query
attention: query head i is KV group i // per_group, head i % per_group of that group): position i
goes when any unit it is made of goes, and its piece, cat input and parameters go whole.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch


@dataclass
class Pieces:
    """A dimension split into single positions and put back in order: `atom` is the dimension and
    `names[i]` the parameters that only the ops of position i read (alike in number and shapes)."""
    atom: object
    names: list[list[str]]

    def kept_positions(self, table, kept: dict) -> list[int] | None:
        """The positions that survive `kept` (leaf id -> kept units), or None when all do."""
        index = table.kept_index(self.atom, kept)
        return None if index is None else index.tolist()

    def unit_of_positions(self, table, leaf) -> torch.Tensor:
        """For each position, the unit of `leaf` it belongs to."""
        return table.digit_map(self.atom, leaf)


def piece_chain(start: torch.fx.Node, end: torch.fx.Node) -> set:
    """The nodes on the paths from `start` to `end` (both included), or an empty set if none."""
    seen, stack, ancestors = set(), [end], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        ancestors.add(n)
        if n is not start:
            stack.extend(n.all_input_nodes)
    if start not in ancestors:
        return set()
    chain = {start}
    for n in start.graph.nodes:  # graph order is topological: a node is on a path if an input is
        if n in ancestors and any(a in chain for a in n.all_input_nodes):
            chain.add(n)
    return chain


def unit_parameters(labels, aliases: dict, parameters: dict) -> list[Pieces]:
    """The `Pieces` of every split put back by a cat.

    The dimension is frozen (it stays whole) where a piece is used outside its chain, where a parameter
    is read by more than one piece, or where the positions' parameters differ in number or shape.
    """
    T, out = labels.table, []
    for split, cat, atom in labels.pieces:
        why = _check_pieces(split, cat, T.leaves(atom))
        owned = [] if why else [_owned(split, cat, i, aliases) for i in range(len(cat.args[0]))]
        if not why and len({tuple(tuple(parameters[n].shape) for n in names) for names in owned}) != 1:
            why = "the pieces hold parameters of different shapes"
        if why:  # the leaves themselves: settle_frozen, which passes a freeze down to them, has run
            for leaf in T.leaves(atom):
                T.freeze(leaf, f"{cat.name} puts back the pieces of {split.name}, but {why}")
            continue
        out.append(Pieces(T.find(atom), [[n for n in names if n in parameters] for names in owned]))
    return out


def _check_pieces(split, cat, leaves) -> str:
    if not all(leaf.static for leaf in leaves):
        return "the dimension has a size known only at run time"
    getitems = {u.args[1]: u for u in split.users if u.target is operator.getitem}
    inside = set()
    for i, piece in enumerate(cat.args[0]):
        chain = piece_chain(getitems.get(i), piece) if i in getitems else set()
        if not chain or inside & chain:
            return f"piece {i} does not reach the cat on its own"
        inside |= chain
    leaking = [n.name for n in inside for u in n.users if u not in inside and u is not cat]
    return f"{leaking[0]} is used outside its piece" if leaking else ""


def _owned(split, cat, i, aliases) -> list[str]:
    """Names of the tensors read only by the ops of piece i."""
    getitem = next(u for u in split.users if u.target is operator.getitem and u.args[1] == i)
    chain = piece_chain(getitem, cat.args[0][i])
    reads = {a for n in chain for a in n.all_input_nodes if a.op == "get_attr"}
    return sorted({aliases.get(r.target, r.target) for r in reads if set(r.users) <= chain})
