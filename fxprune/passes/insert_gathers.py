"""Rewrite pass: gather the kept indices where a pruned dimension is born in a computed tensor.

Example: Bloom's ALiBi slopes come from `arange(1, n_heads + 1)`. Shrinking the arange would
give the first k heads' slopes; the kept heads need their own, so the full tensor is built
and `index_select` keeps the right rows. Constant fills (zeros, ones, full, expand) have
equal values everywhere and get their size literal rewritten instead.
"""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.analysis.fx_util import flat_dims, is_multi
from fxprune.analysis.contracts import require_dims
from fxprune.analysis.meta_keys import DIMS
from fxprune.analysis.meta_keys import PIECES
from fxprune.passes.rewrite_shape_literals import SIZE_LIST_AT
from fxprune.analysis.meta_keys import VALUES

aten = torch.ops.aten


class InsertGathersPass(PassBase):
    """Where a pruned dimension is born in a computed tensor (Bloom's ALiBi slopes from an `arange`), builds the
    full tensor and inserts an `index_select` of the kept positions (`kept`: atom id -> positions)."""
    def __init__(self, table, kept: dict):
        super().__init__()
        self.T, self.kept = table, kept

    def leaves(self, dims):
        return {l.id for a in dims for l in self.T.leaves(a) if l.id in self.kept}

    def requires(self, gm: torch.fx.GraphModule) -> None:
        require_dims(gm, type(self).__name__)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        changed = False
        count = 0
        for node in list(gm.graph.nodes):
            dims = node.meta.get(DIMS)
            if node.op != "call_function" or not dims or is_multi(dims):
                continue
            if getattr(node.target, "overloadpacket", None) in SIZE_LIST_AT:
                continue
            inherited = set()
            for arg in node.all_input_nodes:
                inherited |= self.leaves(flat_dims(arg.meta.get(DIMS)))
                label = arg.meta.get(VALUES)  # counted from values that are already pruned positions
                if isinstance(label, tuple):
                    inherited |= self.leaves([label[1]])
            if node.meta.get(PIECES) is not None:  # a cat of the kept pieces: the dim is whole again
                inherited |= self.leaves([node.meta[PIECES]])
            born = self.leaves(dims) - inherited
            if not born:
                continue
            users = list(node.users)
            out = node
            for d, atom in enumerate(dims):
                if not self.leaves([atom]) & born:
                    continue
                name = f"_fxprune_gather_{count}"
                count += 1
                gm.register_buffer(name, self.T.kept_index(atom, self.kept), persistent=False)
                with gm.graph.inserting_after(out):
                    index = gm.graph.get_attr(name)
                with gm.graph.inserting_after(index):
                    out = gm.graph.call_function(aten.index_select.default, (out, d, index))
                out.meta[DIMS] = dims  # same labels: later nodes must see the atom as inherited
            for u in users:
                u.replace_input_with(node, out)
            changed = True
        gm.recompile()
        return PassResult(gm, changed)
