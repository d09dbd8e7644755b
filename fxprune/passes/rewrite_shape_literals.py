"""Rewrite pass: change the integer size arguments that belong to pruned dimensions.

Which argument belongs to which dimension is op semantics (a view's size list names its
output dimensions, a split's sizes name the segments of its input dimension, a slice's
bounds are positions in its input dimension); the new value comes from the dimension
labels, never from the old number. A symbolic size (batch * heads) is scaled by the
ratio of its static part.
"""
from __future__ import annotations

import operator

import sympy
import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.analysis.contracts import ContractError, graphs_of, require_dims
from fxprune.analysis.meta_keys import DIMS

aten = torch.ops.aten
SIZE_LIST_AT = {  # op packet -> index of the argument holding one size per output dimension
    aten.view: 1, aten.reshape: 1, aten._unsafe_view: 1, aten.expand: 1, aten.broadcast_to: 1,
    aten.new_zeros: 1, aten.new_ones: 1, aten.new_empty: 1, aten.new_full: 1,
    aten.zeros: 0, aten.ones: 0, aten.empty: 0, aten.full: 0, aten.rand: 0, aten.randn: 0,
}


class RewriteShapeLiteralsPass(PassBase):
    """Rewrites int size arguments (view sizes, split sizes, slice bounds, ...) that belong to a pruned dimension to
    that dimension's kept size, from the labels (`counts`: kept units per atom)."""
    def __init__(self, table, counts: dict[int, int], kept: dict):
        super().__init__()
        self.T, self.counts, self.kept = table, counts, kept

    def new_size(self, atom):
        return self.T.kept_size(atom, self.counts)

    def changed(self, atom) -> bool:
        return any(l.id in self.counts for l in self.T.leaves(atom))

    def requires(self, gm: torch.fx.GraphModule) -> None:
        require_dims(gm, type(self).__name__)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        """The promise: every integer size that names a pruned dimension is that dimension's kept size."""
        for sub in graphs_of(gm):
            for node in sub.graph.nodes:
                i = SIZE_LIST_AT.get(getattr(node.target, "overloadpacket", None))
                dims = node.meta.get(DIMS)
                if node.op != "call_function" or i is None or not dims:
                    continue
                for value, atom in zip(node.args[i], dims):
                    if isinstance(value, int) and value != -1 and self.changed(atom) and value != self.new_size(atom):
                        raise ContractError(f"{node.name}: size {value} of a pruned dimension, expected "
                                            f"{self.new_size(atom)} after the rewrite")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        changed = False
        for g in graphs_of(gm):
            for node in list(g.graph.nodes):
                if node.op == "call_function" and node.meta.get(DIMS) is not None:
                    changed |= self.rewrite(g.graph, node)
            g.recompile()
        return PassResult(gm, changed)

    def rewrite(self, graph, node) -> bool:
        packet = getattr(node.target, "overloadpacket", None)
        dims = node.meta[DIMS]
        if packet in SIZE_LIST_AT:
            i = SIZE_LIST_AT[packet]
            return self.set_arg(node, i, self.sizes(graph, node, node.args[i], dims))
        if packet is aten.unflatten:
            d = node.args[1] % len(node.args[0].meta[DIMS])  # the dim is counted in the input
            sizes = self.sizes(graph, node, node.args[2], dims[d:d + len(node.args[2])])
            return self.set_arg(node, 2, sizes)
        if packet in (aten.layer_norm, aten.rms_norm, aten.native_layer_norm, aten._fused_rms_norm):
            x_dims = node.args[0].meta[DIMS]
            n = len(node.args[1])
            return self.set_arg(node, 1, self.sizes(graph, node, node.args[1], x_dims[-n:]))
        if packet is aten.split_with_sizes:
            d = (node.args[2] if len(node.args) > 2 else 0) % len(dims[0])
            return self.set_arg(node, 1, [int(self.new_size(out[d])) for out in dims])
        if packet in (aten.split, aten.chunk):
            d = (node.args[2] if len(node.args) > 2 else 0) % len(dims[0])
            sizes = [int(self.new_size(out[d])) for out in dims]
            if not any(self.changed(out[d]) for out in dims):
                return False
            if packet is aten.chunk and len(set(sizes)) == 1:
                return False
            node.target = aten.split_with_sizes.default
            node.args = (node.args[0], sizes, d)
            return True
        if packet is aten.slice:
            return self.rewrite_slice(node)
        if packet is aten.repeat:
            x_dims = node.args[0].meta[DIMS]
            lead = len(dims) - len(x_dims)
            reps = [self.new_size(o) / (self.new_size(x_dims[j - lead]) if j >= lead else 1) for j, o in enumerate(dims)]
            new = [r if not self.changed(o) else int(sympy.simplify(v)) for r, v, o in zip(node.args[1], reps, dims)]
            return self.set_arg(node, 1, new)
        if packet is aten.histc and self.changed(dims[0]):  # bins over positions 0..n-1 of a pruned dim
            n = int(self.new_size(dims[0]))
            args = list(node.args) + [None] * (4 - len(node.args))
            args[1:4] = [n, 0, n - 1]
            node.args, node.kwargs = tuple(args), {k: v for k, v in node.kwargs.items() if k not in ("bins", "min", "max")}
            return True
        if packet is aten.repeat_interleave:
            d = node.args[2] % len(dims)
            new = int(sympy.simplify(self.new_size(dims[d]) / self.new_size(node.args[0].meta[DIMS][d])))
            return self.set_arg(node, 1, new)
        return False

    def sizes(self, graph, node, old, dims):
        new = list(old)
        for j, (value, atom) in enumerate(zip(old, dims)):
            if not self.changed(atom) or (isinstance(value, int) and value == -1):
                continue
            if isinstance(value, int):
                new[j] = int(self.new_size(atom))
            else:  # a SymInt computed in the graph: scale it by the static ratio
                ratio = sympy.nsimplify(sympy.simplify(self.new_size(atom) / self.T.find(atom).size))
                if not ratio.is_Rational:
                    raise ValueError(f"{node.name}: cannot rescale symbolic size {value} by {ratio}")
                with graph.inserting_before(node):
                    scaled = graph.call_function(operator.mul, (value, int(ratio.p)))
                    new[j] = graph.call_function(operator.floordiv, (scaled, int(ratio.q)))
        return new

    @staticmethod
    def set_arg(node, i, value) -> bool:
        old = node.args[i]
        if (list(old) if isinstance(old, (list, tuple)) else old) == value:
            return False
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
        return True

    def rewrite_slice(self, node) -> bool:
        x = node.args[0]
        x_dims = x.meta[DIMS]
        d = (node.args[1] if len(node.args) > 1 else 0) % len(x_dims)
        atom = x_dims[d]
        if not self.changed(atom):
            return False
        size = int(self.T.find(atom).size)
        kept = self.T.kept_index(atom, self.kept)
        args = list(node.args) + [None] * (5 - len(node.args))
        for i in (2, 3):
            v = args[i]
            if v is None or not isinstance(v, int):
                continue
            v = v + size if v < 0 else v
            args[i] = int((kept < min(v, size)).sum()) if v < size else v
        node.args = tuple(args[: max(len(node.args), 4)])
        return True
