"""RewriteShapeLiteralsPass alone (after the slicing it needs): the int head counts of views become the
kept count, sizes computed from the symbolic batch (B * heads) are rescaled in the graph; values
equal the smaller twin at batch 1 and odd lengths."""
import operator

import pytest
import torch

from fxprune.analysis.contracts import ContractError
from fxprune.passes.rewrite_shape_literals import RewriteShapeLiteralsPass
from fxprune.rewrite.emit import copy_graph_module
from tiny import HEAD_DIM, SHAPES, analysed, calls, ids, logits, prune_heads, twin

aten = torch.ops.aten
KEPT = [0, 3]


def rewritten():
    return prune_heads("attention", KEPT)


def test_int_head_counts_become_the_kept_count():
    model, gm = rewritten()
    heads_views = [n for n in calls(gm, aten.view) if len(n.args[1]) == 4 and n.args[1][3] == HEAD_DIM]
    assert len(heads_views) == 3 and all(n.args[1][2] == len(KEPT) for n in heads_views)  # q, k, v: [B, S, 2, 4]
    merged = [n for n in calls(gm, aten.reshape) if len(n.args[1]) == 3 and isinstance(n.args[1][2], int)
              and n.args[1][2] != HEAD_DIM]
    assert [n.args[1][2] for n in merged] == [len(KEPT) * HEAD_DIM]  # back to [B, S, 2 * 4] before o


def test_symbolic_sizes_are_rescaled_in_the_graph():
    _, gm = rewritten()
    # B * 4 (one SymInt node) feeds [B * heads, S, D]: each use becomes (B * 4) * 1 // 2
    flat = [n for n in calls(gm, aten.reshape) + calls(gm, aten.view)
            if isinstance(n.args[1][0], torch.fx.Node) and n.args[1][0].target is operator.floordiv]
    assert len(flat) == 3  # q, k and v
    for n in flat:
        div = n.args[1][0]
        assert div.args[1] == 2 and div.args[0].target is operator.mul and div.args[0].args[1] == 1


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_values_are_the_smaller_twin(batch, seq):
    model, gm = rewritten()
    x = ids(batch, seq)
    torch.testing.assert_close(logits(gm, x), twin(model, KEPT)(x).logits)


def test_the_analysis_labels_are_required():
    model, dg = analysed("attention")
    gm = copy_graph_module(dg)
    for n in gm.graph.nodes:
        n.meta.pop("fxprune.dims", None)
    with pytest.raises(ContractError, match="RewriteShapeLiteralsPass reads the dimension labels"):
        RewriteShapeLiteralsPass(dg.table, {}, {})(gm)
