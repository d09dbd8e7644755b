"""Rules for integer tensors whose *values* are positions in a dimension (a router's expert ids).

Dimension rules relate the index spaces of tensor dimensions. A few tensors carry an index space
in their values instead: `topk(x, k, dim)` returns positions in `dim`; a histogram of those
positions counts per position of `dim`; its cumulative sum ends each group of rows that a
grouped matmul sends to one slice of a weight. Pruning `dim` renumbers the kept positions
0..n'-1 in order, so these values stay right exactly when every reader reads them as positions
of that same (pruned) dimension. A value label is (kind, atom), kept in `node.meta[VALUES]`:

  INDEX    the values are positions in `atom` (topk/kthvalue/sort/argsort indices)
  COUNTS   position i holds how many INDEX values equal i (histc over exactly the atom's range)
  OFFSETS  the running sum of COUNTS: where each position's rows end (grouped_mm `offs`)

Ops that only move or copy values (view, to, clone, gather by other indices) pass a label on;
ops that read only shapes ignore it; the value-aware dimension rules (index, histc, grouped_mm)
claim the labels they understand with `Labels.value_label`. Any other reader freezes the atom:
a value we cannot follow must not change meaning.
"""
from __future__ import annotations

import operator

import torch

from fxprune.analysis.fx_util import schema_arg
from fxprune.analysis.meta_keys import VALUES

aten = torch.ops.aten
INDEX, COUNTS, OFFSETS = "index", "counts", "offsets"

PASS_THROUGH = {  # output values are some of the input's values, unchanged
    aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.unsqueeze,
    aten.squeeze, aten.clone, aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy,
    aten.expand, aten.permute, aten.transpose, aten.t, aten.slice, aten.select, aten.index,
}
SHAPE_ONLY = {aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like, aten.new_empty,
              aten.new_zeros, aten.new_ones, aten.new_full, aten.sym_size, aten.sym_numel,
              aten._assert_tensor_metadata}
SELECTIONS = {aten.topk, aten.kthvalue, aten.sort, aten.argsort}


def label_of(node):
    """The value label (kind, atom) of an fx node (router indices, counts, offsets), or None."""
    return node.meta.get(VALUES) if isinstance(node, torch.fx.Node) else None


def selection_labels(node, dims):
    """topk/kthvalue/sort return (values, indices): values keep the input's label, indices are
    positions along the selected dim; argsort returns the indices alone."""
    x = node.args[0]
    index = (INDEX, dims[schema_arg(node, "dim", -1) % len(dims)])
    if node.target.overloadpacket is aten.argsort:
        return index
    return [label_of(x), index]


def cumsum_label(node):
    """The running sum of per-position counts along their only dim: the offsets of each position."""
    label = label_of(node.args[0])
    if label and label[0] == COUNTS and node.args[0].meta["val"].dim() == 1:
        return (OFFSETS, label[1])
    return None


def track_values(node, L, dims) -> None:
    """Set this node's value label and freeze what its unhandled reads of labelled values touch."""
    packet = getattr(node.target, "overloadpacket", None)
    if node.target is operator.getitem:
        label = label_of(node.args[0])
        node.meta[VALUES] = label[node.args[1]] if isinstance(label, list) else None
        return
    if packet in SELECTIONS and dims is not None:
        node.meta[VALUES] = selection_labels(node, L.dims(node.args[0]))
    elif packet is aten.cumsum:
        node.meta[VALUES] = cumsum_label(node)
    elif packet in PASS_THROUGH and label_of(node.args[0]) is not None:
        node.meta[VALUES] = label_of(node.args[0])
    passes_on = (PASS_THROUGH | SELECTIONS | {aten.cumsum}) if node.meta.get(VALUES) is not None else set()
    for arg in node.all_input_nodes:
        label = label_of(arg)
        if not label or isinstance(label, list) or packet in SHAPE_ONLY or (node.name, arg.name) in L.read:
            continue
        if packet in passes_on and arg is node.args[0]:
            continue
        L.table.freeze(label[1], f"{node.name} ({packet or node.target}) reads values of {arg.name}, "
                                 f"which are positions in a dimension")
