"""Which `nn.Linear` modules of a pruned GraphModule recovery adapts: read from the graph's `call_module` nodes
(the output head excluded), never from a per-family name list; peft's matching rules for user patterns."""
from __future__ import annotations

import re

import torch


def _linear_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.Linear)]


def output_heads(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the linear modules that produce the graph's output (the LM head), found by walking
    back from the output node through non-linear ops and stopping at the first linear on each path."""
    linear = {n for n in _linear_calls(gm)}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    heads, seen, stack = [], set(), list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in linear:
            if node.target not in heads:
                heads.append(node.target)
            continue
        stack.extend(node.all_input_nodes)
    return heads


def linear_modules(gm: torch.fx.GraphModule) -> list[str]:
    """Every `nn.Linear` the graph calls, in call order, once each (head included)."""
    return list(dict.fromkeys(n.target for n in _linear_calls(gm)))


def linear_targets(gm: torch.fx.GraphModule) -> list[str]:
    """LoRA targets: the `nn.Linear` modules the graph calls, less the output head.

    Read from the graph's `call_module` nodes, not from a per-family name list, so it is
    q/k/v/o/gate/up/down on LLaMA and whatever the projections are called elsewhere.
    """
    heads = set(output_heads(gm))
    return [name for name in linear_modules(gm) if name not in heads]


def resolve_targets(gm: torch.fx.GraphModule, target_modules) -> list[str]:
    """The linear module names `target_modules` selects, with peft's matching rules (a list entry
    matches a name equal to it or ending in `.entry`; a string is a regex that must match a whole
    name; "all-linear" is `linear_targets(gm)`). Raises ValueError for a pattern that matches no
    linear module, naming it and listing the linear modules there are."""
    available = linear_modules(gm)
    if target_modules is None or target_modules == "all-linear":
        targets = linear_targets(gm)
        if not targets:
            raise ValueError("the GraphModule calls no nn.Linear module other than its output head; nothing to adapt")
        return targets
    heads = set(output_heads(gm))
    listing = ", ".join(f"{n} (output head)" if n in heads else n for n in available) or "none"
    if isinstance(target_modules, str):
        chosen = [n for n in available if re.fullmatch(target_modules, n)]
        if not chosen:
            raise ValueError(f"target_modules regex {target_modules!r} matches no linear module of the "
                             f"GraphModule; its linear modules are: {listing}")
        return chosen
    patterns = list(target_modules)
    if not patterns:
        raise ValueError(f"target_modules is empty; the GraphModule's linear modules are: {listing}")

    def hits(p):
        return [n for n in available if n == p or n.endswith("." + p)]

    unmatched = [p for p in patterns if not hits(p)]
    if unmatched:
        raise ValueError(f"target_modules {unmatched} match no linear module of the GraphModule; "
                         f"its linear modules are: {listing}")
    return [n for n in available if any(n in hits(p) for p in patterns)]
