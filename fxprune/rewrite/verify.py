"""Check a pruned graph before it is handed out: shapes on fake tensors, then one small real forward.

The pass contracts check each pass's own promise; only running the rewritten graph shows that the
dimensions the analysis coupled really fit together. A failure raises `GraphVerificationError`
naming the op, the node and the pruned groups whose units that node's dimensions carry (why raise
rather than freeze those groups: docs/design.md, "Verifying the pruned graph").
"""
from __future__ import annotations

import torch

from fxprune.analysis.capture import example_inputs_for
from fxprune.analysis.fx_util import flat_dims
from fxprune.analysis.contracts import DIMS, ContractError
from fxprune.analysis.dimension_rules import PIECES
from fxprune.passes.propagate_shapes import NamesFailingNode, NodeFailure, PropagateShapesPass

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 5  # the real forward's batch: small, and unlike the capture's example


class GraphVerificationError(ContractError):
    """The pruned graph fails when run: at `node` (its name), op `op`, whose dimensions carry the units of
    the pruned `groups` (group ids)."""

    def __init__(self, message: str, node: str, op: str, groups: tuple):
        super().__init__(message)
        self.node, self.op, self.groups = node, op, groups


def pruned_groups_at(dg, plan, node: torch.fx.Node) -> list:
    """The groups `plan` prunes whose units the dimensions of `node` or of its inputs carry."""
    pruned = {dg.groups[gid].atom_id: dg.groups[gid] for gid, kept in plan.units.items()
              if len(kept) < dg.groups[gid].n_units}
    atoms = [a for n in [node, *node.all_input_nodes]  # a split into single heads: its pieces are those heads
             for a in flat_dims(n.meta.get(DIMS)) + [n.meta.get(PIECES)] if a is not None]
    leaves = {leaf.id for atom in atoms for leaf in dg.table.leaves(atom)}
    return [group for atom_id, group in pruned.items() if atom_id in leaves]


def op_of(node: torch.fx.Node) -> str:
    """The op a node runs: an ATen overload or function, or the class of the module it calls."""
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", None) if node.op == "call_function" and not isinstance(
        node.target, torch._ops.OpOverload) else str(node.target)


def failure(dg, plan, where: str, exc: NodeFailure) -> GraphVerificationError:
    node, op = exc.node, op_of(exc.node)
    groups = pruned_groups_at(dg, plan, node)
    carried = ", ".join(f"g{g.id} ({g.kind}, layer {g.layer})" for g in groups) or "no pruned group"
    return GraphVerificationError(
        f"the pruned graph fails {where} at node {node.name} (op {op}): {type(exc.cause).__name__}: "
        f"{str(exc.cause).rstrip('.')}. Its dimensions carry the units of {carried}: the analysis coupled them "
        "in a way this op does not accept (a missing or wrong op rule; please report it). Until then, leave "
        "those groups whole (other `targets`, or `scores=` that keep their units).", node.name, op,
        tuple(g.id for g in groups))


def check_shapes(gm: torch.fx.GraphModule, dg, plan) -> None:
    """Fake-tensor shape propagation over the captured symbolic sizes; refreshes every `meta["val"]`.
    Where a fake kernel rejects symbolic sizes, the capture's example sizes decide: pruning changes static
    sizes only, so a pruned graph whose shapes do not fit fails there too."""
    try:
        PropagateShapesPass()(gm)
    except NodeFailure:
        try:
            PropagateShapesPass(symbolic=False)(gm)
        except NodeFailure as exc:
            raise failure(dg, plan, "shape propagation", exc) from exc.cause


def check_forward(gm: torch.fx.GraphModule, dg, plan) -> None:
    """One real forward on a tiny batch (skipped for a model whose tensors are on the meta device)."""
    tensors = list(gm.parameters()) + list(gm.buffers())
    if dg.model is None or any(t.is_meta for t in tensors):
        return
    device = tensors[0].device if tensors else torch.device("cpu")
    ids, mask = (t.to(device) for t in example_inputs_for(dg.model, EXAMPLE_BATCH, EXAMPLE_SEQ))
    with torch.no_grad():
        try:
            gm(ids, attention_mask=mask)
        except Exception:  # run it again node by node to say where
            try:
                NamesFailingNode(gm).run(ids, mask)
            except NodeFailure as exc:
                raise failure(dg, plan, f"on a [{EXAMPLE_BATCH}, {EXAMPLE_SEQ}] batch", exc) from exc.cause
            raise


def verify(gm: torch.fx.GraphModule, dg, plan) -> None:
    """Shapes on fake tensors, then a real forward: `GraphVerificationError` where the pruned graph fails."""
    check_shapes(gm, dg, plan)
    check_forward(gm, dg, plan)
