"""The segments of a rewritten graph: the pruned twin of each segment of the dense graph it was rewritten from.

`fxprune.rewrite.emit.rewrite` copies the analysed graph (a node keeps its name in the copy) and its passes add
ops: a lifted projection before the op it replaces, a gather right after the value it selects from, size
arithmetic before the op reading it, the signature's default mask after the inputs. A copied op goes to its
dense twin's segment, an added one to the segment of the next copied op, so each pruned segment computes
what its dense one does, from what the previous pruned segment hands on.
"""
from __future__ import annotations

import torch

from fxprune.streaming.partition import Segment, last_uses, tensor_attr


class PrunedPartitionError(ValueError):
    """Raised when a rewritten graph's ops do not follow the dense segments' order; names the op."""


def pruned_segments(gm: torch.fx.GraphModule, segments: list[Segment]) -> list[Segment]:
    """The segments of `gm` (rewritten from the graph `segments` cut), index for index; `tensors` is left empty
    (the rewrite's tensors are the GraphModule's own)."""
    dense = {n.name: s.index for s in segments for n in s.nodes}
    nodes = list(gm.graph.nodes)
    ops = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    owner, following = {}, len(segments) - 1  # ops after the last copied one (the output's wrapper): the head
    for node in reversed(ops):
        following = dense.get(node.name, following)
        owner[node] = following
    order = [owner[n] for n in ops]
    for a, b, node in zip(order, order[1:], ops[1:]):
        if b < a:
            raise PrunedPartitionError(f"op {node.name!r} of the rewritten graph belongs to segment {b} but follows an "
                                       f"op of segment {a}")
    last, position = last_uses(nodes), {n: i for i, n in enumerate(nodes)}
    out = []
    for segment in segments:
        mine = [n for n in ops if owner[n] == segment.index]
        inside = set(mine)
        reads = list(dict.fromkeys(s for n in mine for s in n.all_input_nodes if s not in inside))
        end = position[mine[-1]] if mine else -1
        hands_on = [n for n in nodes[:end + 1] if n.op != "get_attr" and last[n] > end] if mine else []
        out.append(Segment(segment.index, mine, [s for s in reads if tensor_attr(gm, s)], [],
                           [s for s in reads if s.op != "get_attr"], hands_on))
    return out
