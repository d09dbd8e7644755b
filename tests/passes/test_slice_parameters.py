"""SliceParametersPass alone: every parameter replaced by a sliced, freshly allocated copy; the graph's
ops untouched; the result is the smaller twin."""
import pytest
import torch

from fxprune.analysis.contracts import ContractError
from fxprune.passes.slice_parameters import SliceParametersPass
from fxprune.rewrite.emit import copy_graph_module, kept_positions
from tiny import SHAPES, analysed, calls, group_of, ids, logits, mlp_twin, run_passes

KEPT = [1, 4, 5, 9, 11]


def sliced():
    model, dg = analysed("mlp")
    mlp = group_of(dg, "mlp")
    keep = kept_positions(dg, {mlp.atom_id: torch.tensor(KEPT)})
    gm = copy_graph_module(dg)
    before = [(n.op, n.target, n.args) for n in gm.graph.nodes]
    gm = run_passes(gm, [SliceParametersPass(dg.gm, dg.parameters, dg.buffers, dg.aliases, keep)])
    return model, dg, keep, before, gm


def test_parameters_are_sliced_copies_and_the_ops_stay():
    model, dg, keep, before, gm = sliced()
    assert {n: {d: i.tolist() for d, i in dims.items()} for n, dims in keep.items()} == {
        "up.weight": {0: KEPT}, "up.bias": {0: KEPT}, "down.weight": {1: KEPT}}
    assert [(n.op, n.target, n.args) for n in gm.graph.nodes] == before  # only tensors change
    assert [n.args[1].target for n in calls(gm, torch.ops.aten.linear)] == ["up.weight", "down.weight", "head.weight"]
    torch.testing.assert_close(gm.get_parameter("up.weight"), model.up.weight[KEPT], rtol=0, atol=0)
    torch.testing.assert_close(gm.get_parameter("down.weight"), model.down.weight[:, KEPT], rtol=0, atol=0)
    for name, p in model.named_parameters():
        assert gm.get_parameter(name).untyped_storage().data_ptr() != p.untyped_storage().data_ptr(), name


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_values_are_the_smaller_twin(batch, seq):
    model, *_, gm = sliced()
    x = ids(batch, seq)
    torch.testing.assert_close(logits(gm, x), mlp_twin(model, KEPT)(x).logits)


def test_the_shape_promise_is_checked(monkeypatch):
    import fxprune.passes.slice_parameters as mod
    model, dg = analysed("mlp")
    keep = kept_positions(dg, {group_of(dg, "mlp").atom_id: torch.tensor(KEPT)})
    monkeypatch.setattr(mod, "slice_tensor", lambda t, keep: t.detach().clone())  # forgets to slice
    with pytest.raises(ContractError, match=r"up.weight has shape \[12, 16\] after slicing, expected \[5, 16\]"):
        SliceParametersPass(dg.gm, dg.parameters, dg.buffers, dg.aliases, keep)(copy_graph_module(dg))
