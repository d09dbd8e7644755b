"""Rewrite pass: attention over the KV heads themselves, not over copies repeated per query head."""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def repeated_heads(node) -> torch.fx.Node | None:
    """The [B, KV heads, L, D] tensor that `node` repeats per query head (`reshape(expand(unsqueeze(x, 2),
    [B, H, n, L, D]), [B, H * n, L, D])`, transformers' repeat_kv), or None when `node` is not such a repeat."""
    if not (isinstance(node, torch.fx.Node) and node.target in (aten.reshape.default, aten.view.default)):
        return None
    expand = node.args[0]
    if not (isinstance(expand, torch.fx.Node) and expand.target is aten.expand.default and len(expand.users) == 1):
        return None
    unsqueeze = expand.args[0]
    if not (isinstance(unsqueeze, torch.fx.Node) and unsqueeze.target is aten.unsqueeze.default
            and unsqueeze.args[1] == 2 and len(unsqueeze.users) == 1):
        return None
    sizes, shape = list(expand.args[1]), list(node.args[1])
    if len(sizes) != 5 or len(shape) != 4 or not all(isinstance(s, int) for s in sizes[1:3]):
        return None
    if shape[0] != sizes[0] or shape[1] != sizes[1] * sizes[2] or shape[2] is not sizes[3] and shape[2] != sizes[3] \
            or shape[3] != sizes[4]:
        return None
    return unsqueeze.args[0]


class GroupedAttentionPass(PassBase):
    """`scaled_dot_product_attention(q, repeat(k), repeat(v), ...)` becomes `scaled_dot_product_attention(q, k, v,
    ..., enable_gqa=True)`: the same values, without copying the attended keys and values once per query head
    at every step (a KV-cache program's window, every layer)."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        """Point each such attention at the unrepeated keys and values; the repeats become dead code."""
        changed = False
        for node in gm.graph.nodes:
            if node.target is not SDPA or node.kwargs.get("enable_gqa") or len(node.args) < 3:
                continue
            k, v = repeated_heads(node.args[1]), repeated_heads(node.args[2])
            if k is None or v is None:
                continue
            node.args = (node.args[0], k, v, *node.args[3:])
            node.kwargs = {**node.kwargs, "enable_gqa": True}
            changed = True
        if changed:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, changed)
