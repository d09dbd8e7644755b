"""Analysis pass: label every tensor dimension with an atom and unite coupled dimensions.

Writes only `node.meta[DIMS]` and, for tensors whose values are positions, `node.meta[VALUES]`
(see value_rules). Parameters and buffers share atoms per tensor object, so a
tied weight read at two places is one set of atoms. Graph inputs and outputs are frozen
(their shapes are the model's contract). Sub-graphs of higher-order ops such as
`wrap_with_set_grad_enabled` are followed with their placeholders bound to the call's
arguments. An op without a rule, or one whose rule cannot reconcile the shapes, freezes
every dimension it touches and is listed in `frozen_ops`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.analysis.atoms import AtomTable
from fxprune.analysis.fx_util import get_attr_path, is_multi
from fxprune.analysis.contracts import ContractError, graphs_of
from fxprune.analysis.meta_keys import DIMS
from fxprune.analysis.dimension_rules import find_rule
from fxprune.analysis.value_rules import track_values
from fxprune.analysis.meta_keys import VALUES

NO_TENSOR_OPS = {"_assert_tensor_metadata", "sym_size", "_set_grad_enabled", "sym_numel", "sym_stride"}


@dataclass
class Labels:
    """What dimension propagation learns: the `AtomTable` and the structures groups are built from (attentions,
    matmuls, embeddings, renormalising ops, pieces of splits, experts, frozen ops)."""
    table: AtomTable = field(default_factory=AtomTable)
    attention: list = field(default_factory=list)   # (node, query dims, key dims)
    matmuls: list = field(default_factory=list)
    embeddings: list = field(default_factory=list)  # atom of each embedding table's feature dim
    frozen_ops: list = field(default_factory=list)  # (node name, op, reason)
    tensor_atoms: dict = field(default_factory=dict)
    experts: list = field(default_factory=list)     # dims whose positions a router's top-k picks (experts)
    read: set = field(default_factory=set)          # (reader, tensor) pairs whose value label a rule claimed
    renormalising: list = field(default_factory=list)  # (atom, node name): dims an op reduces or normalises over
    # Splits of a dim into single positions (one head each), until a cat puts them back in order:
    # split node -> (the dim's atom, the atom of each piece's size-1 dim). See dimension_rules.split_rule.
    pending_pieces: dict = field(default_factory=dict)
    pieces: list = field(default_factory=list)  # (split node, cat node, atom): pieces put back together

    def renormalises(self, node, dims) -> None:
        """`node` computes statistics over `dims` (a norm, a mean, a sum): the pruned model's statistics
        over those dims are taken over the kept positions only, so it is not the zero-masked original."""
        self.renormalising += [(atom, node.name) for atom in dims]

    def dims(self, node):
        """The labels (atoms) of `node`'s output."""
        return node.meta[DIMS]

    def fresh(self, node):
        """New labels for each dimension of `node`'s output."""
        return [self.table.new(s, node.name) for s in node.meta["val"].shape]

    def value_label(self, node, reader, kind):
        """The atom whose positions `node`'s values are, if they are of `kind`; claims the read."""
        label = node.meta.get(VALUES) if isinstance(node, torch.fx.Node) else None
        if isinstance(label, tuple) and label[0] == kind:
            self.read.add((reader.name, node.name))
            return label[1]
        return None

    def unify(self, a, b):
        """Unite two labels (see `AtomTable.unify`)."""
        return self.table.unify(a, b)

    def freeze_all(self, dims, why):
        """Freeze every label in `dims` (nested lists too), recording `why`."""
        if dims is None:
            return
        if is_multi(dims):
            for d in dims:
                self.freeze_all(d, why)
            return
        for atom in dims:
            self.table.freeze(atom, why)


def settle_pieces(L: Labels) -> None:
    """A split into single positions that no cat put back is a concatenation of size-1 segments: the
    positions become unprunable, as for any other split into pieces."""
    for node, (atom, parts) in L.pending_pieces.items():
        try:
            for part, piece in zip(L.table.split_sum(atom, [1] * len(parts)), parts):
                L.unify(part, piece)
        except Exception as exc:  # an irreconcilable structure: freeze, never guess
            L.table.freeze(atom, f"{node.name} splits into pieces: {exc}")
    L.pending_pieces.clear()


def fresh_like(L: Labels, val, origin: str):
    """Fresh labels for a value: a tensor's dimensions, or a list for each tensor in a tuple (None for non-tensors)."""
    if isinstance(val, torch.Tensor):
        return [L.table.new(s, origin) for s in val.shape]
    if isinstance(val, (list, tuple)):
        return [fresh_like(L, v, origin) for v in val]
    return None


def op_name(target) -> str:
    """A readable name of an fx call target, for messages."""
    return getattr(target, "__name__", None) or str(target)


class PropagateDimensionsPass(PassBase):
    """Label dimensions of `gm` (and its higher-order sub-graphs); result in `self.labels`."""

    def __init__(self, labels: Labels | None = None):
        super().__init__()
        self.labels = labels or Labels()

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self.propagate(gm, gm.graph, top=True)
        settle_pieces(self.labels)
        self.labels.table.settle_frozen()
        return PassResult(gm, False)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        """Every node that holds a value (all but the outputs), in every sub-graph, has its labels."""
        for sub in graphs_of(gm):
            for node in sub.graph.nodes:
                if node.op != "output" and DIMS not in node.meta:
                    raise ContractError(f"PropagateDimensionsPass left node {node.name} ({node.op}) without labels")

    def propagate(self, gm, graph, top: bool, bound=None):
        L = self.labels
        placeholders = iter(bound or [])
        for node in graph.nodes:
            if node.op == "placeholder":
                dims = next(placeholders, None) if bound is not None else fresh_like(L, node.meta.get("val"), node.name)
                if top:
                    L.freeze_all(dims, f"graph input {node.name}")
                node.meta[DIMS] = dims
            elif node.op == "get_attr":
                node.meta[DIMS] = self.attr_dims(gm, node)
            elif node.op == "output":
                out = node.args[0]
                flat = out if isinstance(out, (list, tuple)) else [out]
                dims = [x.meta.get(DIMS) if isinstance(x, torch.fx.Node) else None for x in flat]
                if top:
                    for d in dims:
                        L.freeze_all(d, "graph output")
                return dims
            elif node.op == "call_function":
                node.meta[VALUES] = None
                node.meta[DIMS] = self.call_function(gm, node)
                track_values(node, L, node.meta[DIMS])
            else:
                node.meta[DIMS] = self.unknown(node, f"{node.op} is not analysed")
        return None

    def attr_dims(self, gm, node):
        value = get_attr_path(gm, node.target)
        if not isinstance(value, torch.Tensor):
            return None
        key = id(value)
        if key not in self.labels.tensor_atoms:
            self.labels.tensor_atoms[key] = [self.labels.table.new(s, node.target) for s in value.shape]
        return self.labels.tensor_atoms[key]

    def call_function(self, gm, node):
        name = op_name(node.target)
        if any(name.startswith(k) or name == f"aten.{k}" for k in NO_TENSOR_OPS) or not self.has_tensors(node):
            return None
        if node.target is torch.ops.higher_order.wrap_with_set_grad_enabled:
            return self.higher_order(gm, node, node.args[1], node.args[2:])
        fn = find_rule(node.target)
        if fn is None:
            return self.unknown(node, "no rule for this op")
        try:
            return fn(node, self.labels)
        except Exception as exc:  # a rule that cannot reconcile shapes: freeze, never guess
            return self.unknown(node, f"{type(exc).__name__}: {exc}")

    def higher_order(self, gm, node, submod_node, args):
        sub = getattr(gm, submod_node.target)
        bound = [a.meta.get(DIMS) if isinstance(a, torch.fx.Node) else None for a in args]
        return self.propagate(sub, sub.graph, top=False, bound=bound)

    @staticmethod
    def has_tensors(node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) or (isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val)):
            return True
        return any(isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor) for a in node.all_input_nodes)

    def unknown(self, node, reason):
        L = self.labels
        why = f"{node.name} ({op_name(node.target)}): {reason}"
        L.frozen_ops.append((node.name, op_name(node.target), reason))
        for arg in node.all_input_nodes:
            L.freeze_all(arg.meta.get(DIMS), why)
        dims = fresh_like(L, node.meta.get("val"), node.name)
        L.freeze_all(dims, why)
        return dims
