"""Rewrite pass: give the GraphModule the call signature of a causal LM.

`gm(input_ids, attention_mask=None)` returning an object with `.logits`, in place of the
export's flat pytree signature (which also demanded `use_cache`).
"""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.runtime import causal_lm_output, default_attention_mask


class NormalizeSignaturePass(PassBase):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        for name, node in placeholders.items():
            if name not in ("input_ids", "attention_mask"):
                if node.users:
                    raise ValueError(f"input {name!r} is used by the graph; fxprune only feeds input_ids and attention_mask")
                graph.erase_node(node)
        ids, mask = placeholders["input_ids"], placeholders["attention_mask"]
        mask.args = (None,)  # default value: attention_mask=None
        last = mask
        with graph.inserting_after(last):
            full = graph.call_function(default_attention_mask, (ids, mask))
        for user in list(mask.users):
            if user is not full:
                user.replace_input_with(mask, full)
        output = next(n for n in graph.nodes if n.op == "output")
        logits = output.args[0][0] if isinstance(output.args[0], (list, tuple)) else output.args[0]
        with graph.inserting_before(output):
            wrapped = graph.call_function(causal_lm_output, (logits,))
        output.args = (wrapped,)
        graph._codegen = torch.fx.graph.CodeGen()
        gm.recompile()
        return PassResult(gm, True)
