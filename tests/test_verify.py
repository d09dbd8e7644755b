"""fxprune.rewrite.verify: apply runs the pruned graph before returning it. A graph that fails raises
GraphVerificationError naming the op, the node and the pruned groups there; the returned graph's
meta["val"] holds its pruned, symbolic shapes; load verifies too."""
import pytest
import torch
from torch.fx.passes.infra.pass_base import PassResult

import fxprune
from coupling_models import PerHeadNorm
from fxprune.passes.drop_pieces import DropPiecesPass
from fxprune.rewrite.verify import GraphVerificationError
from models import llama
from oracles import random_scores

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def per_head():
    model = PerHeadNorm().eval()
    dg = fxprune.analyze(model)
    return model, dg, fxprune.plan(model, 0.25, targets=("heads",), scores=random_scores(dg), dg=dg, reconstruct="none")


@pytest.fixture
def pieces_kept(monkeypatch):
    """A broken rewrite: the split into single heads keeps its removed heads' pieces."""
    monkeypatch.setattr(DropPiecesPass, "call", lambda self, gm: PassResult(gm, False))
    monkeypatch.setattr(DropPiecesPass, "ensures", lambda self, gm: None)


def test_a_graph_that_fails_is_never_returned(per_head, pieces_kept):
    model, dg, plan = per_head
    heads = next(g for g in dg.groups if g.kind == "heads")
    with pytest.raises(GraphVerificationError, match=r"fails shape propagation at node getitem_\d+ \(op getitem\): "
                                                     rf"IndexError.*units of g{heads.id} \(heads, layer 0\)") as info:
        fxprune.apply(model, plan, dg=dg)
    assert info.value.groups == (heads.id,) and info.value.op == "getitem"
    assert isinstance(info.value, fxprune.analysis.contracts.ContractError)


def test_the_real_forward_names_the_node_too(per_head, pieces_kept, monkeypatch):
    model, dg, plan = per_head
    monkeypatch.setattr(fxprune.rewrite.verify, "check_shapes", lambda gm, dg, plan: None)
    with pytest.raises(GraphVerificationError, match=r"fails on a \[2, 5\] batch at node getitem_\d+ \(op getitem\)"):
        fxprune.apply(model, plan, dg=dg)


def test_meta_holds_the_pruned_symbolic_shapes_and_load_verifies(tmp_path, monkeypatch):
    model = llama()
    gm = fxprune.compile(model, 0.3, importance="l2", reconstruct="none", allocation="global")
    dense = model.config.num_attention_heads * model.config.head_dim
    q = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("q_proj")
             and gm.get_submodule(n.target).out_features < dense)  # a layer that lost heads
    batch, seq, width = q.meta["val"].shape
    assert width == gm.get_submodule(q.target).out_features and width % model.config.head_dim == 0
    assert all(isinstance(s, torch.SymInt) for s in (batch, seq))  # as captured: any batch and length
    fxprune.save(gm, tmp_path / "pruned")
    checked = []
    monkeypatch.setattr(fxprune.serialization, "verify", lambda *args: checked.append(args[0]))
    loaded = fxprune.load(tmp_path / "pruned")
    assert checked == [loaded]
