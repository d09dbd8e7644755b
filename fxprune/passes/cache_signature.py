"""Rewrite pass: the call signature of a KV-cache program (the last pass of `fxprune.serving`'s programs)."""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.passes.normalize_signature import follow_input_device


class CacheSignaturePass(PassBase):
    """Last rewrite pass of a KV-cache program: positional `gm(input_ids, cache_mask, position_ids,
    start)` returning logits, devices following `input_ids` (see NormalizeSignaturePass)."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        """Make the program's devices follow `input_ids` (sub-graphs too) and return the logits alone, positionally."""
        first = next(n for n in gm.graph.nodes if n.op == "placeholder")
        follow_input_device(gm.graph, first)
        for sub in gm.modules():
            if isinstance(sub, torch.fx.GraphModule) and sub is not gm:  # higher-order op bodies
                follow_input_device(sub.graph, next(n for n in sub.graph.nodes if n.op == "placeholder"))
                sub.recompile()
        output = next(n for n in gm.graph.nodes if n.op == "output")
        if isinstance(output.args[0], (list, tuple)):
            output.args = (output.args[0][0],)
        gm.graph._codegen = torch.fx.graph.CodeGen()
        gm.recompile()
        return PassResult(gm, True)
