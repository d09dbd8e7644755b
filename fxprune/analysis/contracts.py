"""Pass contracts that run: the pre- and post-conditions the passes declare through torch.fx's
`PassBase.requires` / `PassBase.ensures`, and the graph check the rewrite's PassManager runs
before and after every pass (`PassManager.add_checks`, enabled by `run_checks_after_each_pass`).
"""
from __future__ import annotations

import torch

from fxprune.analysis.fx_util import get_attr_path
from fxprune.analysis.meta_keys import DIMS


class ContractError(RuntimeError):
    """A pass was run on a graph it cannot handle, or left a graph that breaks its promise."""


def graphs_of(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    """`gm` and the GraphModules of its higher-order ops' bodies."""
    return [gm] + [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule) and m is not gm]


def require_dims(gm: torch.fx.GraphModule, who: str) -> None:
    """Every op computing a tensor carries the dimension labels of the analysis."""
    for sub in graphs_of(gm):
        for node in sub.graph.nodes:
            if node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor) and DIMS not in node.meta:
                raise ContractError(f"{who} reads the dimension labels of PropagateDimensionsPass, but node "
                                    f"{node.name} ({node.target}) has none: run the analysis on this graph first")


def check_graph(module: torch.nn.Module) -> None:
    """The PassManager check: each graph is well formed (`Graph.lint`: nodes defined before use, one
    output, targets of call_module present) and every attribute read resolves to a tensor or module."""
    if not isinstance(module, torch.fx.GraphModule):
        return
    for sub in graphs_of(module):
        try:
            sub.graph.lint()
        except RuntimeError as exc:  # lint names the node; say which check found it
            raise ContractError(f"graph check: {exc}") from exc
        for node in sub.graph.nodes:
            if node.op != "get_attr":
                continue
            value = get_attr_path(sub, node.target)  # lint has checked that it exists
            if not isinstance(value, (torch.Tensor, torch.nn.Module)):
                raise ContractError(f"node {node.name} reads attribute {node.target!r}, a {type(value).__name__}, "
                                    "not a tensor or module")
