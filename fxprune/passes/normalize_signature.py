"""Rewrite pass: give the GraphModule the call signature of a causal LM.

`gm(input_ids, attention_mask=None)` returning an object with `.logits`, in place of the
export's flat pytree signature (which also demanded `use_cache`). Devices that export baked
into factory ops follow `input_ids.device` instead, so `gm.to("cuda")` (or a model captured
on the meta device and loaded later) runs; export's metadata asserts are dropped for the same reason.
"""
from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.analysis.contracts import ContractError, graphs_of
from fxprune.util.runtime import CausalLMOutput, DefaultAttentionMask, device_of

aten = torch.ops.aten


class NormalizeSignaturePass(PassBase):
    """Gives the rewritten graph the signature `gm(input_ids, attention_mask=None)` (a missing mask is all ones)
    returning an output with `.logits`, and makes devices baked into factory ops follow `input_ids`."""
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
        gm.add_module("_fxprune_default_mask", DefaultAttentionMask())
        gm.add_module("_fxprune_output", CausalLMOutput())
        with graph.inserting_after(last):
            full = graph.call_module("_fxprune_default_mask", (ids, mask))
        for user in list(mask.users):
            if user is not full:
                user.replace_input_with(mask, full)
        follow_input_device(graph, ids)
        for sub in graphs_of(gm)[1:]:  # higher-order op bodies
            first = next(n for n in sub.graph.nodes if n.op == "placeholder")
            follow_input_device(sub.graph, first)
            sub.recompile()
        output = next(n for n in graph.nodes if n.op == "output")
        logits = output.args[0][0] if isinstance(output.args[0], (list, tuple)) else output.args[0]
        with graph.inserting_before(output):
            wrapped = graph.call_module("_fxprune_output", (logits,))
        output.args = (wrapped,)
        graph._codegen = torch.fx.graph.CodeGen()
        gm.recompile()
        return PassResult(gm, True)


    def ensures(self, gm: torch.fx.GraphModule) -> None:
        """The promise: the signature `gm(input_ids, attention_mask=None)` and an output with `.logits`."""
        inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        output = next(n for n in gm.graph.nodes if n.op == "output")
        wrapped = output.args[0]
        if inputs != ["input_ids", "attention_mask"] or not (
                isinstance(wrapped, torch.fx.Node) and wrapped.op == "call_module" and wrapped.target == "_fxprune_output"):
            raise ContractError(f"NormalizeSignaturePass left inputs {inputs} and output {wrapped}")


def follow_input_device(graph: torch.fx.Graph, source: torch.fx.Node) -> None:
    """Replace device constants by `source.device`; drop export's metadata asserts."""
    with graph.inserting_after(source):
        device = graph.call_function(device_of, (source,))
    for node in list(graph.nodes):
        if node.op != "call_function" or node is device:
            continue
        if node.target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
            continue
        node.args = tuple(device if isinstance(a, torch.device) else a for a in node.args)
        node.kwargs = {k: device if isinstance(v, torch.device) else v for k, v in node.kwargs.items()}
