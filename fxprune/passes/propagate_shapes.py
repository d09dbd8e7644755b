"""Rewrite pass: fake-tensor shape propagation of the pruned graph over its symbolic batch and sequence.

The rewrite leaves the dense model's `meta["val"]` on every node; this pass recomputes it from the
pruned parameters, so the returned graph's meta describes its real shapes. The inputs get fresh
symbols for the dimensions the capture made dynamic (batch, sequence), so one propagation covers
every size the capture allowed (or, with `symbolic=False`, the capture's example sizes). An op whose inputs no longer fit raises `NodeFailure` naming the
node; fake tensors carry no data, so this costs no real compute.
"""
from __future__ import annotations

import logging

import torch
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.infra.pass_base import PassBase, PassResult


class NodeFailure(RuntimeError):
    """`node` of a graph raised `cause` when the graph ran (on fake or on real tensors)."""

    def __init__(self, node: torch.fx.Node, cause: Exception):
        super().__init__(f"{node.name} ({node.target}): {type(cause).__name__}: {cause}")
        self.node, self.cause = node, cause


class NamesFailingNode(torch.fx.Interpreter):
    """An interpreter whose failures say at which node they happened."""

    def run_node(self, n: torch.fx.Node):
        try:
            return super().run_node(n)
        except NodeFailure:
            raise
        except Exception as exc:
            raise NodeFailure(n, exc) from exc


class FakeShapes(NamesFailingNode, FakeTensorProp):
    """FakeTensorProp (records `meta["val"]`) that names the failing node and follows the bodies of
    grad-mode regions, so their nodes' meta is refreshed too."""

    def call_function(self, target, args, kwargs):
        if target is torch.ops.higher_order.wrap_with_set_grad_enabled:
            enabled, body, *operands = args
            with torch.set_grad_enabled(enabled):
                return FakeShapes(body, self._mode).propagate_dont_convert_inputs(*operands)
        return super().call_function(target, args, kwargs)


def fake_inputs(mode: FakeTensorMode, placeholders: list[torch.fx.Node]) -> list:
    """Fake inputs shaped like the captured ones. With a shape environment, a fresh symbol for each
    captured symbol (input_ids and attention_mask share their batch and sequence); without, the sizes
    of the capture's example."""
    symbols, out = {}, []
    for node in placeholders:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            out.append(val)
            continue
        dynamic = [isinstance(s, torch.SymInt) and mode.shape_env is not None for s in val.shape]
        hints = [s.node.hint if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
        if any(d and str(s) not in symbols for s, d in zip(val.shape, dynamic)):  # a fake input makes new symbols
            context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC if d else DimDynamic.STATIC
                                                              for d in dynamic])
            fake = mode.from_tensor(torch.empty(hints, dtype=val.dtype, device=val.device), symbolic_context=context)
            symbols.update({str(s): f for s, f, d in zip(val.shape, fake.shape, dynamic) if d and str(s) not in symbols})
        sizes = [symbols[str(s)] if d else h for s, d, h in zip(val.shape, dynamic, hints)]
        with mode:
            out.append(torch.empty(sizes, dtype=val.dtype, device=val.device))
    return out


class PropagateShapesPass(PassBase):
    """Recompute `meta["val"]` of every node (and of grad-mode bodies) from the pruned graph; raises
    `NodeFailure` at the first op whose shapes do not fit. `symbolic=False`: at the capture's example
    sizes, for the ops whose fake kernels reject symbolic sizes (Bloom's baddbmm, dense graph too)."""

    def __init__(self, symbolic: bool = True):
        super().__init__()
        self.symbolic = symbolic

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        mode = FakeTensorMode(shape_env=ShapeEnv() if self.symbolic else None,
                              allow_non_fake_inputs=True)  # parameters stay real
        inputs = fake_inputs(mode, [n for n in gm.graph.nodes if n.op == "placeholder"])
        quiet = logging.getLogger(fake_tensor.__name__)
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # it logs each failing op as well: NodeFailure says it once, with the node
        try:
            with torch.no_grad():
                FakeShapes(gm, mode).propagate_dont_convert_inputs(*inputs)
        finally:
            quiet.setLevel(level)
        return PassResult(gm, False)
