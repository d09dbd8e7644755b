"""Cut a captured graph into segments, one per decoder layer, from the graph itself.

Two facts of the graph find the cuts, never module or parameter names:
- the residual stream: between two decoder layers only ONE value that depends on the weights is live (the
  hidden state); what else crosses the cut (masks, rotary tables, ALiBi, symbolic sizes) is computed from
  the inputs alone. A position where exactly one weight-dependent value is live is a *stream cut*;
- the attention ops (`DependencyGraph.attention_ops`, one per layer): a layer starts at the last stream cut
  before its attention op (a cut inside a layer, after the attention's residual add, is no layer's start).
The head starts as many stream cuts after the last layer's start as the previous layer spanned (a model
with one layer keeps its head in that layer's segment). Parameter liveness (the segments whose ops read
each weight) says when the executor loads and drops each tensor; a tied weight is read by two segments.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from fxprune.analysis.fx_util import get_attr_path

aten = torch.ops.aten
# Ops whose result depends on their tensor input's shape, dtype or device only, never on its values: a mask
# built with new_full(hidden, ...) is no part of the residual stream.
SHAPE_ONLY = {aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
              aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
              aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.scalar_tensor.default}


class PartitionError(ValueError):
    """Raised when the graph has no cut that separates two decoder layers; the message names the attention op
    and the weight-dependent values live before it."""


@dataclass
class Segment:
    """One contiguous run of the graph's ops: a decoder layer, the embedding before the first, or the head."""
    index: int
    nodes: list[Node]                                   # the ops it runs, in program order
    attrs: list[Node] = field(default_factory=list)     # the get_attr nodes of tensors its ops read
    tensors: list[str] = field(default_factory=list)    # canonical names of the parameters and buffers read
    takes: list[Node] = field(default_factory=list)     # values made before it that its ops read
    hands_on: list[Node] = field(default_factory=list)  # values live after its last op: all a later op reads

    def __repr__(self):
        return (f"Segment({self.index}: {len(self.nodes)} ops, {len(self.tensors)} tensors, "
                f"takes {len(self.takes)}, hands on {[n.name for n in self.hands_on]})")


def tensor_attr(gm: torch.fx.GraphModule, node: Node) -> bool:
    """Whether `node` is a get_attr of a tensor (parameter, buffer or constant), not of a sub-graph."""
    return node.op == "get_attr" and isinstance(get_attr_path(gm, node.target), torch.Tensor)


def last_uses(nodes: list[Node]) -> dict[Node, int]:
    """Position of the last user of each node (its own position when nothing reads it)."""
    pos = {n: i for i, n in enumerate(nodes)}
    return {n: max((pos[u] for u in n.users), default=pos[n]) for n in nodes}


def weight_dependent(nodes: list[Node], weights: set[str], aliases: dict) -> set[Node]:
    """The nodes whose tensor value depends on the values of the `weights` (through any op but SHAPE_ONLY)."""
    out = set()
    for n in nodes:
        if n.op == "get_attr":
            if aliases.get(n.target, n.target) in weights:
                out.add(n)
        elif n.op == "call_function" and n.target not in SHAPE_ONLY and any(s in out for s in n.all_input_nodes):
            out.add(n)
    return out


def stream_cuts(nodes: list[Node], weights: set[str], aliases: dict) -> list[bool]:
    """cuts[p]: whether exactly one weight-dependent value (a get_attr not counted) is live between nodes[p]
    and nodes[p+1]."""
    dependent = weight_dependent(nodes, weights, aliases)
    last = last_uses(nodes)
    ending: dict[int, int] = {}
    live, cuts = 0, []
    for p, n in enumerate(nodes):
        if n in dependent and n.op != "get_attr" and last[n] > p:
            live += 1
            ending[last[n]] = ending.get(last[n], 0) + 1
        live -= ending.pop(p, 0)
        cuts.append(live == 1)
    return cuts


def runs(cuts: list[bool]) -> list[tuple[int, int]]:
    """(first, last) position of each maximal run of consecutive stream cuts."""
    out = []
    for p, c in enumerate(cuts):
        if c and (p == 0 or not cuts[p - 1]):
            out.append([p, p])
        elif c:
            out[-1][1] = p
    return [tuple(r) for r in out]


def boundaries(dg, nodes: list[Node]) -> list[int]:
    """Positions p such that a segment starts at nodes[p + 1]: before each layer and before the head."""
    cuts = stream_cuts(nodes, set(dg.parameters), dg.aliases)
    found = runs(cuts)
    run_of = {p: i for i, (first, last) in enumerate(found) for p in range(first, last + 1)}
    pos = {n: i for i, n in enumerate(nodes)}
    starts = []
    for op, _, _ in dg.attention_ops:
        latest = max((p for p in range(pos[op]) if cuts[p]), default=None)
        if latest is None or (starts and run_of[latest] == run_of[starts[-1]]):
            live = [n.name for n in nodes[:pos[op]] if n.op == "call_function"][-4:]
            raise PartitionError(f"no stream cut separates the layer of attention op {op.name!r} from the layer "
                                 f"before: more than one weight-dependent value is live there (ops before it: {live})")
        starts.append(latest)
    if len(starts) >= 2:  # the last layer spans as many runs of cuts as the one before it; the head follows
        head = 2 * run_of[starts[-1]] - run_of[starts[-2]]
        if head < len(found):
            starts.append(found[head][0])
    return starts


def partition(dg) -> list[Segment]:
    """The segments of `dg.gm` in program order: the ops before the first layer (embedding), one per decoder
    layer, and the head; each with the tensors it reads, the values it takes and the values it hands on."""
    gm = dg.gm
    nodes = list(gm.graph.nodes)
    last = last_uses(nodes)
    bounds = [-1] + boundaries(dg, nodes) + [len(nodes) - 2]  # the output node, last, belongs to no segment
    segments = []
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k] + 1, bounds[k + 1]
        ops = [n for n in nodes[lo:hi + 1] if n.op not in ("placeholder", "get_attr", "output")]
        inside = set(ops)
        reads = list(dict.fromkeys(s for n in ops for s in n.all_input_nodes if s not in inside))
        attrs = [s for s in reads if tensor_attr(gm, s)]
        names = list(dict.fromkeys(dg.aliases.get(a.target, a.target) for a in attrs))
        tensors = [t for t in names if t in dg.parameters or t in dg.buffers]
        takes = [s for s in reads if s.op != "get_attr"]
        hands_on = [n for n in nodes[:hi + 1] if n.op != "get_attr" and last[n] > hi]
        segments.append(Segment(k, ops, attrs, tensors, takes, hands_on))
    return segments
