"""PropagateDimensionsPass alone: labels on every node, coupled dimensions united by op semantics, an op
without a rule freezes what it touches; the graph itself is left as it was (eager values)."""
import pytest
import torch

from fxprune.analysis.capture import capture, drop_input_guards
from fxprune.analysis.contracts import ContractError
from fxprune.analysis.meta_keys import DIMS
from fxprune.analysis.propagate_dimensions import PropagateDimensionsPass
from tiny import SHAPES, TinyLM, flat, ids, logits

aten = torch.ops.aten


@pytest.fixture(scope="module")
def labelled():
    model = TinyLM().eval()
    gm = flat(capture(model).gm)
    code = gm.code
    propagate = PropagateDimensionsPass()
    propagate(gm)
    return model, gm, code, propagate.labels


def leaves(labels, gm, name, dim):
    atom = labels.tensor_atoms[id(gm.get_parameter(name))][dim]
    return {leaf.id for leaf in labels.table.leaves(atom)}


def test_every_node_is_labelled_and_the_graph_is_unchanged(labelled):
    model, gm, code, labels = labelled
    assert gm.code == code
    assert all(DIMS in n.meta for n in gm.graph.nodes if n.op != "output")
    assert labels.frozen_ops == [] and len(labels.matmuls) == 2 and labels.attention == []


def test_projections_are_coupled_through_heads_and_the_residual_stream(labelled):
    _, gm, _, labels = labelled
    q, k, v = (leaves(labels, gm, f"{p}.weight", 0) for p in "qkv")
    o = leaves(labels, gm, "o.weight", 1)
    assert q == k and v == o and len(q) == len(v) == 2  # [heads, head_dim] each, split by the views
    assert len(q & v) == 1  # the heads are shared; q.k's head_dim and v's head_dim are two spaces
    hidden = leaves(labels, gm, "embed.weight", 1)
    assert hidden == leaves(labels, gm, "q.weight", 1) == leaves(labels, gm, "o.weight", 0) == \
        leaves(labels, gm, "head.weight", 1)
    assert not hidden & (q | v)


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_values_are_eager(labelled, batch, seq):
    model, gm, *_ = labelled
    x = ids(batch, seq)
    with torch.no_grad():
        torch.testing.assert_close(logits(gm, x), model(x).logits)


def test_an_op_without_a_rule_freezes_what_it_touches():
    class Cummax(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.cummax(self.a(x), dim=-1).values)

    gm = torch.export.export(Cummax(), (torch.randn(2, 4),), strict=False).module()
    drop_input_guards(gm)
    propagate = PropagateDimensionsPass()
    propagate(gm)
    labels = propagate.labels
    assert [(op, why) for _, op, why in labels.frozen_ops] == [("cummax.default", "no rule for this op")]
    rows = labels.tensor_atoms[id(gm.get_parameter("a.weight"))][0]
    assert all(leaf.frozen for leaf in labels.table.leaves(rows))



def test_a_slice_bounded_at_run_time_keeps_the_sliced_dimension_whole_and_the_others_prunable():
    """A KV cache read over its filled window only: cache[:, :W] with W the mask's dynamic length."""
    class Window(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 6)
            self.register_buffer("cache", torch.randn(6, 10))

        def forward(self, x, mask):
            return self.a(x) @ self.cache[:, :mask.shape[1]]

    window = torch.export.Dim("window", min=1, max=9)
    gm = torch.export.export(Window(), (torch.randn(2, 4), torch.ones(2, 5)), dynamic_shapes=(None, {1: window}),
                             strict=False).module()
    drop_input_guards(gm)
    propagate = PropagateDimensionsPass()
    propagate(gm)
    labels = propagate.labels
    assert labels.frozen_ops == []
    rows = leaves(labels, gm, "a.weight", 0)
    cache = labels.tensor_atoms[id(gm.get_buffer("cache"))]
    assert {leaf.id for leaf in labels.table.leaves(cache[0])} == rows  # the channels stay coupled, unfrozen
    assert not any(leaf.frozen for leaf in labels.table.leaves(cache[0]))
    assert all(leaf.frozen for leaf in labels.table.leaves(cache[1]))

def test_the_labels_are_promised():
    gm = torch.export.export(torch.nn.Linear(4, 3), (torch.randn(2, 4),), strict=False).module()
    drop_input_guards(gm)

    class Forgetful(PropagateDimensionsPass):
        def call(self, gm):
            result = super().call(gm)
            next(n for n in gm.graph.nodes if n.op == "call_function").meta.pop(DIMS)
            return result

    with pytest.raises(ContractError, match="left node linear .call_function. without labels"):
        Forgetful()(gm)
