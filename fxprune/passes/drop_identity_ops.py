"""Rewrite pass: drop ops that return their input's values (casts to the same dtype, `x * 1`, `x + 0`) and compute
repeated pure ops once, so a step program dispatches fewer ops."""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

aten = torch.ops.aten
CASTS = (aten.to.dtype,)
IDENTITY_SCALARS = {aten.mul.Tensor: 1, aten.add.Tensor: 0, aten.sub.Tensor: 0, aten.div.Tensor: 1}


def value_dtype(node):
    """The dtype of `node`'s value as captured (pruning never changes a dtype), or None when unknown."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return getattr(val, "dtype", None)


def mutates(node) -> bool:
    """Whether `node` writes one of its inputs in place."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def identity_input(node) -> torch.fx.Node | None:
    """The input `node` returns unchanged (its values, dtype and shape), or None."""
    if node.op != "call_function" or any(mutates(u) for u in node.users):
        return None
    x = node.args[0] if node.args else None
    if not isinstance(x, torch.fx.Node) or value_dtype(x) is None or value_dtype(x) != value_dtype(node):
        return None
    if node.target in CASTS and len(node.args) == 2 and not node.kwargs:
        return x  # to(dtype) of a tensor already of that dtype returns the tensor itself
    if node.target in IDENTITY_SCALARS and len(node.args) == 2 and not node.kwargs \
            and type(node.args[1]) in (int, float) and node.args[1] == IDENTITY_SCALARS[node.target] \
            and (value_dtype(x).is_floating_point or type(node.args[1]) is int):
        return x
    return None


def written_or_derived(graph: torch.fx.Graph) -> set:
    """Nodes whose value a later in-place op may change: those written in place, and everything computed from them
    (a view of a cache sees its later writes)."""
    out = set()
    for node in graph.nodes:
        if mutates(node):
            out.update(a for a in node.all_input_nodes)
            out.add(node)
    for node in graph.nodes:  # topological order: inputs before users
        if any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


class DropIdentityOpsPass(PassBase):
    """Removes identity ops (`identity_input`) and merges pure ops that repeat an earlier one (same target, same
    arguments), leaving alone every value that an in-place op can change."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        """Replace each identity op by its input and each repeated pure op by its first instance."""
        graph, changed = gm.graph, False
        for node in list(graph.nodes):
            x = identity_input(node)
            if x is not None:
                node.replace_all_uses_with(x)
                graph.erase_node(node)
                changed = True
        unsafe, seen = written_or_derived(graph), {}
        for node in list(graph.nodes):
            if node.op != "call_function" or node in unsafe or node.is_impure() or not node.users:
                continue
            key = (node.target, repr(node.args), repr(sorted(node.kwargs.items())))
            if key in seen:
                node.replace_all_uses_with(seen[key])
                graph.erase_node(node)
                changed = True
            else:
                seen[key] = node
        if changed:
            graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, changed)
